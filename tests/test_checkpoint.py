"""Checkpointing: bit-exact resume, crash safety, resharding and every checkpoint option (CPU, gloo).

Multi-rank tests run the trainer itself on CPU ranks (tests/dist_utils.py), entering through this
file, which injects faults when asked: ``CKPT_TEST_CRASH_AT=N`` SIGKILLs every rank inside its write
of step N's checkpoint, ``CKPT_TEST_SIGTERM_AT=N`` sends rank 0 alone a SIGTERM during step N.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from hnet import HNetConfig, HNetForCausalLM
from hnet.config import FLAVORS
from hnet_titan.checkpoint import CheckpointManager, TrainingParts
from hnet_titan.config import ConfigError, JobConfig
from hnet_titan.data import DataError, build_dataloader
from hnet_titan.losses import cross_entropy_sum
from hnet_titan.model_io import CheckpointError, read_state_dict, resolve_checkpoint
from hnet_titan.optim import build_lr_scheduler, build_optimizer

from dist_utils import RunResult, read_metrics, run_ranks

pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),  # async saves without a process group
]

ROOT = Path(__file__).resolve().parents[1]
NPROC = 2
STEPS = 8
# Tiny steps; a cosine schedule whose LR never reaches 0, so every step moves the weights and the
# schedule depends on training.steps.
TRAIN_ARGS = [
    "--job.config_file", str(ROOT / "train_configs" / "debug.toml"),
    "--training.seq_len", "128", "--training.local_batch_size", "2", "--training.steps", str(STEPS),
    "--lr_scheduler.name", "cosine", "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.min_lr_factor", "0.1",
    "--validation.no_enable", "--metrics.log_freq", "1", "--metrics.no_enable_tensorboard",
    "--checkpoint.enable",
]


# ---------------------------------------------------------------- runs of the trainer


def _train(dump: Path, args: list[str], nproc: int = NPROC, **env: str) -> RunResult:
    """The trainer on ``nproc`` ranks, through this file (see the bottom) so tests can inject faults."""
    return run_ranks([*TRAIN_ARGS, "--job.dump_folder", str(dump), *args], nproc, script=__file__, env=env)


def _metrics(dump: Path) -> dict[int, tuple[float, float, float]]:
    """(loss, grad_norm, lr) per step at full precision; a resumed run's lines replace the crashed one's."""
    loss, grad_norm, lr = (read_metrics(dump, key) for key in ("loss", "grad_norm", "lr"))
    return {step: (loss[step], grad_norm[step], lr[step]) for step in loss}


def _steps(dump: Path) -> list[str]:
    return sorted(p.name for p in (dump / "checkpoint").iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 8-step job on NPROC ranks, run straight and run with a crash.

    straight: uninterrupted, async saves every 4 steps, keeping the latest 1.
    seed:     one process writes the initial weights as a seed checkpoint in the crashed run's folder.
    crashed:  starts from the seed, saves every 2 steps, and every rank is SIGKILLed while writing
              step 6 (steps 2 and 4 complete).
    resumed:  the crashed run started again: it must resume from step 4 and finish as `straight` did.
    """
    root = tmp_path_factory.mktemp("runs")
    straight, crashed = root / "straight", root / "crashed"
    a = _train(straight, ["--checkpoint.interval", "4", "--checkpoint.async_mode", "async",
                          "--checkpoint.keep_latest_k", "1"]).check()
    seed = _train(crashed, ["--checkpoint.create_seed_checkpoint"], nproc=1).check()
    b = _train(crashed, ["--checkpoint.interval", "2"], CKPT_TEST_CRASH_AT="6")
    assert -signal.SIGKILL in b.returncodes and not b.timed_out, b.output[-3000:]
    after_crash = _steps(crashed)
    c = _train(crashed, ["--checkpoint.interval", "2"]).check()
    return SimpleNamespace(straight=straight, crashed=crashed, after_crash=after_crash, straight_log=a.output,
                           seed_log=seed.output, crashed_log=b.output, resumed_log=c.output)


def test_resume_after_kill_is_bit_exact(runs):
    straight, resumed = _metrics(runs.straight), _metrics(runs.crashed)
    assert sorted(straight) == sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == straight[step], f"step {step}: {resumed[step]} != {straight[step]}"
    final_straight = read_state_dict(resolve_checkpoint(runs.straight / "checkpoint", STEPS))
    final_resumed = read_state_dict(resolve_checkpoint(runs.crashed / "checkpoint", STEPS))
    assert final_straight.keys() == final_resumed.keys()
    for key, value in final_straight.items():
        assert torch.equal(value, final_resumed[key]), key


