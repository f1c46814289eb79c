"""Per-step metrics: one stable log line, and the same keys to JSONL and TensorBoard.

The log line starts ``step: N  loss: X  bpb: Y`` (tools grep it); the JSONL at
``<dump_folder>/metrics.jsonl`` holds one object per logged step with the full key set.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

logger = logging.getLogger("hnet_titan")

# Keys of the log line in order, with their format; the rest go to JSONL / TensorBoard only.
_LINE = [
    ("loss", "{:.4f}"), ("bpb", "{:.4f}"), ("ratio_loss", None), ("bytes_per_chunk", None),
    ("grad_norm", "{:.3f}"), ("lr", "{:.3e}"), ("bytes_per_sec", "{:,.0f}"), ("tflops", "{:.2f}"),
    ("mfu_pct", "{:.2f}"), ("mem_active_gib", "{:.2f}"), ("data_pct", "{:.1f}"),
]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_line(step: int, values: dict[str, float]) -> str:
    """``step: N  loss: X  bpb: Y  ratio_loss: a,b  bytes_per_chunk: c,d ...  elapsed: h:mm:ss  eta: ...``."""
    parts = [f"step: {step}"]
    for key, fmt in _LINE:
        if fmt is None:  # per-stage values: "key/0", "key/1", ...
            stage_vals = [values[k] for k in sorted(values) if k.startswith(key + "/")]
            if stage_vals:
                parts.append(f"{key}: " + ",".join(f"{v:.3f}" for v in stage_vals))
        elif key in values and values[key] is not None and not (isinstance(values[key], float) and math.isnan(values[key])):
            parts.append(f"{key}: " + fmt.format(values[key]))
    for key in ("elapsed_s", "eta_s"):
        if key in values:
            parts.append(f"{key[:-2]}: {format_duration(values[key])}")
    return "  ".join(parts)


class MetricsLogger:
    """Writes logged steps to the console, ``metrics.jsonl`` and TensorBoard (rank 0 unless told otherwise)."""

    def __init__(self, dump_folder: str, *, rank: int, enable_tensorboard: bool, save_jsonl: bool,
                 enable_wandb: bool = False, rank0_only: bool = True, run_config: dict | None = None):
        self.active = rank == 0 or not rank0_only
        self.rank = rank
        self._jsonl = self._tb = self._wandb = None
        if not self.active:
            return
        folder = Path(dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "" if rank == 0 else f".rank{rank}"
        if save_jsonl:
            self._jsonl = open(folder / f"metrics{suffix}.jsonl", "a")
        if enable_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("metrics.enable_tensorboard: tensorboard is not installed; `pip install tensorboard`")
            else:
                self._tb = SummaryWriter(log_dir=str(folder / "tb" / f"rank{rank}"))
        if enable_wandb:
            try:
                import wandb
            except ImportError:
                logger.warning("metrics.enable_wandb: wandb is not installed; `pip install wandb`")
            else:
                self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "hnet-titan"), dir=str(folder),
                                         config=run_config)

    def log(self, step: int, values: dict[str, float], *, prefix: str = "") -> None:
        if not self.active:
            return
        values = {f"{prefix}{k}": v for k, v in values.items()}
        if not prefix:
            logger.info(format_line(step, values))
        else:
            logger.info(f"step: {step}  " + "  ".join(f"{k}: {v:.4f}" for k, v in values.items()))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
