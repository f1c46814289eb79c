"""Trainer core: loss normalisation, LR schedules, param groups, divergence stop, configs, an end-to-end run."""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hnet import HNetConfig, HNetForCausalLM
from hnet_titan.config import ConfigError, JobConfig, Profiling
from hnet_titan.optim import build_param_groups, decay_shape, lr_factor, no_weight_decay
from hnet_titan.profiling import step_action
from hnet_titan.train import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"step: (\d+)  loss: ([\d.]+)  bpb: ([\d.]+)  ratio_loss: ")


def job(tmp_path, *args: str) -> JobConfig:
    base = ["--job.config_file", str(ROOT / "train_configs/debug.toml"), "--job.dump_folder", str(tmp_path),
            "--training.seq_len", "64", "--validation.no_enable", "--metrics.no_enable_tensorboard",
            "--data.val_fraction", "0.0"]
    return JobConfig.from_args(base + list(args))


def one_step_grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """Run one train step and capture the gradients the optimizer saw."""
    grads = {}
    step = trainer.optimizer.step

    def capture(*a, **k):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})
        return step(*a, **k)

    trainer.optimizer.step = capture
    stats = trainer.train_step(trainer.next_micro_batches(iter(trainer.train_loader)))
    return stats["ce"].item(), grads


def test_micro_batches_do_not_change_loss_or_gradients(tmp_path):
    """4 micro-batches of 1 row == 1 micro-batch of 4 rows (fp32): CE is normalised over the global batch.

    The ratio loss is off here: it is a product of means over a micro-batch (F * G, as in the reference),
    so splitting a batch changes it by design; its own averaging is tested below.
    """
    rows = ("--loss.ratio_weight", "0")
    accum = Trainer(job(tmp_path / "a", *rows, "--training.local_batch_size", "1", "--training.global_batch_size", "4"))
    whole = Trainer(job(tmp_path / "b", *rows, "--training.local_batch_size", "4", "--training.global_batch_size", "4"))
    assert accum.grad_accum == 4 and whole.grad_accum == 1
    whole.model.load_state_dict(accum.model.state_dict())
    ce_a, grads_a = one_step_grads(accum)
    ce_b, grads_b = one_step_grads(whole)
    assert ce_a == pytest.approx(ce_b, rel=1e-6)
    for name, g in grads_a.items():
        torch.testing.assert_close(g, grads_b[name], rtol=1e-5, atol=1e-7, msg=name)
    for t in (accum, whole):
        t.close()


def test_tf32_setting_sets_the_fp32_matmul_precision(tmp_path):
    """training.tf32 (default on) lets fp32 matmuls such as residual_proj use TF32 tensor cores."""
    before = torch.get_float32_matmul_precision()
    try:
        for flag, precision in (("--training.tf32", "high"), ("--training.no_tf32", "highest")):
            Trainer(job(tmp_path / flag, flag)).close()
            assert torch.get_float32_matmul_precision() == precision
        assert JobConfig().training.tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_nan_loss_stops_with_the_step(tmp_path):
    trainer = Trainer(job(tmp_path, "--training.steps", "5", "--metrics.log_freq", "1"))
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    trainer.model.lm_head.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="step 3: loss nan"):
        trainer.train()
    trainer.close()


def test_divergence_found_at_the_next_save_names_its_step_and_saves_nothing(tmp_path):
    """The loss is read on the host only at log steps and saves: step 2 diverges, the save of step 3 stops it."""
    trainer = Trainer(job(tmp_path, "--training.steps", "8", "--metrics.log_freq", "8", "--checkpoint.enable",
                          "--checkpoint.interval", "3"))
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("inf") if calls["n"] == 2 else output

    trainer.model.lm_head.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"step 2: loss (nan|inf)"):
        trainer.train()
    assert trainer.step == 3
    trainer.close()
    assert not list((tmp_path / "checkpoint").glob("step-*"))