def test_kill_during_save_resumes_from_previous_checkpoint(runs):
    assert runs.after_crash == ["step-0", "step-2", "step-4", "step-6.tmp"]
    log = runs.resumed_log
    assert "step-6.tmp, a checkpoint whose save did not finish" in log
    assert f"resumed from {runs.crashed / 'checkpoint' / 'step-4'}" in log
    assert "step: 5 " in log and "step: 4 " not in log
    assert _steps(runs.crashed) == ["step-0", "step-2", "step-4", "step-6", "step-8"]


def test_seed_checkpoint_starts_another_layout_identically(runs):
    """Written by one process, loaded by NPROC: the bit-exact test above holds from step 1 on."""
    assert "wrote the seed checkpoint" in runs.seed_log and "step: 1 " not in runs.seed_log
    assert f"starting from the seed checkpoint {runs.crashed / 'checkpoint' / 'step-0'}" in runs.crashed_log


def test_async_save_keeps_latest_k(runs):
    assert "saving checkpoint step-4 in the background" in runs.straight_log
    assert _steps(runs.straight) == [f"step-{STEPS}"]


# ---------------------------------------------------------------- in-process manager tests


@pytest.fixture(autouse=True)
def _isolated():
    """One thread (tiny ops on a shared CPU are far faster), and RNG states back after a load set them."""
    threads, states = torch.get_num_threads(), (random.getstate(), np.random.get_state(), torch.get_rng_state())
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


class Counters:
    """The trainer's Stateful counters."""

    def __init__(self) -> None:
        self.step = self.bytes_seen = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "bytes_seen": self.bytes_seen}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.step, self.bytes_seen = state_dict["step"], state_dict["bytes_seen"]


class Run:
    """A single-process training setup around a CheckpointManager, as the trainer builds it."""

    def __init__(self, dump: Path, *, config: HNetConfig | None = None, seed: int = 0, steps: int = 10,
                 dp_rank: int = 0, dp_world_size: int = 1, **checkpoint) -> None:
        self.config = config or HNetConfig.from_flavor("debug")
        targets = [3.0] * (self.config.num_stages - 1)
        self.job = JobConfig.from_dict({
            "job": {"dump_folder": str(dump)}, "training": {"steps": steps}, "loss": {"ratio_targets": targets},
            "checkpoint": {"enable": True, "interval": 1, **checkpoint},
        })
        torch.manual_seed(seed)
        self.model = HNetForCausalLM(self.config)
        self.model.init_weights()
        self.optimizer = build_optimizer(self.model, self.job, self.config)
        self.scheduler = build_lr_scheduler(self.optimizer, self.job)
        self.loader = build_dataloader(seq_len=64, local_batch_size=2, dp_rank=dp_rank, dp_world_size=dp_world_size)
        self.counters = Counters()
        self.manager = CheckpointManager(
            self.job, TrainingParts(self.model, self.optimizer, self.scheduler, self.loader, self.counters),
            model_config=self.config, dp_rank=dp_rank, dp_world_size=dp_world_size,
        )
        self._batches = None

    def load(self) -> Path | None:
        return self.manager.load()

    def train(self, steps: int) -> None:
        """Train and save as the trainer does after each step."""
        for _ in range(steps):
            batch = self._next()
            out = self.model(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"])
            (cross_entropy_sum(out.logits, batch["labels"]) / batch["labels"].numel()).backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.counters.step += 1
            self.counters.bytes_seen += batch["input_ids"].numel()
            self.manager.save(self.counters.step, last=self.counters.step == self.job.training.steps)
        self.manager.close()

    def next_batch(self) -> torch.Tensor:
        return self._next()["input_ids"]

    def _next(self) -> dict:
        if self._batches is None:  # iter() after load(): the loader resumes from its loaded state
            self._batches = iter(self.loader)
        return next(self._batches)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def _equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_restores_every_state(tmp_path):
    first = Run(tmp_path)
    first.train(3)
    expected_batch = first.next_batch()
    second = Run(tmp_path, seed=1)
    assert second.load() == tmp_path / "checkpoint" / "step-3"
    assert (second.counters.step, second.counters.bytes_seen) == (3, first.counters.bytes_seen)
    assert _equal_weights(second.weights(), first.weights())
    assert second.scheduler.state_dict() == first.scheduler.state_dict()
    for state, loaded in zip(first.optimizer.state.values(), second.optimizer.state.values()):
        assert all(torch.equal(state[k], loaded[k]) for k in state)
    assert torch.equal(second.next_batch(), expected_batch)


def test_reshard_two_ranks_to_one(runs, tmp_path):
    """The 2-rank run's final checkpoint loads into one plain process: model and optimizer exactly."""
    folder = runs.straight / "checkpoint"
    run = Run(runs.straight, exclude_from_loading=["dataloader"])
    run.load()
    assert run.counters.step == STEPS
    assert _equal_weights(run.weights(), read_state_dict(resolve_checkpoint(folder, STEPS)))
    consolidated = tmp_path / "consolidated.pt"
    dcp_to_torch_save(folder / f"step-{STEPS}", consolidated)
    saved = torch.load(consolidated, weights_only=False)["optimizer"]["state"]
    names = {param: name for name, param in run.model.named_parameters()}
    for param, state in run.optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, saved[names[param]][key]), (names[param], key)

    with pytest.raises(DataError, match=r"saved by 2 data-parallel ranks but this run has 1.*"
                                        r"--checkpoint.exclude_from_loading dataloader"):
        Run(runs.straight).load()


