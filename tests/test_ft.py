"""Fault tolerance with torchft (CPU, gloo, real processes).

``scripts/ft_launch.py`` starts a lighthouse and two replica groups of the debug model (torchrun jobs
that restart a dead worker). Without failures they train exactly as one job of two FSDP ranks. Then
group 0, the checkpoint writer, is killed mid-run; group 1 must go on alone within the heartbeat
timeout and take over the checkpoints; the restarted group 0 must heal from it and train on with
bitwise equal parameters, each group's data continuing where its own committed steps left it.

Run as a script, this file is such a worker: the trainer, recording after each committed step the
time and a SHA1 of this rank's parameter shards in ``$FT_TEST_RECORDS/<replica>.<rank>.<pid>.jsonl``.
Group 0's first worker holds at the start of step ``KILL_AT`` (after its quorum) until it is killed,
so the kill always lands while the other group waits for it in the step's gradient all-reduce; group
1 holds at step ``KILL_AT + ALONE`` until group 0's worker has restarted, so that it is still
training when group 0 comes back, however slow the restart; a restarted worker of group 0 waits until
group 1 has committed step ``KILL_AT + ALONE - 1``, so that group 1 trains those steps alone, however
fast the restart.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torchft")

from dist_utils import free_port, read_metrics, run_ranks  # noqa: E402
from hnet_titan.ft import DataCursors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
KILL_AT = 11  # group 0 is killed inside this step
ALONE = 8  # group 1 trains at least this many steps alone
HEARTBEAT_S = 2.0
INTERVAL = 5  # checkpoint interval
TRAIN_ARGS = [
    "--job.config_file", str(ROOT / "train_configs" / "debug.toml"),
    "--training.seq_len", "128", "--training.local_batch_size", "2", "--training.steps", str(STEPS),
    "--validation.no_enable", "--metrics.log_freq", "1", "--metrics.no_enable_tensorboard",
    "--checkpoint.enable", "--checkpoint.interval", str(INTERVAL),
    "--fault_tolerance.group_size", "2", "--fault_tolerance.heartbeat_timeout_ms", str(int(HEARTBEAT_S * 1000)),
    "--fault_tolerance.process_group_timeout_ms", "5000", "--fault_tolerance.quorum_timeout_s", "30",
]
STEP_PAUSE_S = 0.1  # per step, so the run outlasts the restarted group's start-up
TIMEOUT_S = 240


def _worker() -> int:
    """The trainer, recording each committed step of this process."""
    import torch
    from torch.distributed.tensor import DTensor

    from hnet_titan import train

    replica = sys.argv[sys.argv.index("--fault_tolerance.replica_id") + 1]
    records = Path(os.environ["FT_TEST_RECORDS"])
    path = records / f"{replica}.{os.environ['RANK']}.{os.getpid()}.jsonl"
    out = open(path, "a")
    out.write(json.dumps({"start": time.time()}) + "\n")
    out.flush()
    if replica == "0" and os.environ["TORCHELASTIC_RESTART_COUNT"] != "0":
        # A fast restart would rejoin before group 1 has trained ALONE steps alone: wait for them first.
        while not any(json.loads(line).get("step", 0) >= KILL_AT + ALONE - 1
                      for path in records.glob(f"1.{os.environ['RANK']}.*.jsonl")
                      for line in path.read_text().split("\n")[:-1]):
            time.sleep(0.05)
    train_step = train.Trainer.train_step

    def recording_train_step(self, micro_batches):
        if replica == "0" and self.step + 1 == KILL_AT and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            out.write(json.dumps({"hold": KILL_AT}) + "\n")
            out.flush()
            time.sleep(TIMEOUT_S)
        if replica == "1" and self.step + 1 == KILL_AT + ALONE:
            while len(list(records.glob("0.0.*.jsonl"))) < 2:
                time.sleep(0.05)
        time.sleep(STEP_PAUSE_S)
        stats = train_step(self, micro_batches)
        if stats["committed"]:
            digest = hashlib.sha1()
            for p in self.model.parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                digest.update(local.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            out.write(json.dumps({"step": self.step + 1, "time": time.time(), "sha1": digest.hexdigest()}) + "\n")
            out.flush()
        return stats

    train.Trainer.train_step = recording_train_step
    return train.main()


# ---------------------------------------------------------------- helpers


def _records(folder: Path, replica: int, rank: int) -> list[dict]:
    """One entry per process of a group's rank, in start order: pid, start time, committed steps."""
    procs = []
    for path in folder.glob(f"{replica}.{rank}.*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().split("\n")[:-1]]  # whole lines only
        if not lines:
            continue
        procs.append({"pid": int(path.name.split(".")[2]), "start": lines[0]["start"],
                      "commits": [r for r in lines if "step" in r], "held": any("hold" in r for r in lines)})
    return sorted(procs, key=lambda p: p["start"])


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun puts its workers in new sessions: killpg misses them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and everything it started, if it is still running."""
    if proc.poll() is not None:
        return
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))


def _launch(logs: Path, procs: int, args: list[str], records: Path | None = None) -> subprocess.Popen:
    """scripts/ft_launch.py with this file as the workers (recording into ``records``) or the trainer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RUST_LOG": "warn",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    script = []
    if records is not None:
        env["FT_TEST_RECORDS"], script = str(records), ["--script", __file__]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "ft_launch.py"), "--procs-per-group", str(procs), "--port",
         str(free_port()), "--max-restarts", "1", "--log-dir", str(logs), *script, "--", *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _saved_steps(log: Path) -> set[int]:
    return {int(s) for s in re.findall(r"saved checkpoint \S*step-(\d+) ", log.read_text())}


