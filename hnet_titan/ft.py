"""Replica-level fault tolerance with torchft: replica groups die and rejoin while training goes on.

Layout. Training runs as ``fault_tolerance.group_size`` replica groups, each its own torchrun job (or
one process) with FSDP2 inside; a torchft lighthouse (``scripts/ft_launch.py`` starts one) forms a
quorum of the live groups every step. FSDP2 reduce-scatters gradients inside a group, then a hook it
runs on every reduced shard (``FSDPModule.set_all_reduce_hook``) averages the shard over the groups of
the quorum with the Manager's fault-tolerant all-reduce: HSDP whose replicate dimension is elastic.
Rank r of a group meets rank r of the others, so all groups must have the same number of ranks.
torchft 0.2.0 has no ``ManagedDeviceMesh`` / ``ft_init_device_mesh`` any more; this hook is its FSDP
integration, and it runs on CPU / gloo as on GPU / NCCL.

Steps. Every step starts with a synchronous quorum (:meth:`FTManager.begin_step`). A group that is
behind (restarted, or one that missed a commit) first loads model, optimizer, LR schedule and train
counters from a live group through the Manager's state-dict callbacks, so it takes part in that very
step with the same weights. The optimizer steps only when the Manager's ``should_commit`` agrees; a
step that fails (a group died mid all-reduce, too few groups) is retried with the same batches. The
quorum is synchronous because with torchft's async quorum a healing group's gradient is discarded,
and the batch it read would be lost.

Loss. The Trainer divides each rank's byte cross-entropy sum by the predicted-byte count summed over
all ranks of the quorum's groups, and scales it by the number of ranks the gradient is averaged over
(:meth:`FTManager.grad_ranks`: ranks per group x groups in the quorum). FSDP2's in-group mean and the
Manager's mean over participants then give the mean over the bytes of this step's groups exactly
once, however many groups are live.

Data. Rank r of group g reads shard ``g * ranks_per_group + r`` of ``group_size * ranks_per_group``,
so groups never read the same bytes, and each group keeps its own stream: after every committed step
each rank records its dataloader state (a "cursor", a few hundred bytes) under
``<dump_folder>/replica_<g>/data/rank<r>/``. When a process starts, and whenever it heals, it resumes from
its newest cursor at or before its model's step. A group's stream therefore advances by exactly the
batches of the steps it committed: a restarted group resumes after its last committed step (steps
trained without it read nothing from its shard), and a full restart from a persistent checkpoint at
step S rewinds every group to where it was at S (cursors at multiples of ``checkpoint.interval`` are
kept). The one exception is the step in flight when a group dies: if its gradient reached the other
groups' all-reduce but the commit was not recorded, the restarted group reads that batch again.

Checkpoints and logs. Only the quorum's lowest replica group writes the persistent DCP checkpoints
(``<dump_folder>/<checkpoint.folder>``, shared by the groups), so the writer moves when group 0 is
lost. Every group loads the newest one at start (and then heals if a live group is further), without
its dataloader state: the cursors above position each group's data. Each group writes its metrics
to ``<dump_folder>/replica_<g>/``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp
from torch.distributed.fsdp import FSDPModule

from hnet_titan.checkpoint import ModelState, OptimizerState, TrainingParts
from hnet_titan.config import ConfigError, JobConfig
from hnet_titan.data import DataError

logger = logging.getLogger("hnet_titan")

_MANAGER_ADDR_KEY = "manager_addr"  # torchft's key for the group's ManagerServer in the group's store
_TORCHFT_RECORD_LOGGERS = ("torchft_quorums", "torchft_commits")


def data_parallel(job: JobConfig, dp_rank: int, dp_world_size: int) -> tuple[int, int]:
    """This rank's data shard among the ranks of all replica groups: groups never read the same bytes."""
    ft = job.fault_tolerance
    return ft.replica_id * dp_world_size + dp_rank, ft.group_size * dp_world_size