def test_dataloader_of_another_dp_layout_is_refused(tmp_path):
    Run(tmp_path, dp_rank=0, dp_world_size=2).train(1)  # rank 0's checkpoint of a 2-rank layout
    with pytest.raises(DataError, match="exclude_from_loading dataloader"):
        Run(tmp_path).load()


def test_keep_latest_k_and_load_step(tmp_path):
    Run(tmp_path, keep_latest_k=2).train(4)
    assert _steps(tmp_path) == ["step-3", "step-4"]
    run = Run(tmp_path, load_step=3)
    assert run.load().name == "step-3" and run.counters.step == 3
    with pytest.raises(CheckpointError, match=r"load_step = 1: .* no complete step-1; complete steps: \[3, 4\]"):
        Run(tmp_path, load_step=1).load()


def test_partial_save_is_ignored_and_removed(tmp_path):
    Run(tmp_path).train(2)
    partial = tmp_path / "checkpoint" / "step-3.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    run = Run(tmp_path)
    assert run.load().name == "step-2"
    assert not partial.exists()


def test_exclude_from_loading(tmp_path):
    trained = Run(tmp_path)
    trained.train(2)
    fresh = Run(tmp_path / "fresh")
    run = Run(tmp_path, exclude_from_loading=["dataloader", "optimizer", "lr_scheduler"])
    run.load()
    assert run.counters.step == 2 and _equal_weights(run.weights(), trained.weights())
    assert not run.optimizer.state
    assert run.scheduler.state_dict() == fresh.scheduler.state_dict()
    assert torch.equal(run.next_batch(), fresh.next_batch())
    with pytest.raises(ConfigError, match="exclude_from_loading: unknown state 'optim'; valid: model, optimizer"):
        Run(tmp_path, exclude_from_loading=["optim"])


@pytest.mark.parametrize(
    "config, problem",
    [
        (HNetConfig.from_flavor("debug_2stage"), r"missing key '[\w.]+'.*unexpected key '[\w.]+'"),
        (HNetConfig.from_dict({**FLAVORS["debug"], "d_intermediate": [0, 128]}),
         r"shape mismatch '[\w.]+fc1.weight' is \(384, 96\) in the checkpoint but \(256, 96\) in the model"),
    ],
    ids=["other layout", "other width"],
)
def test_checkpoint_of_another_model_names_the_key(tmp_path, config, problem):
    Run(tmp_path).train(1)
    with pytest.raises(CheckpointError, match=rf"checkpoint .*step-1 does not fit the model: {problem}"):
        Run(tmp_path, config=config).load()


