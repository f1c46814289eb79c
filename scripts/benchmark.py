"""Benchmark H-Net training steps on this device: throughput, TFLOP/s, MFU, memory and where time goes.

    python scripts/benchmark.py --flavor hnet_1stage_L --rows 8 --force-compression 6
    python scripts/benchmark.py --flavor debug --rows 2 --seq-len 256 --warmup 1 --steps 1 --dtype fp32  # CPU

A step is what the trainer does on one device: forward, byte cross-entropy plus ratio loss, backward
and an AdamW step over the trainer's parameter groups. ``--warmup`` steps run first (compilation,
autotuning, allocator growth), then ``--steps`` timed steps, then one step under torch.profiler (``--trace`` saves its Chrome trace).

Workload
  --data random|text|corpus   one document of --seq-len bytes per row, of uniform random bytes or of
                              this file's text repeated (the same batch every step); or a corpus packed
                              by hnet_titan.data from --source paths (none: the Python standard library)
  --force-compression N1[,N2] a boundary at every N-th position of each document, per routed stage, outer
                              first (hnet.modules.dynamic_chunking.forced_boundaries; document starts
                              always). An untrained router's ratio is arbitrary: compare MFU with this set.
  --dtype bf16|fp32           bf16 builds the model in bf16 as the released checkpoints are (residual_proj
                              and Mamba2 D stay fp32) and AdamW updates those parameters directly, with no
                              fp32 master copy, so its step is cheaper than under FSDP mixed precision
  --compile, --ac             torch.compile of every block and of the routing and dechunk modules, and
                              activation checkpointing, as the trainer applies them (hnet_titan.parallelize)
  --mamba-graph-max-positions N  CUDA graphs for Mamba2 layers of at most N positions, as the trainer's
                              model.mamba_graph_max_positions (its default); 0: none
  --no-tf32                   fp32 matmuls (residual_proj) in full fp32 instead of the trainer's default TF32
  --backend-{ssd,conv,attention,norm}  force kernel backends (hnet.ops.configure)

Measurements
  throughput   hnet_titan.metrics.ThroughputMeter over the timed steps, as the trainer logs it: bytes/s and
               TFLOP/s per device (FLOPs from every step's realised stage lengths), MFU, peak memory
  time_ms      mean per step, forward and backward of every stage and of its encoder / main network /
               decoder: CUDA events (perf_counter on CPU) recorded by forward pre/post hooks, and by hooks
               on the gradient of each module's output (its backward starts) and input (its backward
               ends). stage{s}.dynamic_chunking is the stage less its networks and inner stage (routing,
               chunk, dechunk, residual); head is the rest of the forward and backward (embedding, lm_head,
               loss)
  op_class_ms  the profiled step's CUDA kernel time (on CPU: operator self time) by class of the kernel or
               operator name: gemm, ssd, conv, attention, norm, elementwise, other. On CPU the reference
               SSD scan and conv run as plain operators, so their time shows as gemm and elementwise.
  gpu_idle     the profiled step's GPU timeline from its first kernel to its last: the time no kernel ran
               (the GPU waiting on the host: syncs, launch-bound stretches) and its 10 longest gaps, each
               named by the kernels either side, which locate the host work the GPU waited for

JSON report (--out): flavor, device, dtype, rows, seq_len, data, compile, mamba_graph_max_positions, tf32,
compiled_frames {warmup, timed}
(dynamo frames compiled in the warm-up and during the timed steps: recompiles show there), ac, force_compression,
warmup_steps, timed_steps, backends {op: backend}, bytes_per_sec, tflops, mfu_pct (null without a known
peak), peak_tflops, flops_per_byte, bytes_per_chunk [per routed stage], memory {mem_active_gib,
mem_reserved_gib, alloc_retries} (empty on CPU), step_ms {forward, backward, optimizer, total} (means),
step_total_ms [each timed step, in order: one slow step shows apart from the host-bound scatter], time_ms
{part: {forward, backward}}, op_class_ms {class: ms}, top_kernels_ms [[kernel, ms, calls]] (the profiled step's
--top-kernels costliest kernels), gpu_idle {span_ms, idle_ms, gaps [[ms, kernel before, kernel after]]} (null on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnet import FLAVORS, HNetConfig, HNetForCausalLM, HNetOutput, ops  # noqa: E402
from hnet.modules.dynamic_chunking import forced_boundaries  # noqa: E402
from hnet.ops import mamba_graphs  # noqa: E402
from hnet.ops.backend import BACKENDS, valid_backends  # noqa: E402
from hnet_titan.config import ActivationCheckpoint, JobConfig  # noqa: E402
from hnet_titan.data import DataError, build_dataloader  # noqa: E402
from hnet_titan.losses import IGNORE_INDEX, cross_entropy_sum, ratio_loss  # noqa: E402
from hnet_titan.metrics import ThroughputMeter, device_peak_tflops  # noqa: E402
from hnet_titan.optim import build_optimizer  # noqa: E402
from hnet_titan.parallelize import (  # noqa: E402
    apply_activation_checkpointing, apply_compile, configure_cuda_allocator, set_tf32, stage_networks,
)

# Class of a CUDA kernel or CPU operator: the first whose patterns occur in the lower-cased name.
OP_CLASSES: list[tuple[str, tuple[str, ...]]] = [
    ("ssd", ("chunk_scan", "chunk_state", "state_passing", "bmm_chunk", "chunk_cumsum", "ssd", "selective_scan")),
    ("conv", ("conv",)),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("norm", ("norm",)),
    ("gemm", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "triton_tem")),
    ("elementwise", ("elementwise", "triton_poi", "multi_tensor_apply", "aten::_foreach")),
]
# CPU operators (aten::NAME, in-place "_" dropped) that are elementwise.
CPU_ELEMENTWISE = {
    "abs", "add", "addcdiv", "addcmul", "clamp", "clamp_min", "copy", "cos", "div", "eq", "exp", "fill", "ge", "gt",
    "le", "lerp", "log", "lt", "masked_fill", "maximum", "minimum", "mul", "ne", "neg", "pow", "reciprocal", "rsqrt",
    "rsub", "sigmoid", "sigmoid_backward", "silu", "silu_backward", "sin", "softplus", "softplus_backward", "sqrt",
    "sub", "tanh", "threshold_backward", "where", "zero",
}
PAPER_RATIO_TARGETS = {1: [6.0], 2: [3.0, 3.0]}  # per number of routed stages


def op_class(name: str) -> str:
    lower = name.lower()
    for cls, patterns in OP_CLASSES:
        if any(p in lower for p in patterns):
            return cls
    if lower.startswith("aten::") and lower.removeprefix("aten::").rstrip("_") in CPU_ELEMENTWISE:
        return "elementwise"
    return "other"


class StepTimeline:
    """Named marks of one step: CUDA events on a GPU (read after a sync), perf_counter on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: dict[str, torch.cuda.Event | float] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            self.marks[name] = torch.cuda.Event(enable_timing=True)
            self.marks[name].record()
        else:
            self.marks[name] = time.perf_counter()

    def ms(self, begin: str, end: str) -> float:
        a, b = self.marks[begin], self.marks[end]
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)