class DataCursors:
    """One rank's dataloader state after each committed step: ``step-N.pkl`` files in ``folder``.

    The newest file is kept for a live rejoin, and those at multiples of ``keep_every`` (the
    checkpoint interval) for a full restart from a persistent checkpoint.
    """

    _NAME = re.compile(r"step-(\d+)\.pkl")

    def __init__(self, folder: Path, keep_every: int) -> None:
        self.folder, self.keep_every = folder, keep_every
        folder.mkdir(parents=True, exist_ok=True)

    def steps(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := self._NAME.fullmatch(p.name)))

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write atomically (a crash leaves the previous cursor), then drop the superseded one."""
        tmp = self.folder / f"step-{step}.tmp"
        tmp.write_bytes(pickle.dumps(state))
        os.replace(tmp, self.folder / f"step-{step}.pkl")
        for old in self.steps():
            if old < step and old % self.keep_every:
                (self.folder / f"step-{old}.pkl").unlink(missing_ok=True)

    def load(self, step: int) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the newest cursor at or before ``step``; later ones belong to an abandoned
        timeline (training went back to an earlier checkpoint) and are deleted."""
        steps = self.steps()
        for later in (s for s in steps if s > step):
            (self.folder / f"step-{later}.pkl").unlink(missing_ok=True)
        earlier = [s for s in steps if s <= step]
        if not earlier:
            return None
        return earlier[-1], pickle.loads((self.folder / f"step-{earlier[-1]}.pkl").read_bytes())


