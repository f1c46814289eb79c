"""The trainer: ``python -m hnet_titan.train --job.config_file train_configs/debug.toml [--section.key value ...]``.

Build order: config -> distributed -> data -> model on meta -> parallelize -> materialise + init ->
optimizer + schedule -> checkpoint (resume) -> loop (batch, forward, loss, backward, clip, step, log,
validate, checkpoint).
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from hnet import HNetConfig, HNetConfigError, ops
from hnet.ops import mamba_graphs
from hnet_titan.checkpoint import CheckpointManager, TrainingParts
from hnet_titan.config import DTYPES, ConfigError, JobConfig
from hnet_titan.data import DataError, build_dataloader
from hnet_titan.ft import FTManager, data_parallel
from hnet_titan.losses import bits_per_byte, cross_entropy_sum, ratio_loss
from hnet_titan.metrics import MetricsLogger, ThroughputMeter, device_peak_tflops
from hnet_titan.model_io import CheckpointError
from hnet_titan.optim import build_lr_scheduler, build_optimizer
from hnet_titan.parallelize import (
    build_mesh, build_model, configure_cuda_allocator, dp_rank_and_size, init_distributed, set_tf32,
)
from hnet_titan.profiling import build_profiler

logger = logging.getLogger("hnet_titan")


USER_ERRORS = (ConfigError, HNetConfigError, DataError, CheckpointError, ops.BackendError)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or Inf."""