def test_seed_checkpoint_and_initial_load_path(tmp_path):
    seed = Run(tmp_path / "seed")
    path = seed.manager.save_seed()
    assert path == tmp_path / "seed" / "checkpoint" / "step-0"
    assert {k.split(".")[0] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata} == {"model"}
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        seed.manager.save_seed()

    resumed = Run(tmp_path / "seed", seed=1)  # another init: the seed's weights must win
    assert resumed.load() == path and resumed.counters.step == 0
    assert _equal_weights(resumed.weights(), seed.weights())
    resumed.train(1)  # and training goes on from it

    finetune = Run(tmp_path / "finetune", seed=2, initial_load_path=str(path))
    assert finetune.load() == path and _equal_weights(finetune.weights(), seed.weights())
    finetune.train(1)
    again = Run(tmp_path / "finetune", seed=2, initial_load_path=str(path))
    assert again.load().name == "step-1"  # the run's own checkpoint wins over initial_load_path
    with pytest.raises(CheckpointError, match="initial_load_path .*nowhere is not a complete DCP checkpoint"):
        Run(tmp_path / "other", initial_load_path=str(tmp_path / "nowhere")).load()


def test_last_save_exports_the_model_only(tmp_path):
    Run(tmp_path, steps=2, last_save_model_only=True, export_dtype="bfloat16").train(2)
    export = read_state_dict(resolve_checkpoint(tmp_path / "checkpoint", 2))
    kept_fp32 = {k for k, v in export.items() if v.dtype == torch.float32}
    assert kept_fp32 and all("residual_proj" in k or k.endswith(".D") for k in kept_fp32)
    assert all(v.dtype == torch.bfloat16 for k, v in export.items() if k not in kept_fp32)
    with pytest.raises(CheckpointError, match="holds only model weights .*--checkpoint.load_step"):
        Run(tmp_path).load()
    assert Run(tmp_path, load_step=1).load().name == "step-1"


def test_async_save_in_one_process(tmp_path):
    run = Run(tmp_path, async_mode="async", interval=2)
    run.train(4)  # close() waits for and publishes the last one
    assert _steps(tmp_path) == ["step-2", "step-4"]
    assert Run(tmp_path).load().name == "step-4"


# ---------------------------------------------------------------- the trainer's command line


def test_checkpoint_of_another_model_stops_the_trainer_with_one_line(runs, tmp_path):
    initial = runs.straight / "checkpoint" / f"step-{STEPS}"
    other_model = ["--model.flavor", "debug_2stage", "--loss.ratio_targets", "3,3"]
    result = _train(tmp_path, [*other_model, "--checkpoint.initial_load_path", str(initial)], nproc=1)
    assert result.returncodes == [2], result.output[-3000:]
    errors = [line for line in result.output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{initial} does not fit the model: missing key 'backbone." in errors[0]
    assert "Traceback" not in result.output


def test_sigterm_on_one_rank_stops_every_rank_at_the_next_step_and_saves(tmp_path):
    """The ranks learn of rank 0's signal (during step 3) from a reduction read one step later."""
    result = _train(tmp_path, ["--training.steps", "1000", "--checkpoint.interval", "1000"],
                    CKPT_TEST_SIGTERM_AT="3").check()
    assert all("stopped at step 4" in output for output in result.outputs)
    assert max(read_metrics(tmp_path)) == 4
    assert _steps(tmp_path) == ["step-4"]


# ---------------------------------------------------------------- a rank, when run as a script


def _crash_in_save(step: int) -> None:
    """SIGKILL this rank inside its write of step-<step>.tmp: a crash in the middle of a save."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    write_data = FileSystemWriter.write_data

    def crashing_write_data(self, plan, planner):
        if Path(self.path).name == f"step-{step}.tmp":
            os.kill(os.getpid(), signal.SIGKILL)
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = crashing_write_data


def _sigterm_in_step(step: int) -> None:
    """Rank 0 alone gets a SIGTERM while it computes step <step>."""
    from hnet_titan.train import Trainer

    train_step = Trainer.train_step

    def signalled_train_step(self, micro_batches):
        if self.rank == 0 and self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, micro_batches)

    Trainer.train_step = signalled_train_step


if __name__ == "__main__":
    from hnet_titan.train import main

    if "CKPT_TEST_CRASH_AT" in os.environ:
        _crash_in_save(int(os.environ["CKPT_TEST_CRASH_AT"]))
    if "CKPT_TEST_SIGTERM_AT" in os.environ:
        _sigterm_in_step(int(os.environ["CKPT_TEST_SIGTERM_AT"]))
    sys.exit(main(sys.argv[1:]))