def test_wsd_schedule_values():
    j = JobConfig.from_args(["--training.steps", "100", "--lr_scheduler.decay_type", "linear"])
    assert lr_factor(j, 0) == pytest.approx(1 / 11)  # warmup 10 steps, first step not at zero
    assert lr_factor(j, 9) == pytest.approx(10 / 11)
    assert lr_factor(j, 10) == 1.0 and lr_factor(j, 79) == 1.0  # stable until the last 20%
    assert lr_factor(j, 89) == pytest.approx(0.5)  # linear decay over steps 80..99
    assert lr_factor(j, 99) == pytest.approx(0.0)
    j.lr_scheduler.min_lr_factor = 0.1
    assert lr_factor(j, 99) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sqrt", "inverse_sqrt"])
def test_decay_shapes_fall_from_one_to_zero(kind):
    values = [decay_shape(kind, t / 20) for t in range(21)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))
    if kind == "inverse_sqrt":  # an inverse-square-root fall: steep first, flat last
        assert values[0] - values[1] > values[-2] - values[-1]
        assert decay_shape(kind, 1 / 99) == pytest.approx((1 / math.sqrt(2) - 0.1) / 0.9)


def test_cosine_and_constant_schedules():
    j = JobConfig.from_args(["--training.steps", "100", "--lr_scheduler.name", "cosine",
                             "--lr_scheduler.warmup_steps", "0"])
    assert lr_factor(j, 0) == 1.0 and lr_factor(j, 50) == pytest.approx(0.5)
    j.lr_scheduler.name = "constant"
    assert lr_factor(j, 99) == 1.0


def test_param_groups_carry_stage_multipliers_and_decay():
    j = JobConfig.from_args(["--loss.ratio_targets", "3,3", "--optimizer.lr", "1.0"])
    config = HNetConfig.from_flavor("hnet_2stage_L")
    model = HNetForCausalLM(config, device="meta")
    groups = build_param_groups(model, j, config)
    mults = {g["name"]: g["lr_multiplier"] for g in groups}
    assert mults["stage0/decay"] == pytest.approx(2.63, abs=0.01)
    assert mults["stage1/decay"] == pytest.approx(1.52, abs=0.01)
    assert mults["stage2/decay"] == pytest.approx(0.715, abs=0.01)
    assert all(g["lr"] == g["lr_multiplier"] for g in groups)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "backbone.encoder.layers.0.mixer.A_log" in names and "backbone.encoder.rmsnorm.weight" in names
    assert "backbone.main_network.main_network.pad_dimension" in names
    assert "backbone.residual_proj.bias" in names and "backbone.encoder.layers.0.mixer.D" in names
    assert "backbone.encoder.layers.0.mixer.in_proj.weight" not in names
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert no_weight_decay("x.mixer.dt_bias", ["*bias"]) and not no_weight_decay("x.Wqkv.weight", ["D"])


def test_explicit_multipliers_must_match_the_stages(tmp_path):
    with pytest.raises(ValueError, match="lr_multipliers has 2 values but the model has 3 stages"):
        Trainer(job(tmp_path, "--model.flavor", "debug_2stage", "--loss.ratio_targets", "3,3",
                    "--optimizer.lr_multipliers", "1.0,2.0"))


def test_ratio_targets_must_match_the_model(tmp_path):
    with pytest.raises(ValueError, match="ratio_targets has 1 values but the model has 2 routed stages"):
        Trainer(job(tmp_path, "--model.flavor", "debug_2stage"))
    assert not dist.is_initialized()  # the failed setup took its process group down with it


