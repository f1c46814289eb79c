"""Per-step metrics: one stable log line, and the same keys to JSONL, TensorBoard and W&B.

The log line starts ``step: N  loss: X  bpb: Y`` (tools grep it); ``<dump_folder>/metrics.jsonl`` holds
one object per logged step (``step`` plus the keys below), TensorBoard gets each key as a scalar.

==========================  ==============================================================================
key                         meaning
==========================  ==============================================================================
loss                        byte cross-entropy (nats) over the global batch of the logged step
bpb                         ``loss`` in bits per byte
ratio_loss/{s}              ratio loss of routed stage s (outer first) at the logged step
bytes_per_chunk/{s}         positions entering stage s per position it keeps (1 / boundary fraction)
grad_norm                   gradient norm before clipping
lr                          base learning rate (each stage scales it by its multiplier)
bytes_per_sec               bytes trained per second per device over the interval
tflops                      model TFLOP/s per device over the interval, counted by ``hnet.flops`` from the
                            stage lengths every step of the interval realised
mfu_pct                     ``tflops`` over the device's dense bf16 peak, in %; absent when no peak is
                            known (CPU, unknown GPU) unless ``metrics.peak_tflops`` gives one
data_pct                    share of the interval spent waiting for the next batch, in %
mem_active_gib              peak allocator active memory in the interval, GiB (CUDA only)
mem_reserved_gib            peak allocator reserved memory in the interval, GiB (CUDA only)
alloc_retries               cudaMalloc retries since start (CUDA only); growing means memory pressure
elapsed_s, eta_s            wall time since training started, estimated time to the last step
val/bpb                     bits per byte on the validation data (validation steps only)
==========================  ==============================================================================

"Per device" is this rank's own work: every rank trains the same number of bytes, and its FLOPs differ
from other ranks' only through its routers' choices. The interval runs from the first batch fetch after
the previous log to the logged step, so validation or a checkpoint save right after a log is left out.

Host syncs. The inner stages' lengths are known only on the device. :class:`ThroughputMeter` keeps
each micro-batch's per-stage ``cu_seqlens`` there (stacked: one small kernel, no sync) and copies the
whole interval's to the host in one transfer at the log step, which already synchronises to read the
loss; FLOPs are then counted on the host. Training steps between logs gain no synchronisation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from hnet.config import HNetConfig
from hnet.flops import document_lengths, training_flops

logger = logging.getLogger("hnet_titan")

# Dense bf16 tensor-core peaks in TFLOP/s, matched in order as substrings of torch.cuda.get_device_name()
# (an H100 SXM reports itself as "NVIDIA H100 80GB HBM3", so the plain "H100" entry comes last of the three).
PEAK_TFLOPS_BF16: list[tuple[str, float]] = [
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
    ("B200", 2250.0),
]

# Keys of the log line in order, with their format; the rest go to JSONL / TensorBoard only.
_LINE = [
    ("loss", "{:.4f}"), ("bpb", "{:.4f}"), ("ratio_loss", None), ("bytes_per_chunk", None),
    ("grad_norm", "{:.3f}"), ("lr", "{:.3e}"), ("bytes_per_sec", "{:,.0f}"), ("tflops", "{:.4g}"),
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


def lookup_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name, or None when the table does not know it."""
    name = device_name.lower()
    return next((peak for key, peak in PEAK_TFLOPS_BF16 if key.lower() in name), None)


def device_peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The peak MFU is measured against: ``override`` when > 0, else the table's entry for a CUDA device.

    None (no MFU) on CPU and on a GPU missing from the table, which is warned about.
    """
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = lookup_peak_tflops(name)
    if peak is None:
        logger.warning("no dense bf16 peak known for %r: MFU is not reported; set metrics.peak_tflops", name)
    return peak


def throughput_values(num_bytes: int, flops: float, seconds: float, peak_tflops: float | None) -> dict[str, float]:
    """``bytes_per_sec``, ``tflops`` and, when a peak is known, ``mfu_pct`` of work done in ``seconds``."""
    tflops = flops / seconds / 1e12
    values = {"bytes_per_sec": num_bytes / seconds, "tflops": tflops}
    if peak_tflops:
        values["mfu_pct"] = 100.0 * tflops / peak_tflops
    return values


def memory_values(device: torch.device) -> dict[str, float]:
    """Peak active / reserved GiB since the last call, whose peaks it then resets, and allocator retries.

    Empty off CUDA, where the caching allocator's statistics do not exist.
    """
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    torch.cuda.reset_peak_memory_stats(device)
    return {
        "mem_active_gib": stats.get("active_bytes.all.peak", 0) / 2**30,
        "mem_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
        "alloc_retries": stats.get("num_alloc_retries", 0),
    }


class ThroughputMeter:
    """Bytes/s, TFLOP/s, MFU, data-wait share and peak memory of this rank over one log interval.

    Wrap each batch fetch in :meth:`data_wait` (the first after a flush starts the interval), call
    :meth:`record_step` after each optimizer step and :meth:`flush` at a log step.
    """

    def __init__(self, config: HNetConfig, device: torch.device, peak_tflops: float | None):
        self.config = config
        self.device = device
        self.peak_tflops = peak_tflops
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None
        self._bytes = 0
        self._data_s = 0.0
        self._cu_seqlens: list[torch.Tensor] = []  # per micro-batch: (stages, documents + 1), on the device

    @contextmanager
    def data_wait(self) -> Iterator[None]:
        """Count the time spent in the block as waiting for data."""
        begin = time.perf_counter()
        if self._start is None:
            self._start = begin
        try:
            yield
        finally:
            self._data_s += time.perf_counter() - begin

    def record_step(self, num_bytes: int, stage_cu_seqlens: Sequence[Sequence[torch.Tensor]]) -> None:
        """One step: this rank's bytes and, per micro-batch, every stage's ``cu_seqlens`` (outer first).

        They stay on the device until :meth:`flush`, so recording never waits for the device.
        """
        self._bytes += num_bytes
        self._cu_seqlens += [torch.stack(list(cu)) for cu in stage_cu_seqlens]

    def flush(self) -> dict[str, float]:
        """The interval's values (empty if no step was recorded); the next data_wait starts a new interval."""
        if self._start is None or not self._cu_seqlens:
            self._reset()
            return {}
        bounds = torch.cat(self._cu_seqlens, dim=1).tolist()  # the one host transfer; waits for the device
        seconds = time.perf_counter() - self._start
        flops, begin = 0, 0
        for micro_batch in self._cu_seqlens:
            end = begin + micro_batch.shape[1]
            flops += training_flops(self.config, document_lengths([row[begin:end] for row in bounds])).total
            begin = end
        values = throughput_values(self._bytes, flops, seconds, self.peak_tflops)
        values["data_pct"] = 100.0 * self._data_s / seconds
        values.update(memory_values(self.device))
        self._reset()
        return values
