"""Metrics: the trainer's JSONL / TensorBoard keys, plots, MFU arithmetic, forced compression, the benchmark."""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hnet.config import HNetConfig
from hnet.flops import training_flops
from hnet.model import HNetForCausalLM
from hnet.modules.dynamic_chunking import forced_boundaries
from hnet_titan import train
from hnet_titan.metrics import (
    ThroughputMeter,
    device_peak_tflops,
    lookup_peak_tflops,
    throughput_values,
)

ROOT = Path(__file__).resolve().parents[1]
# The documented keys of a training log step on CPU (no MFU without a peak, no allocator statistics).
TRAIN_KEYS_CPU = {
    "loss", "bpb", "ratio_loss/0", "bytes_per_chunk/0", "grad_norm", "lr", "bytes_per_sec", "tflops", "data_pct",
    "elapsed_s", "eta_s",
}
BENCHMARK_KEYS = {
    "flavor", "device", "dtype", "rows", "seq_len", "data", "compile", "tf32", "ac", "force_compression", "warmup_steps",
    "timed_steps", "backends", "bytes_per_sec", "tflops", "mfu_pct", "peak_tflops", "flops_per_byte",
    "bytes_per_chunk", "memory", "step_ms", "step_total_ms", "time_ms", "op_class_ms", "top_kernels_ms",
    "compiled_frames", "mamba_graph_max_positions", "gpu_idle",
}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_run_writes_metrics_tensorboard_and_plots(tmp_path: Path) -> None:
    dump = tmp_path / "run"
    rc = train.main([
        "--job.config_file", str(ROOT / "train_configs" / "debug.toml"), "--job.dump_folder", str(dump),
        "--training.steps", "4", "--training.seq_len", "64", "--training.local_batch_size", "2",
        "--metrics.log_freq", "2", "--validation.freq", "4", "--validation.steps", "1",
    ])
    assert rc == 0
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    for r in train_records:
        assert set(r) == {"step"} | TRAIN_KEYS_CPU
        assert r["bytes_per_sec"] > 0 and r["tflops"] > 0 and 0 <= r["data_pct"] <= 100
    assert [r for r in records if "val/bpb" in r] == [{"step": 4, "val/bpb": records[-1]["val/bpb"]}]

    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(dump / "tb" / "rank0"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == TRAIN_KEYS_CPU | {"val/bpb"}
    assert [e.step for e in events.Scalars("tflops")] == [2, 4]
    assert events.Scalars("loss")[-1].value == pytest.approx(train_records[-1]["loss"])

    figures = _script("plot_metrics").plot_runs([dump, dump], tmp_path / "figs")
    names = {p.name for p in figures}
    assert names == {"loss.png", "bytes_per_chunk.png", "throughput.png", "lr.png"}
    assert all(p.stat().st_size > 0 for p in figures)


def test_mfu_arithmetic() -> None:
    values = throughput_values(num_bytes=1000, flops=2 * 494.7e12, seconds=2.0, peak_tflops=989.4)
    assert values == pytest.approx({"bytes_per_sec": 500.0, "tflops": 494.7, "mfu_pct": 50.0})
    assert throughput_values(1000, 1e12, 1.0, None) == {"bytes_per_sec": 1000.0, "tflops": 1.0}


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_lookup_by_device_name(name: str, peak: float | None, monkeypatch, caplog) -> None:
    assert lookup_peak_tflops(name) == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    with caplog.at_level(logging.WARNING, logger="hnet_titan"):
        assert device_peak_tflops(torch.device("cuda", 0)) == peak
    assert ("MFU is not reported" in caplog.text) == (peak is None)
    assert device_peak_tflops(torch.device("cuda", 0), override=123.0) == 123.0


def test_cpu_has_no_mfu_unless_overridden() -> None:
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), override=50.0) == 50.0


def test_meter_counts_flops_of_every_micro_batch() -> None:
    config = HNetConfig.from_flavor("debug_2stage")
    steps = [  # per step, per micro-batch: cu_seqlens of stage 0, 1, 2
        [[[0, 40, 100], [0, 10, 30], [0, 4, 9]], [[0, 100], [0, 25], [0, 8]]],
        [[[0, 7, 60, 100], [0, 3, 20, 31], [0, 1, 6, 10]]],
    ]
    meter = ThroughputMeter(config, torch.device("cpu"), peak_tflops=None)
    assert meter.flush() == {}
    for step in steps:
        with meter.data_wait():
            cu = [[torch.tensor(c, dtype=torch.int32) for c in mb] for mb in step]
        meter.record_step(100 * len(step), cu)
    values = meter.flush()
    flops = sum(
        training_flops(config, [[b - a for a, b in itertools.pairwise(c)] for c in mb]).total
        for step in steps for mb in step
    )
    assert set(values) == {"bytes_per_sec", "tflops", "data_pct"}
    assert values["tflops"] * 1e12 / values["bytes_per_sec"] == pytest.approx(flops / 300, rel=1e-12)
    assert 0 < values["data_pct"] <= 100
    assert meter.flush() == {}