@pytest.mark.parametrize("name,lr,targets", [
    ("hnet_1stage_L", 6.25e-4, [6.0]), ("hnet_2stage_L", 6.25e-4, [3.0, 3.0]),
    ("hnet_1stage_XL", 5e-4, [6.0]), ("hnet_2stage_XL", 5e-4, [3.0, 3.0]),
])
def test_released_configs_follow_the_paper(name, lr, targets):
    j = JobConfig.from_args(["--job.config_file", str(ROOT / f"train_configs/{name}.toml")])
    assert (j.model.flavor, j.optimizer.lr, j.loss.ratio_targets) == (name, lr, targets)
    assert (j.training.seq_len, j.training.global_batch_size, j.loss.ratio_weight) == (8192, 256, 0.03)
    assert (j.lr_scheduler.name, j.lr_scheduler.warmup_fraction, j.lr_scheduler.decay_fraction,
            j.lr_scheduler.decay_type, j.optimizer.lr_multipliers) == ("wsd", 0.1, 0.2, "inverse_sqrt", "auto")


def test_debug_config_trains_end_to_end(tmp_path):
    """The default config, a few steps, through the real entry point: log lines parse and bpb falls."""
    out = subprocess.run(
        [sys.executable, "-m", "hnet_titan.train", "--job.config_file", "train_configs/debug.toml",
         "--job.dump_folder", str(tmp_path), "--training.steps", "8", "--metrics.log_freq", "1",
         "--validation.freq", "8", "--validation.steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [(int(m[1]), float(m[3])) for m in LOG_LINE.finditer(out.stdout)]
    assert [s for s, _ in steps] == list(range(1, 9))
    assert steps[-1][1] < steps[0][1] - 1.0
    assert "val/bpb" in out.stdout
    assert (tmp_path / "config.toml").is_file() and (tmp_path / "model_config.json").is_file()
    assert JobConfig.from_toml_string((tmp_path / "config.toml").read_text()).training.steps == 8


def test_profiling_windows_follow_the_global_step():
    R, S, W, N = "RECORD", "RECORD_AND_SAVE", "WARMUP", "NONE"
    actions = [step_action(Profiling(enable=True, freq=5, warmup=2, active=2), s).name for s in range(1, 11)]
    assert actions == [N, W, W, R, S, N, W, W, R, S]
    assert [step_action(Profiling(freq=3, warmup=0, active=3), s).name for s in (1, 2, 3)] == [R, R, S]
    message = r"profiling.warmup \(2\) \+ profiling.active \(4\) must be <= profiling.freq \(5\)"
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict({"profiling": {"freq": 5, "warmup": 2, "active": 4}})


def profiled(tmp_path, steps: int, freq: int, warmup: int, active: int) -> dict[str, int]:
    """Train with profiling on: {trace path: recorded steps in it}."""
    trainer = Trainer(job(tmp_path, "--training.steps", str(steps), "--profiling.enable", "--profiling.freq", str(freq),
                          "--profiling.warmup", str(warmup), "--profiling.active", str(active)))
    trainer.train()
    trainer.close()
    folder, traces = tmp_path / "profile_traces", {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        events = json.loads(gzip.open(path).read())["traceEvents"]
        assert any(e.get("name") == "Optimizer.step#AdamW.step" for e in events)  # whole steps, optimizer too
        traces[path.relative_to(folder).as_posix()] = sum(e.get("name", "").startswith("ProfilerStep#") for e in events)
    return traces


def test_trainer_writes_a_trace_per_profiling_window(tmp_path):
    # Windows end at steps 2 and 4; step 5 is a warm-up step, not saved.
    assert profiled(tmp_path / "a", steps=5, freq=2, warmup=1, active=1) == {
        "iteration_2/rank0_trace.json.gz": 1, "iteration_4/rank0_trace.json.gz": 1}
    # The run ends inside a window: what it recorded is saved.
    assert profiled(tmp_path / "b", steps=4, freq=5, warmup=1, active=2) == {"iteration_4/rank0_trace.json.gz": 1}


def test_user_errors_are_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "hnet_titan.train", "--training.stpes", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "did you mean 'training.steps'" in out.stdout and "Traceback" not in out.stdout + out.stderr
