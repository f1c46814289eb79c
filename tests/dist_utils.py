"""Run a training entry point on N local CPU ranks for multi-process tests.

Each rank is a plain ``python`` process with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT on a fresh port) in its own session, so a hard timeout can kill every
rank, and a rank that fails ends the others soon after instead of leaving them waiting on a
collective. Output goes to per-rank files (no pipe can fill up and stall a rank).

    result = run_ranks(["--job.config_file", path, "--training.steps", "3"], nproc=2)
    result.check()
    assert result.losses == {1: ..., 2: ..., 3: ...}
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_LOSS = re.compile(r"step: (\d+)\s+loss: (\S+)")


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; the race window is tiny)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_losses(text: str) -> dict[int, float]:
    """{step: loss} from the trainer's ``step: N  loss: X ...`` log lines (4 decimals)."""
    return {int(m.group(1)): float(m.group(2)) for m in STEP_LOSS.finditer(text)}


def read_metrics(dump_folder: str | Path, key: str = "loss") -> dict[int, float]:
    """{step: value} at full precision from rank 0's ``metrics.jsonl`` (training steps only)."""
    out = {}
    for line in (Path(dump_folder) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


@dataclass
class RunResult:
    returncodes: list[int]  # per rank; -9 for a rank killed at the timeout or after another failed
    outputs: list[str]  # per rank, stdout and stderr interleaved
    seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    @property
    def output(self) -> str:
        return self.outputs[0]

    @property
    def losses(self) -> dict[int, float]:
        """Rank 0's logged losses."""
        return parse_losses(self.outputs[0])

    def check(self) -> RunResult:
        """Raise with every rank's output tail unless all ranks exited 0 in time."""
        if not self.ok:
            tails = "\n".join(
                f"--- rank {r} (exit {rc}) ---\n{out[-4000:]}"
                for r, (rc, out) in enumerate(zip(self.returncodes, self.outputs))
            )
            why = f"timed out after {self.seconds:.0f} s" if self.timed_out else f"exit codes {self.returncodes}"
            raise AssertionError(f"distributed run failed ({why}):\n{tails}")
        return self


def run_ranks(
    args: list[str],
    nproc: int,
    *,
    module: str = "hnet_titan.train",
    script: str | Path | None = None,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    grace: float = 5.0,
) -> RunResult:
    """Start ``python -m module args`` (or ``python script args``) as ranks 0..nproc-1 and wait for all.

    ``env`` adds to the environment. OMP_NUM_THREADS defaults to 1 per rank as under torchrun.
    ``grace``: how long the other ranks may take to exit after one fails (see _wait_all).
    """
    entry = [str(script)] if script is not None else ["-m", module]
    base = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")]))
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc))
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        paths = [Path(logs) / f"rank{r}.log" for r in range(nproc)]
        procs = []
        start = time.monotonic()
        for rank, path in enumerate(paths):
            with open(path, "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, *entry, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                    env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}, start_new_session=True,
                ))
        timed_out = _wait_all(procs, start + timeout, grace)
        seconds = time.monotonic() - start
        outputs = [p.read_text(errors="replace") for p in paths]
    return RunResult([p.returncode for p in procs], outputs, seconds, timed_out)


def _wait_all(procs: list[subprocess.Popen], deadline: float, grace: float = 5.0) -> bool:
    """Wait for every process; kill the rest at the deadline, or `grace` seconds after one fails.

    The grace lets the other ranks exit on their own (a user error ends every rank), while a rank
    stuck in a collective with the failed one is killed long before the collective times out.
    True when the deadline passed.
    """
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            for p in procs:
                p.wait()
            return now > deadline
        time.sleep(0.05)
    return False