@pytest.mark.parametrize("flavor, every", [("debug", [4.0]), ("debug_2stage", [4.0, 2.0])])
def test_forced_compression_keeps_every_nth_position(flavor: str, every: list[float]) -> None:
    torch.manual_seed(0)
    lengths = [37, 5, 120, 1, 64, 90, 4]
    model = HNetForCausalLM(HNetConfig.from_flavor(flavor))
    model.init_weights()
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    with forced_boundaries(model, every):
        out = model(torch.randint(0, 256, (int(cu[-1]),)), cu)
    expected = lengths
    for n, router, stage_cu, inner_cu in zip(every, out.router_outputs, out.stage_cu_seqlens, out.stage_cu_seqlens[1:]):
        starts = stage_cu[:-1].long()
        assert router.boundary_mask[starts].all()
        expected = [math.ceil(length / n) for length in expected]
        assert torch.diff(inner_cu).tolist() == expected  # ceil(L / N) chunks per document of L positions
        p = router.boundary_prob
        assert torch.equal(router.selected_probs, torch.where(router.boundary_mask, p, 1 - p))


def test_benchmark_idle_gaps_count_time_no_kernel_runs() -> None:
    """Overlapping kernels (other streams) count once; gaps are named by the kernels either side, longest first."""
    idle = _script("benchmark").idle_gaps([
        (0.0, 100.0, "a"), (50.0, 300.0, "b"),  # overlap: busy until 300
        (1300.0, 1400.0, "c"),  # 1.0 ms gap after b
        (1400.0, 1500.0, "d"),  # back to back: no gap
        (1200.0, 1250.0, "e"),  # starts before c: splits that gap into 0.9 and 0.05 ms
        (2000.0, 2100.0, "f"),  # 0.5 ms after d
    ], top=2)
    assert idle["span_ms"] == pytest.approx(2.1)
    assert idle["idle_ms"] == pytest.approx(0.9 + 0.05 + 0.5)
    assert idle["gaps"] == [[pytest.approx(0.9), "b", "e"], [pytest.approx(0.5), "d", "f"]]


def test_benchmark_cpu_smoke(tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--flavor", "debug", "--rows", "2", "--seq-len", "64",
        "--warmup", "1", "--steps", "2", "--dtype", "fp32", "--force-compression", "4", "--out", str(report_path),
        "--top-kernels", "5",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert set(report) == BENCHMARK_KEYS
    assert report["device"] == "cpu" and report["mfu_pct"] is None and report["memory"] == {}
    assert report["gpu_idle"] is None  # no device timeline on CPU
    assert report["bytes_per_chunk"] == [4.0]  # 64-byte documents, a boundary every 4th byte
    assert report["bytes_per_sec"] > 0 and report["tflops"] > 0
    assert set(report["backends"]) == {"ssd", "conv", "attention", "norm"}
    assert set(report["time_ms"]) == {
        "stage0", "stage0.encoder", "stage0.dynamic_chunking", "stage0.decoder", "stage1", "stage1.main_network",
        "head",
    }
    assert set(report["step_ms"]) == {"forward", "backward", "optimizer", "total"}
    each = report["step_total_ms"]  # every timed step, and their mean is the reported step
    assert len(each) == 2 and min(each) > 0 and abs(sum(each) / 2 - report["step_ms"]["total"]) < 1e-6
    assert report["op_class_ms"] and set(report["op_class_ms"]) <= {
        "gemm", "ssd", "conv", "attention", "norm", "elementwise", "other",
    }
    top = report["top_kernels_ms"]  # [name, ms, calls], costliest first
    assert len(top) == 5 and sum(ms for _, ms, _ in top) <= sum(report["op_class_ms"].values()) + 1e-6
    assert [ms for _, ms, _ in top] == sorted((ms for _, ms, _ in top), reverse=True)
    assert all(isinstance(n, int) and n >= 1 for _, _, n in top)
    assert any(n > 1 for _, _, n in top)  # a debug step calls its costliest operators more than once
    assert report["compiled_frames"] == {"warmup": 0, "timed": 0}  # not compiled
    assert "bytes/s" in proc.stdout and "stage0.encoder" in proc.stdout
