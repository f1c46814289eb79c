#!/usr/bin/env bash
# Launch hnet_titan training through torchrun; extra arguments go to the trainer.
#   ./run_train.sh                                   # debug config, 1 process (CPU works)
#   NGPU=8 CONFIG_FILE=train_configs/hnet_2stage_XL.toml ./run_train.sh --training.steps 1000
# Multi-node (run on every node): NNODES=4 NODE_RANK=<i> RDZV_ENDPOINT=<host:port> NGPU=8 ./run_train.sh
set -euo pipefail
cd "$(dirname "$0")"

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug.toml}
LOG_RANK=${LOG_RANK:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:0}
RDZV_ID=${RDZV_ID:-hnet_titan}

if [ "$NNODES" -gt 1 ]; then
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --node-rank "$NODE_RANK")
else
  rdzv=(--standalone)
fi

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec torchrun --nnodes "$NNODES" --nproc-per-node "$NGPU" "${rdzv[@]}" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m hnet_titan.train --job.config_file "$CONFIG_FILE" "$@"