# ---------------------------------------------------------------- the tests


def test_data_cursors_keep_the_newest_and_checkpoint_steps(tmp_path):
    cursors = DataCursors(tmp_path, keep_every=5)
    for step in range(1, 13):
        cursors.save(step, {"after": step})
    assert cursors.steps() == [5, 10, 12]
    assert cursors.load(20) == (12, {"after": 12})  # a live rejoin: after the group's last commit
    assert cursors.load(11) == (10, {"after": 10})  # training went back to step 11: 12 is dropped
    assert cursors.steps() == [5, 10]
    assert cursors.load(4) is None and cursors.steps() == []


def test_replica_groups_train_as_data_parallel_ranks(tmp_path):
    """Two replica groups of one process train as one job of two FSDP ranks: the same data shards and
    the mean over the global batch once (losses and gradient norms agree to float rounding)."""
    args = [*TRAIN_ARGS, "--training.steps", "6", "--checkpoint.no_enable"]
    run_ranks([*args, "--job.dump_folder", str(tmp_path / "plain")], nproc=2).check()
    launcher = _launch(tmp_path / "logs", 1, [*args, "--job.dump_folder", str(tmp_path / "ft"),
                                              "--fault_tolerance.min_replica_size", "2"])
    try:
        launcher.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not finish:\n" + _tails(tmp_path / "logs"))
    finally:
        _kill_tree(launcher)
    assert launcher.returncode == 0, _tails(tmp_path / "logs")
    for key in ("loss", "grad_norm"):
        expected = read_metrics(tmp_path / "plain", key)
        for replica in (0, 1):
            got = read_metrics(tmp_path / "ft" / f"replica_{replica}", key)
            assert got == pytest.approx(expected, rel=1e-6), (key, replica, got, expected)