class FTManager:
    """This replica group's torchft Manager, wired into the trainer's FSDP2 model, optimizer and loop.

    Per step: :meth:`begin_step` (quorum, maybe heal), :meth:`all_reduce_sum` of the byte count,
    backward (the FSDP2 hook averages gradients over groups), :meth:`should_commit`, optimizer step.
    """

    def __init__(
        self,
        job: JobConfig,
        parts: TrainingParts,
        *,
        group_rank: int,
        group_world_size: int,
    ) -> None:
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        cfg = job.fault_tolerance
        lighthouse = cfg.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE", "")
        if not lighthouse:
            raise ConfigError(
                "fault_tolerance.enable needs the lighthouse address: set fault_tolerance.lighthouse or "
                "TORCHFT_LIGHTHOUSE (e.g. http://host:29510; scripts/ft_launch.py starts one)"
            )
        fsdp_units = [m for m in parts.model.modules() if isinstance(m, FSDPModule)]
        if not fsdp_units:
            raise ConfigError("fault_tolerance.enable needs the model wrapped by FSDP2 (parallelize_model)")
        self.model_state = ModelState(parts.model)
        self.optimizer_state = OptimizerState(parts.model, parts.optimizer)
        self.optimizer, self.lr_scheduler = parts.optimizer, parts.lr_scheduler
        self.dataloader, self.trainer = parts.dataloader, parts.trainer
        self.replica_id, self.group_world_size = cfg.replica_id, group_world_size
        self.folder = Path(job.job.dump_folder) / f"replica_{cfg.replica_id}"  # this group's own outputs
        self.cursors = DataCursors(self.folder / "data" / f"rank{group_rank}", keep_every=job.checkpoint.interval)
        self._initial_data = parts.dataloader.state_dict()  # the stream's start, for a group without cursors
        self._joined = self._healed = False

        logging.getLogger("torchft").setLevel(logging.WARNING)  # its per-step INFO lines; failures stay
        for name in _TORCHFT_RECORD_LOGGERS:  # per-step records for torchft's OpenTelemetry export only
            logging.getLogger(name).propagate = False
        timeout = timedelta(milliseconds=cfg.process_group_timeout_ms)
        pg = ProcessGroupNCCL(timeout=timeout) if cfg.process_group == "nccl" else ProcessGroupGloo(timeout=timeout)
        store_addr, store_port, self._store = _group_store(group_rank)
        self.manager = Manager(
            pg=pg,
            load_state_dict=self._load_state_dict,
            state_dict=self._state_dict,
            min_replica_size=cfg.min_replica_size,
            use_async_quorum=False,
            timeout=timeout,
            quorum_timeout=timedelta(seconds=cfg.quorum_timeout_s),
            rank=group_rank,
            world_size=group_world_size,
            store_addr=store_addr,
            store_port=store_port,
            lighthouse_addr=lighthouse,
            # Zero-padded: the quorum orders groups by this string, and its first one writes checkpoints.
            replica_id=f"replica_{cfg.replica_id:04d}",
        )
        for unit in fsdp_units:
            unit.set_all_reduce_hook(self._average_over_groups)
        logger.info(
            "fault tolerance: replica group %d of %d, lighthouse %s, at least %d group(s) per step",
            cfg.replica_id, cfg.group_size, lighthouse, cfg.min_replica_size,
        )

    # ------------------------------------------------------------------ the step

    def begin_step(self) -> bool:
        """Join this step's quorum, healing from a live group when behind. True when the dataloader
        was repositioned (on this process's first step, or after a heal): iterate it afresh."""
        first = not self._joined
        if first:  # the Manager counts committed steps from where the checkpoint left off
            self.manager.load_state_dict({"step": self.trainer.step, "batches_committed": 0})
        self.manager.start_quorum()
        reposition = first or self._healed
        self._healed, self._joined = False, True
        return reposition and self._restore_data(fresh_loader=first)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over the groups of this step's quorum."""
        self.manager.allreduce(tensor, reduce_op=ReduceOp.SUM).wait()
        return tensor

    def grad_ranks(self) -> int:
        """How many ranks this step's gradient is averaged over: ranks per group x groups in the quorum."""
        return self.group_world_size * self.manager.num_participants()

    def should_commit(self, step: int) -> bool:
        """Whether every rank of the quorum may apply this step; on success, record the data position."""
        if self.manager.should_commit():
            self.cursors.save(step, self.dataloader.state_dict())
            return True
        logger.warning("step %d was not committed (a replica group failed or too few are live): retrying it", step)
        return False

    def writes_checkpoints(self) -> bool:
        """Only the quorum's first (lowest) replica group writes persistent checkpoints."""
        return self.manager.participating_rank() == 0

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)

    # ------------------------------------------------------------------ internals

    def _average_over_groups(self, grad_shard: torch.Tensor) -> None:
        """FSDP2's hook after the in-group reduce-scatter: the mean of this shard over the quorum's groups.

        A failed all-reduce is reported to the Manager (the step then does not commit), not raised.
        """
        self.manager.allreduce(grad_shard).wait()

    def _state_dict(self) -> dict[str, Any]:
        """What a healing group takes from a live one (data position excepted: each group keeps its own).

        Before the first step (torchft syncs the groups' initial weights) the optimizer has no state,
        and reading it would create one: get_optimizer_state_dict steps the optimizer with lr 0,
        which shifts Adam's step count and so its bias correction.
        """
        return {
            "model": self.model_state.state_dict(),
            "optimizer": self.optimizer_state.state_dict() if self.optimizer.state else {},
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "train": self.trainer.state_dict(),
        }

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        self.model_state.load_state_dict(state["model"])
        if state["optimizer"]:
            self.optimizer_state.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.trainer.load_state_dict(state["train"])
        self._healed = True
        logger.info("replica group %d healed from a live group: now at step %d", self.replica_id, self.trainer.step)

    def _restore_data(self, fresh_loader: bool) -> bool:
        """Position the dataloader after this group's last committed step at or before its model's
        step; False when nothing changed (a fresh loader and no such step)."""
        step = self.trainer.step
        found = self.cursors.load(step)
        if found is None and fresh_loader:
            return False
        cursor_step, state = found if found is not None else (0, self._initial_data)
        try:
            self.dataloader.load_state_dict(state)
        except DataError as e:
            raise DataError(
                f"the data positions in {self.cursors.folder} were recorded with another layout "
                "(fault_tolerance.group_size, ranks per group or data.num_workers): delete that folder to "
                "restart this group's data stream"
            ) from e
        logger.info("replica group %d at step %d: its data resumes after its committed step %d",
                    self.replica_id, step, cursor_step)
        return True


def _group_store(group_rank: int) -> tuple[str, int, dist.TCPStore | None]:
    """(address, port) of the group's TCPStore for the Manager, and the store if this process hosts it.

    A single plain process hosts a new one (the Manager connects as a client, so it must outlive
    it). torchrun keeps its store across worker restarts: the previous incarnation's ManagerServer
    address is dropped before any rank can read it, and rank 0's Manager publishes the new one.
    """
    if "MASTER_ADDR" not in os.environ:
        store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
        return "localhost", store.port, store
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if group_rank == 0:
        dist.TCPStore(addr, port, is_master=False, wait_for_workers=False).delete_key(_MANAGER_ADDR_KEY)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return addr, port, None