class StageTimer:
    """Forward and backward time of every stage and of its networks, from hooks on those modules."""

    def __init__(self, model: HNetForCausalLM, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[StepTimeline] = []
        self.stages = model.stages()
        self.handles = []
        for part, module in self._modules().items():
            self.handles.append(module.register_forward_pre_hook(partial(self._enter, part)))
            self.handles.append(module.register_forward_hook(partial(self._exit, part)))

    def _modules(self) -> dict[str, torch.nn.Module]:
        out = {}
        for stage in self.stages:
            out[f"stage{stage.stage}"] = stage
            out.update({f"stage{stage.stage}.{name}": net for name, net in stage_networks(stage).items()})
        return out

    def new_step(self) -> StepTimeline:
        self.steps.append(StepTimeline(self.cuda))
        return self.steps[-1]

    def _enter(self, part: str, module, args) -> None:
        timeline = self.steps[-1]
        timeline.mark(f"{part}.forward.begin")
        if args[0].requires_grad:  # the input's gradient is complete once the module's backward is done
            args[0].register_hook(lambda grad: timeline.mark(f"{part}.backward.end"))

    def _exit(self, part: str, module, args, output) -> None:
        timeline = self.steps[-1]
        timeline.mark(f"{part}.forward.end")
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:  # the output's gradient is complete when the module's backward starts
            hidden.register_hook(lambda grad: timeline.mark(f"{part}.backward.begin"))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def summary(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Mean ms per step: (forward / backward / optimizer / total, {part: {forward, backward}})."""
        n = len(self.steps)
        step = {
            "forward": sum(t.ms("step.begin", "forward.end") for t in self.steps) / n,
            "backward": sum(t.ms("forward.end", "backward.end") for t in self.steps) / n,
            "optimizer": sum(t.ms("backward.end", "step.end") for t in self.steps) / n,
            "total": sum(t.ms("step.begin", "step.end") for t in self.steps) / n,
        }
        parts = {
            part: {d: sum(t.ms(f"{part}.{d}.begin", f"{part}.{d}.end") for t in self.steps) / n
                   for d in ("forward", "backward")}
            for part in self._modules()
        }
        times: dict[str, dict[str, float]] = {}
        for stage in self.stages:
            s = stage.stage
            times[f"stage{s}"] = parts[f"stage{s}"]
            if stage.is_innermost:
                times[f"stage{s}.main_network"] = parts[f"stage{s}.main_network"]
                continue
            enc, dec, inner = parts[f"stage{s}.encoder"], parts[f"stage{s}.decoder"], parts[f"stage{s + 1}"]
            times[f"stage{s}.encoder"] = enc
            times[f"stage{s}.dynamic_chunking"] = {
                d: parts[f"stage{s}"][d] - enc[d] - dec[d] - inner[d] for d in ("forward", "backward")
            }
            times[f"stage{s}.decoder"] = dec
        times["head"] = {d: step[d] - parts["stage0"][d] for d in ("forward", "backward")}
        return step, times


def train_step(model, optimizer, batch: dict, targets: list[float], timeline: StepTimeline) -> HNetOutput:
    """Forward, loss, backward and optimizer step, as the trainer's (alpha = 0.03)."""
    timeline.mark("step.begin")
    out = model(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"])
    ce = cross_entropy_sum(out.logits, batch["labels"]) / batch["labels"].ne(IGNORE_INDEX).sum()
    loss = ce + 0.03 * sum(ratio_loss(r, n) for r, n in zip(out.router_outputs, targets))
    timeline.mark("forward.end")
    loss.backward()
    timeline.mark("backward.end")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timeline.mark("step.end")
    return out


def synthetic_batch(kind: str, rows: int, seq_len: int) -> dict:
    """One seq_len-byte document per row: uniform random bytes, or this file's text repeated."""
    n = rows * (seq_len + 1)
    if kind == "random":
        data = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0))
    else:
        text = torch.frombuffer(bytearray(Path(__file__).read_bytes()), dtype=torch.uint8).long()
        data = text.repeat(n // len(text) + 1)[:n]
    data = data.view(rows, seq_len + 1)
    return {
        "input_ids": data[:, :-1].reshape(-1), "labels": data[:, 1:].reshape(-1),
        "cu_seqlens": torch.arange(0, rows * seq_len + 1, seq_len, dtype=torch.int32), "max_seqlen": seq_len,
    }


def host_batches(args: argparse.Namespace, count: int) -> list[dict]:
    if args.data != "corpus":
        return [synthetic_batch(args.data, args.rows, args.seq_len)] * count
    loader = build_dataloader(args.source, seq_len=args.seq_len, local_batch_size=args.rows, infinite=True)
    it = iter(loader)
    return [next(it) for _ in range(count)]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_frames() -> int:
    """Frames dynamo has compiled so far in this process: a recompile during timed steps shows as growth."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def idle_gaps(kernels: list[tuple[float, float, str]], top: int = 10) -> dict:
    """GPU idle time within the span of (start_us, end_us, name) kernel intervals, and its longest gaps.

    Kernels of other streams may overlap: time counts as busy while any kernel runs.
    """
    kernels = sorted(kernels)
    gaps: list[list] = []
    busy_until, last = kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > busy_until:
            gaps.append([(start - busy_until) / 1e3, last, name])
        if end > busy_until:
            busy_until, last = end, name
    span = (busy_until - kernels[0][0]) / 1e3
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": span, "idle_ms": sum(g[0] for g in gaps), "gaps": gaps[:top]}


def profile_step(
    step, device: torch.device, trace: str = "", top: int = 15
) -> tuple[dict[str, float], list[tuple[str, float, int]], dict | None]:
    """ms per op class of one ``step()``, its ``top`` costliest kernels (operators on CPU) with their calls, and
    the GPU's idle gaps. Calls per kernel tell a kernel of every layer from one of every network.

    CUDA kernel time on a GPU, operator self time on CPU; ``trace`` also writes the step's Chrome trace
    (host and device timelines: where the GPU waits on the host).
    """
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        synchronize(device)
    if trace:
        prof.export_chrome_trace(trace)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    classes: dict[str, float] = {}
    kernels: dict[str, float] = {}
    calls: dict[str, int] = {}
    intervals: list[tuple[float, float, str]] = []
    for event in prof.events():
        # On the GPU a user annotation (the optimizer's step, for one) spans kernels counted on their own.
        if event.device_type != kind or event.is_async or (cuda and event.is_user_annotation):
            continue
        ms = (event.device_time_total if cuda else event.self_cpu_time_total) / 1e3
        cls = op_class(event.name)
        classes[cls] = classes.get(cls, 0.0) + ms
        kernels[event.name] = kernels.get(event.name, 0.0) + ms
        calls[event.name] = calls.get(event.name, 0) + 1
        intervals.append((event.time_range.start, event.time_range.end, event.name))
    costliest = [(name, ms, calls[name]) for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]]
    idle = idle_gaps(intervals) if cuda and intervals else None
    return dict(sorted(classes.items(), key=lambda kv: -kv[1])), costliest, idle


def run(args: argparse.Namespace) -> dict:
    configure_cuda_allocator()  # as the trainer
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)
    ops.configure(**{op: getattr(args, f"backend_{op}") for op in BACKENDS})
    mamba_graphs.configure(args.mamba_graph_max_positions)
    set_tf32(args.tf32)
    config = HNetConfig.from_flavor(args.flavor)
    routed = config.num_stages - 1
    force = args.force_compression
    targets = force or PAPER_RATIO_TARGETS.get(routed, [3.0] * routed)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = HNetForCausalLM(config, device=device, dtype=dtype)
    model.init_weights()
    apply_activation_checkpointing(model, ActivationCheckpoint(mode=args.ac, every_n=args.ac_every))
    if args.compile:
        apply_compile(model, dynamic=True)
    job = JobConfig()
    job.loss.ratio_targets = targets
    optimizer = build_optimizer(model, job, config)
    peak = device_peak_tflops(device, args.peak_tflops)
    meter = ThroughputMeter(config, device, peak)
    timer = StageTimer(model, device)
    batches = host_batches(args, args.warmup + args.steps + 1)
    step = partial(train_step, model, optimizer, targets=targets)

    gc.disable()  # as the trainer: no collector pause lands inside a timed step
    with forced_boundaries(model, force):
        for batch in batches[: args.warmup]:
            step(to_device(batch, device), timeline=timer.new_step())
        synchronize(device)
        gc.collect()
        frames_warmup = compiled_frames()
        meter.flush()  # drops the warm-up interval and resets the memory peaks
        timer.steps.clear()
        positions = []
        for batch in batches[args.warmup : args.warmup + args.steps]:
            with meter.data_wait():
                batch = to_device(batch, device)
            out = step(batch, timeline=timer.new_step())
            meter.record_step(batch["input_ids"].numel(), [out.stage_cu_seqlens])
            positions.append(torch.stack([cu[-1] for cu in out.stage_cu_seqlens]))
        throughput = meter.flush()
        gc.enable()
        frames_timed = compiled_frames() - frames_warmup
        timer.remove()
        step_ms, time_ms = timer.summary()
        step_total_ms = [t.ms("step.begin", "step.end") for t in timer.steps]
        op_class_ms, top_kernels, gpu_idle = profile_step(
            lambda: step(to_device(batches[-1], device), timeline=StepTimeline(device.type == "cuda")), device,
            args.trace, args.top_kernels,
        )

    totals = torch.stack(positions).sum(0).tolist()
    memory = {k: throughput[k] for k in ("mem_active_gib", "mem_reserved_gib", "alloc_retries") if k in throughput}
    return {
        "flavor": args.flavor,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "rows": args.rows, "seq_len": args.seq_len, "data": args.data,
        "compile": args.compile, "mamba_graph_max_positions": args.mamba_graph_max_positions, "tf32": args.tf32,
        "compiled_frames": {"warmup": frames_warmup, "timed": frames_timed}, "ac": args.ac, "force_compression": force,
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "backends": ops.selection(device, dtype, compiled=args.compile),
        "bytes_per_sec": throughput["bytes_per_sec"], "tflops": throughput["tflops"],
        "mfu_pct": throughput.get("mfu_pct"), "peak_tflops": peak,
        "flops_per_byte": throughput["tflops"] * 1e12 / throughput["bytes_per_sec"],
        "bytes_per_chunk": [outer / inner for outer, inner in zip(totals, totals[1:])],
        "memory": memory, "step_ms": step_ms, "step_total_ms": step_total_ms, "time_ms": time_ms,
        "op_class_ms": op_class_ms,
        "top_kernels_ms": top_kernels, "gpu_idle": gpu_idle,
    }


def _depth(part: str) -> int:
    """Indent of a time_ms part: stage s is nested s deep, its networks one deeper; head is at the top."""
    stage, _, network = part.partition(".")
    return int(stage.removeprefix("stage")) + bool(network) if stage.startswith("stage") else 0


def format_report(r: dict) -> str:
    forced = f"forced {r['force_compression']}" if r["force_compression"] else "natural routing"
    mfu = f"{r['mfu_pct']:.1f}%" if r["mfu_pct"] is not None else "n/a"
    lines = [
        f"{r['flavor']} on {r['device']}, {r['dtype']}, {r['rows']} x {r['seq_len']} bytes ({r['data']}), "
        f"{forced}, compile={r['compile']}, tf32={r['tf32']}, ac={r['ac']}"
        + (f" (frames compiled: {r['compiled_frames']['warmup']} in warm-up, {r['compiled_frames']['timed']} timed)"
           if r["compile"] else ""),
        "backends: " + " ".join(f"{op}={name}" for op, name in r["backends"].items()),
        f"bytes/s {r['bytes_per_sec']:,.0f}   TFLOP/s {r['tflops']:.4g}   MFU {mfu}   "
        f"GFLOP/byte {r['flops_per_byte'] / 1e9:.4g}   "
        "bytes/chunk " + ",".join(f"{b:.2f}" for b in r["bytes_per_chunk"]),
    ]
    m = r["memory"]
    if m:
        lines.append(f"memory: peak active {m['mem_active_gib']:.2f} GiB, reserved {m['mem_reserved_gib']:.2f} GiB, "
                     f"{m['alloc_retries']} allocator retries")
    s = r["step_ms"]
    lines += [
        f"step {s['total']:.1f} ms = forward {s['forward']:.1f} + backward {s['backward']:.1f} "
        f"+ optimizer {s['optimizer']:.1f}; each step: " + " ".join(f"{ms:.1f}" for ms in r["step_total_ms"]),
        "",
        f"{'part':<32}{'forward ms':>12}{'backward ms':>13}",
    ]
    for part, t in r["time_ms"].items():
        lines.append(f"{'  ' * _depth(part) + part:<32}{t['forward']:>12.2f}{t['backward']:>13.2f}")
    total = sum(r["op_class_ms"].values()) or 1.0
    lines += ["", f"{'op class (profiled step)':<32}{'ms':>12}{'%':>13}"]
    lines += [f"{cls:<32}{ms:>12.2f}{100 * ms / total:>13.1f}" for cls, ms in r["op_class_ms"].items()]
    lines += ["", f"{'costliest kernels (profiled step)':<84}{'ms':>8}{'calls':>7}"]
    lines += [f"{name[:82]:<84}{ms:>8.2f}{n:>7}" for name, ms, n in r["top_kernels_ms"]]
    idle = r["gpu_idle"]
    if idle:
        lines += ["", f"GPU idle {idle['idle_ms']:.2f} of {idle['span_ms']:.2f} ms (profiled step); longest gaps:"]
        lines += [f"{ms:>8.3f} ms  after {before[:48]:<50}before {after[:48]}" for ms, before, after in idle["gaps"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", choices=list(FLAVORS), default="debug")
    p.add_argument("--rows", type=int, default=1, help="rows per step (local batch)")
    p.add_argument("--seq-len", type=int, default=8192, help="bytes per row")
    p.add_argument("--warmup", type=int, default=6,
                   help="untimed steps first; on an H100 the 4th step still ran 40 ms slow (docs/performance.md, change 24)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--data", choices=["random", "text", "corpus"], default="text")
    p.add_argument("--source", nargs="*", default=[], help="corpus paths for --data corpus (none: Python stdlib)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--force-compression", default="", help="N1[,N2]: fixed boundaries per routed stage")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks, routing and dechunk modules")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="fp32 matmuls (residual_proj) on TF32 tensor cores, the trainer's default (training.tf32)")
    p.add_argument("--ac", choices=["none", "full", "every_n"], default="none", help="activation checkpointing")
    p.add_argument("--ac-every", type=int, default=2, help="every_n: checkpoint every n-th block")
    for op in BACKENDS:
        p.add_argument(f"--backend-{op}", choices=valid_backends(op), default="auto")
    p.add_argument("--mamba-graph-max-positions", type=int, default=JobConfig().model.mamba_graph_max_positions,
                   help="CUDA graphs for Mamba2 layers of at most this many positions (the trainer's default); 0: none")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU; 0 = look it up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="JSON report path (default outputs/benchmark/FLAVOR.json)")
    p.add_argument("--trace", default="", help="also write the profiled step's Chrome trace here")
    p.add_argument("--top-kernels", type=int, default=15, help="costliest kernels of the profiled step to report")
    args = p.parse_args(argv)
    if (args.warmup < 0 or args.steps < 1 or args.rows < 1 or args.seq_len < 2 or args.mamba_graph_max_positions < 0
            or args.top_kernels < 1):
        p.error("need --warmup >= 0, --steps >= 1, --rows >= 1, --seq-len >= 2, --mamba-graph-max-positions >= 0 "
                "and --top-kernels >= 1")
    if args.force_compression:
        routed = HNetConfig.from_flavor(args.flavor).num_stages - 1
        try:
            args.force_compression = [float(n) for n in args.force_compression.split(",")]
        except ValueError:
            p.error(f"--force-compression: expected comma-separated numbers, got {args.force_compression!r}")
        if len(args.force_compression) != routed or min(args.force_compression) < 1:
            p.error(f"--force-compression: {args.flavor} needs {routed} value(s) >= 1, one per routed stage")
    else:
        args.force_compression = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (ops.BackendError, DataError) as e:  # a backend that cannot run here, unreadable data
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"outputs/benchmark/{args.flavor}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