@pytest.mark.parametrize("procs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_replica_group_killed_and_rejoined(tmp_path, procs):
    records, logs, dump = tmp_path / "records", tmp_path / "logs", tmp_path / "dump"
    records.mkdir()
    launcher = _launch(logs, procs, [*TRAIN_ARGS, "--job.dump_folder", str(dump)], records)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not all((p := _records(records, 0, r)) and p[0]["held"] for r in range(procs)):
            if launcher.poll() is not None or time.monotonic() > deadline:
                pytest.fail("group 0 never reached the kill step:\n" + _tails(logs))
            time.sleep(0.05)
        for rank in range(procs):  # the workers themselves (torchrun's children), as when a node fails
            os.kill(_records(records, 0, rank)[0]["pid"], signal.SIGKILL)
        killed_at = time.time()
        launcher.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not finish:\n" + _tails(logs))
    finally:
        _kill_tree(launcher)
    assert launcher.returncode == 0, launcher.stdout.read().decode() + _tails(logs)

    (killed, restarted), (survivor,) = _records(records, 0, 0), _records(records, 1, 0)
    steps = {name: [c["step"] for c in p["commits"]] for name, p in
             {"killed": killed, "restarted": restarted, "survivor": survivor}.items()}

    # Every process commits strictly increasing steps, group 0 no step twice over its two lives, and
    # both groups end at the last step. The survivor's step in flight at the kill failed and was retried.
    for name, s in steps.items():
        assert s == sorted(set(s)), f"{name} committed steps out of order or twice: {s}"
    assert steps["killed"][-1] == KILL_AT - 1 < steps["restarted"][0], steps
    assert steps["restarted"][-1] == steps["survivor"][-1] == STEPS
    assert f"step {KILL_AT} was not committed" in (logs / "replica_1.log").read_text()

    # The survivor stalls about one heartbeat timeout, then steps at its usual rate.
    times = [c["time"] for c in survivor["commits"]]
    before = [b - a for a, b in zip(times, times[1:]) if b < killed_at]
    after_kill = [t for t in times if t > killed_at]
    detect_s = after_kill[0] - killed_at
    alone = [b - a for a, b in zip(after_kill, after_kill[1:]) if b < restarted["commits"][0]["time"]]
    assert detect_s < HEARTBEAT_S + 3.0, f"survivor stalled {detect_s:.2f} s"
    assert len(alone) >= ALONE - 1 and statistics.median(alone) < 3 * statistics.median(before) + 0.1, alone

    # The restarted group heals and trains on with the survivor: each rank's parameter shards are
    # bitwise equal to the survivor's same rank at every step both committed, before the kill and
    # after the rejoin.
    for rank in range(procs):
        (killed_r, restarted_r), (survivor_r,) = _records(records, 0, rank), _records(records, 1, rank)
        survivor_sha = {c["step"]: c["sha1"] for c in survivor_r["commits"]}
        # A group that starts late joins by healing, so its first life may begin a few steps in.
        for proc, least in ((killed_r, 3), (restarted_r, 5)):
            common = [c for c in proc["commits"] if c["step"] in survivor_sha]
            assert len(common) >= least, (rank, steps)
            assert all(c["sha1"] == survivor_sha[c["step"]] for c in common), f"rank {rank}: parameters differ"

    # Each rank's data stream advanced by exactly the batches of the steps its group committed.
    for replica, committed in ((0, len(steps["killed"]) + len(steps["restarted"])), (1, len(steps["survivor"]))):
        for rank in range(procs):
            path = dump / f"replica_{replica}" / "data" / f"rank{rank}" / f"step-{STEPS}.pkl"
            assert pickle.loads(path.read_bytes())["dataset_state"]["num_batches"] == committed, (replica, rank)

    # One writer per checkpoint: group 1 while group 0 was away, group 0 (the lowest) otherwise.
    by_0, by_1 = _saved_steps(logs / "replica_0.log"), _saved_steps(logs / "replica_1.log")
    away = {s for s in range(INTERVAL, STEPS + 1, INTERVAL) if KILL_AT <= s < steps["restarted"][0]}
    assert not by_0 & by_1 and by_1 == away and STEPS in by_0, (by_0, by_1, steps)
    assert (dump / "checkpoint" / f"step-{STEPS}").is_dir()

    for replica in (0, 1):
        losses = read_metrics(dump / f"replica_{replica}")
        assert max(losses) == STEPS and math.isfinite(losses[STEPS]), losses
    recover_s = restarted["commits"][0]["time"] - killed_at
    first_commit_s = restarted["commits"][0]["time"] - restarted["start"]
    print(f"\n{procs} process(es) per group: survivor stall after the kill {detect_s:.2f} s (heartbeat timeout "
          f"{HEARTBEAT_S:g} s); killed group's first commit again {recover_s:.2f} s after the kill, "
          f"{first_commit_s:.2f} s after its restarted worker started; steps alone {len(alone) + 1}, "
          f"together after the rejoin {len(steps['restarted'])}")


if __name__ == "__main__":
    sys.exit(_worker())