class DivergenceWatch:
    """Remembers on the device the first step whose loss or gradient norm is not finite.

    Checking every step would read the loss on the host and stall the GPU queue each step; the flag is
    read where the host waits anyway (log steps) and before anything is written (checkpoint saves, the
    end), so a diverged run stops there, naming the step, and never saves its NaN weights.
    """

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros(3, device=device)  # step (0: none yet), loss, grad norm

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.first[0] == 0)
        self.first = torch.where(bad, torch.stack([loss.new_full((), step), loss, grad_norm.float()]), self.first)

    def check(self) -> None:
        step, loss, grad_norm = self.first.tolist()
        if step:
            raise TrainingDiverged(
                f"step {int(step)}: loss {loss:.4g}, grad norm {grad_norm:.4g} is not finite; "
                "lower optimizer.lr or training.max_norm, or resume from an earlier checkpoint"
            )


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (preemption) end training after a step, on every rank.

    Stopping inside a step would checkpoint a dataloader ahead of the model, and ranks stopping at
    different steps would wait forever on each other's collectives; a second signal interrupts at once.
    With several ranks the flags are all-reduced without waiting for the answer: each step starts
    the reduction of its flags and reads the previous step's, finished by then, so the host never
    waits for the GPU to drain; every rank stops after the step following the signal.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device) -> None:
        self.device, self.received = device, False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        self._pending: Callable[[], bool] | None = None  # reads the reduction started after the previous step

    def _handle(self, signum: int, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        logger.warning("%s: stopping after this step (send it again to stop at once)", signal.Signals(signum).name)

    def __call__(self) -> bool:
        """Whether to stop now; every rank asks after every step and gets the same answer."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        previous, self._pending = self._pending, self._reduce()
        return previous is not None and previous()

    def _reduce(self) -> Callable[[], bool]:
        """Start the all-reduce of this rank's flag; the returned call gives the result."""
        flag = torch.tensor([float(self.received)], device=self.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if flag.device.type == "cuda":
            work.wait()  # on CUDA this orders the current stream after the reduction; the host goes on
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            wait = copied.synchronize
        else:
            host, wait = flag, work.wait

        def result() -> bool:
            wait()
            return bool(host.item())

        return result

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_model_config(job: JobConfig) -> HNetConfig:
    config = HNetConfig.from_json(job.model.config_path) if job.model.config_path else HNetConfig.from_flavor(job.model.flavor)
    if len(job.loss.ratio_targets) != config.num_stages - 1:
        raise ConfigError(
            f"loss.ratio_targets has {len(job.loss.ratio_targets)} values but the model has "
            f"{config.num_stages - 1} routed stages; give one target compression per stage, e.g. "
            f"{[6.0] if config.num_stages == 2 else [3.0] * (config.num_stages - 1)}"
        )
    return config


class Trainer:
    def __init__(self, job: JobConfig):
        self.job = job
        configure_cuda_allocator()
        owns_group = not dist.is_initialized()
        self.rank, self.world, self.device = init_distributed(job.parallelism.timeout_s)
        try:
            self._build(job)
        except BaseException:
            if owns_group:  # a setup error leaves no process group behind for the caller's next one
                dist.destroy_process_group()
            raise

    def _build(self, job: JobConfig) -> None:
        self.mesh = build_mesh(job.parallelism, self.world, self.device.type)
        self.dp_rank, self.dp_world = dp_rank_and_size(self.mesh)
        if job.fault_tolerance.enable:  # shard the data over every replica group; ft.py positions it
            self.dp_rank, self.dp_world = data_parallel(job, self.dp_rank, self.dp_world)
            job.checkpoint.exclude_from_loading = [*job.checkpoint.exclude_from_loading, "dataloader"]
        torch.manual_seed(job.training.seed)
        if job.training.deterministic:
            torch.use_deterministic_algorithms(True)
        set_tf32(job.training.tf32)
        self.model_config = build_model_config(job)
        ops.configure(ssd=job.model.ssd_backend, conv=job.model.conv_backend,
                      attention=job.model.attn_backend, norm=job.model.norm_backend)
        mamba_graphs.configure(job.model.mamba_graph_max_positions)
        logger.info("kernel backends: %s", ops.selection(
            self.device, DTYPES[job.training.mixed_precision_param], compiled=job.compile.enable))
        self.dump = Path(job.job.dump_folder)
        if self.rank == 0:
            self.dump.mkdir(parents=True, exist_ok=True)
            (self.dump / "config.toml").write_text(job.to_toml())
            self.model_config.to_json(self.dump / "model_config.json")

        t = job.training
        rows_per_step = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * self.dp_world
        if rows_per_step % (t.local_batch_size * self.dp_world):
            raise ConfigError(
                f"training.global_batch_size = {rows_per_step} is not a multiple of local_batch_size x data-parallel "
                f"degree = {t.local_batch_size} x {self.dp_world}"
            )
        self.grad_accum = rows_per_step // (t.local_batch_size * self.dp_world)
        self.train_loader = self._loader("train", job.data.sources, infinite=True)

        self.model = build_model(self.model_config, job, self.mesh, self.device)
        self.optimizer = build_optimizer(self.model, job, self.model_config)
        self.scheduler = build_lr_scheduler(self.optimizer, job)
        self.step = 0
        self.bytes_seen = 0
        self.divergence = DivergenceWatch(self.device)
        self.grad_ranks = self.dp_world  # ranks a step's gradient is averaged over; per step under ft
        parts = TrainingParts(self.model, self.optimizer, self.scheduler, self.train_loader, self)
        self.checkpoint = CheckpointManager(
            job, parts, model_config=self.model_config, dp_rank=self.dp_rank, dp_world_size=self.dp_world
        )
        self.ft = None
        if job.fault_tolerance.enable:
            self.ft = FTManager(job, parts, group_rank=self.rank, group_world_size=self.world)
        self.metrics = MetricsLogger(
            str(self.dump if self.ft is None else self.ft.folder), rank=self.rank,
            enable_tensorboard=job.metrics.enable_tensorboard,
            save_jsonl=job.metrics.save_jsonl, enable_wandb=job.metrics.enable_wandb,
            rank0_only=job.metrics.rank0_only, run_config=job.to_dict(),
        )
        self.throughput = ThroughputMeter(
            self.model_config, self.device, device_peak_tflops(self.device, job.metrics.peak_tflops)
        )

    def _loader(self, split: str, sources: list[str], infinite: bool):
        d, t = self.job.data, self.job.training
        return build_dataloader(
            sources, seq_len=t.seq_len, local_batch_size=t.local_batch_size, dp_rank=self.dp_rank,
            dp_world_size=self.dp_world, split=split, infinite=infinite, num_workers=d.num_workers,
            text_field=d.text_field, missing_field=d.missing_field, add_eos=d.add_eos,
            val_fraction=d.val_fraction, shuffle_files=d.shuffle_files, seed=t.seed,
        )

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def _batch_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks of the step's batch: this group's and, under ft, the quorum's groups'."""
        tensor = self._all_reduce(tensor)
        return tensor if self.ft is None else self.ft.all_reduce_sum(tensor)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def forward_loss(self, batch: dict, num_predicted: torch.Tensor):
        """Loss whose gradient, summed over micro-batches and averaged over ranks, is the global-batch mean."""
        out = self.model(batch["input_ids"], batch["cu_seqlens"], batch.get("max_seqlen"))
        ce_sum = cross_entropy_sum(out.logits, batch["labels"])
        ratios = [ratio_loss(r, n) for r, n in zip(out.router_outputs, self.job.loss.ratio_targets)]
        loss = ce_sum / num_predicted * self.grad_ranks + self.job.loss.ratio_weight * sum(ratios) / self.grad_accum
        routers, cu_seqlens = out.router_outputs, out.stage_cu_seqlens
        return loss, ce_sum.detach(), [r.detach() for r in ratios], routers, cu_seqlens

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor | list | bool]:
        # The loader counts the predicted bytes on the host; a fill kernel, not a copy, puts it on the device.
        num_predicted = torch.full((), float(sum(mb["num_predicted"] for mb in micro_batches)), device=self.device)
        num_predicted = self._batch_sum(num_predicted)
        ce_total = torch.zeros((), device=self.device)
        stage_ratio = torch.zeros(self.model_config.num_stages - 1, device=self.device)
        stage_frac = torch.zeros_like(stage_ratio)
        stage_cu_seqlens = []  # per micro-batch, for the FLOPs of the step; stays on the device
        for mb in micro_batches:
            loss, ce_sum, ratios, routers, cu_seqlens = self.forward_loss(mb, num_predicted)
            loss.backward()
            stage_cu_seqlens.append(cu_seqlens)
            ce_total += ce_sum
            for s, (r, router) in enumerate(zip(ratios, routers)):
                stage_ratio[s] += r / self.grad_accum
                stage_frac[s] += router.boundary_mask.float().mean().detach() / self.grad_accum
        max_norm = self.job.training.max_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), max_norm if max_norm > 0 else float("inf"), foreach=True
        ).full_tensor()  # a DTensor: the parameters are FSDP / replicate DTensors
        ce = self._batch_sum(ce_total) / num_predicted
        self.divergence.update(self.step + 1, ce, grad_norm)
        committed = self.ft is None or self.ft.should_commit(self.step + 1)
        if committed:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"ce": ce, "grad_norm": grad_norm, "ratio": stage_ratio, "frac": stage_frac,
                "stage_cu_seqlens": stage_cu_seqlens, "committed": committed}

    def next_micro_batches(self, it) -> list[dict]:
        return [self._to_device(next(it)) for _ in range(self.grad_accum)]

    @torch.no_grad()
    def validate(self) -> float:
        """Bits per byte on the held-out split (or validation.sources), over a fixed number of batches."""
        v = self.job.validation
        loader = self._loader("val" if not v.sources else "all", v.sources or self.job.data.sources, infinite=False)
        self.model.eval()
        totals = torch.zeros(2, device=self.device)
        for i, batch in enumerate(loader):
            if i >= v.steps:
                break
            batch = self._to_device(batch)
            out = self.model(batch["input_ids"], batch["cu_seqlens"], batch.get("max_seqlen"))
            totals[0] += cross_entropy_sum(out.logits, batch["labels"])
            totals[1] += batch["num_predicted"]  # counted by the loader on the host
        self.model.train()
        totals = self._all_reduce(totals)
        return bits_per_byte((totals[0] / totals[1].clamp(min=1)).item())

    def state_dict(self) -> dict[str, int]:
        """The counters a checkpoint restores (the CheckpointManager adds RNG states)."""
        return {"step": self.step, "bytes_seen": self.bytes_seen}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.step, self.bytes_seen = state_dict["step"], state_dict["bytes_seen"]

    def train(self) -> None:
        job, t = self.job, self.job.training
        if job.checkpoint.create_seed_checkpoint:
            logger.info("wrote the seed checkpoint %s", self.checkpoint.save_seed())
            return
        self.checkpoint.load()  # before iter(): the dataloader resumes from its loaded state
        logger.info(
            "training %s (%s parameters) on %s x %d, %d micro-batch(es) of %d x %d bytes per rank per step",
            job.model.config_path or job.model.flavor, f"{sum(p.numel() for p in self.model.parameters()):,}",
            self.device.type, self.world, self.grad_accum, t.local_batch_size, t.seq_len,
        )
        gc.disable()
        stop_requested = StopRequest(self.device)
        it = iter(self.train_loader)
        start, start_step = time.perf_counter(), self.step  # a resumed run's ETA counts only its own steps
        batches = None  # kept while a step does not commit (ft): it is retried with the same batches
        profiler = build_profiler(job.profiling, self.dump / job.profiling.folder, self.rank, lambda: self.step)
        try:
            while self.step < t.steps:
                if self.ft is not None:
                    if self.ft.begin_step():  # first step or healed: the data stream was repositioned
                        it, batches = iter(self.train_loader), None
                    self.grad_ranks = self.ft.grad_ranks()
                if batches is None:
                    with self.throughput.data_wait():
                        batches = self.next_micro_batches(it)
                stats = self.train_step(batches)
                if not stats["committed"]:
                    continue
                self.step += 1
                step_bytes = sum(int(b["input_ids"].numel()) for b in batches)  # this rank's
                self.bytes_seen += step_bytes * self.grad_ranks
                self.throughput.record_step(step_bytes, stats["stage_cu_seqlens"])
                batches = None
                if self.step % t.gc_freq == 0:
                    gc.collect(1)
                if self.step % job.metrics.log_freq == 0 or self.step == t.steps:
                    self.divergence.check()
                    now = time.perf_counter()
                    ce = stats["ce"].item()
                    values = {
                        "loss": ce, "bpb": bits_per_byte(ce), "grad_norm": stats["grad_norm"].item(),
                        "lr": self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0]["lr_multiplier"],
                        **self.throughput.flush(),
                        "elapsed_s": now - start,
                        "eta_s": (now - start) / (self.step - start_step) * (t.steps - self.step),
                    }
                    for s, (r, f) in enumerate(zip(stats["ratio"].tolist(), stats["frac"].tolist())):
                        values[f"ratio_loss/{s}"] = r
                        values[f"bytes_per_chunk/{s}"] = 1.0 / max(f, 1e-9)
                    self.metrics.log(self.step, values)
                if job.validation.enable and self.step % job.validation.freq == 0:
                    self.metrics.log(self.step, {"bpb": self.validate()}, prefix="val/")
                stop = stop_requested()
                if self.ft is None or self.ft.writes_checkpoints():
                    if self.checkpoint.due(self.step, last=self.step == t.steps, force=stop):
                        self.divergence.check()
                    self.checkpoint.save(self.step, last=self.step == t.steps, force=stop)
                if stop:
                    logger.warning("stopped at step %d", self.step)
                    break
                if profiler is not None and self.step < t.steps:  # the profiler's steps end here
                    profiler.step()
        except KeyboardInterrupt:
            logger.warning("interrupted after step %d, without a checkpoint", self.step)
        finally:
            if profiler is not None:
                profiler.stop()  # saves the window if the last step was recorded
            stop_requested.restore()
            gc.enable()
            self.metrics.close()

    def close(self) -> None:
        if self.ft is not None:
            self.ft.shutdown()
        self.checkpoint.close()
        del self.model, self.optimizer, self.scheduler, self.checkpoint
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        job = JobConfig.from_args(argv)
        if job.job.print_config:
            print(job.to_toml())
            return 0
        trainer = Trainer(job)
    except USER_ERRORS as e:  # user-fixable problems: one line, no traceback
        logger.error("%s", e)
        return 2
    try:
        trainer.train()
    except USER_ERRORS as e:  # e.g. a checkpoint that does not fit the model
        logger.error("%s", e)
        return 2
    except TrainingDiverged as e:
        logger.error("%s", e)
        return 3
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
