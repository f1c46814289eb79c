"""Train with torchft fault tolerance on this machine: a lighthouse and N replica groups.

    python scripts/ft_launch.py --procs-per-group 1 -- --job.config_file train_configs/debug.toml \\
        --fault_tolerance.group_size 2
    python scripts/ft_launch.py --gpus-per-group 4 -- --job.config_file train_configs/hnet_2stage_L.toml \\
        --fault_tolerance.group_size 2 --fault_tolerance.min_replica_size 1

Everything after ``--`` goes to every group's trainer; the launcher adds ``--fault_tolerance.enable``,
``--fault_tolerance.replica_id`` and the lighthouse address, and takes the number of groups
(``fault_tolerance.group_size``), the lighthouse's minimum quorum (``min_replica_size``) and its
heartbeat timeout (``heartbeat_timeout_ms``) from the same arguments and TOML.

Each group is its own torchrun job: ``--procs-per-group`` CPU processes, or ``--gpus-per-group`` G
GPUs (group g takes the visible GPUs g*G .. g*G+G-1). torchrun restarts a group whose worker dies, up to
``--max-restarts`` times, and the restarted group rejoins the others live. Output goes to
``<log-dir>/lighthouse.log`` and ``<log-dir>/replica_<g>.log``. Ctrl-C or SIGTERM stops every group
after its current step (the trainer checkpoints if it is the writer), then the lighthouse.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hnet_titan.config import ConfigError, JobConfig

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    ours, trainer = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--procs-per-group", type=int, default=1, help="CPU processes per replica group")
    where.add_argument("--gpus-per-group", type=int, default=0, help="GPUs per replica group (0: CPU)")
    parser.add_argument("--port", type=int, default=29510, help="lighthouse port")
    parser.add_argument("--join-timeout-ms", type=int, default=1000,
                        help="how long the lighthouse waits for heartbeating groups to join a new quorum")
    parser.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts of a failed group")
    parser.add_argument("--log-dir", type=Path, default=Path("outputs/ft_logs"), help="lighthouse and group logs")
    parser.add_argument("--script", default="", help="Python file to run instead of -m hnet_titan.train")
    args = parser.parse_args(ours)
    if split == len(argv):
        parser.error("give the trainer's arguments after --, e.g. -- --job.config_file train_configs/debug.toml")
    return args, trainer


def start_lighthouse(job: JobConfig, args: argparse.Namespace, log) -> subprocess.Popen:
    binary = shutil.which("torchft_lighthouse") or str(Path(sys.executable).with_name("torchft_lighthouse"))
    ft = job.fault_tolerance
    cmd = [binary, "--bind", f"[::]:{args.port}", "--min_replicas", str(ft.min_replica_size),
           "--join_timeout_ms", str(args.join_timeout_ms), "--heartbeat_timeout_ms", str(ft.heartbeat_timeout_ms),
           "--quorum_tick_ms", "100"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:  # wait until it listens, so no group's first quorum request is refused
        try:
            socket.create_connection(("localhost", args.port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"error: the lighthouse did not start; see {log.name}")
            time.sleep(0.1)


def start_group(g: int, job: JobConfig, trainer: list[str], args: argparse.Namespace, log) -> subprocess.Popen:
    """One replica group: a torchrun job, in its own session so Ctrl-C reaches it only through us."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = args.gpus_per_group or args.procs_per_group
    if args.gpus_per_group:  # a slice of the GPUs this launcher sees
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(procs * job.fault_tolerance.group_size))))
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.split(",")[g * procs:(g + 1) * procs])
    else:  # torchrun sets 1 thread only for several processes; CPU groups share this machine's cores
        threads = (os.cpu_count() or 1) // (procs * job.fault_tolerance.group_size)
        env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    entry = [args.script] if args.script else ["-m", "hnet_titan.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(procs), "--max-restarts", str(args.max_restarts), *entry, *trainer,
           "--fault_tolerance.enable", "--fault_tolerance.replica_id", str(g),
           "--fault_tolerance.lighthouse", f"http://localhost:{args.port}"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    args, trainer = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        job = JobConfig.from_args([*trainer, "--fault_tolerance.enable"])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    groups: list[subprocess.Popen] = []
    stopped_by: list[int] = []

    def stop(signum: int, frame) -> None:  # torchrun passes SIGTERM on to its workers
        stopped_by.append(signum)
        print(f"{signal.Signals(signum).name}: stopping the replica groups after their current step")
        for group in groups:
            if group.poll() is None:
                group.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    with open(args.log_dir / "lighthouse.log", "w") as log:  # the children keep their own copies
        lighthouse = start_lighthouse(job, args, log)
    try:
        for g in range(job.fault_tolerance.group_size):
            if stopped_by:
                break
            with open(args.log_dir / f"replica_{g}.log", "w") as log:
                groups.append(start_group(g, job, trainer, args, log))
        print(f"lighthouse http://localhost:{args.port} and {len(groups)} replica group(s); logs in {args.log_dir}")
        codes = [group.wait() for group in groups]
    finally:
        lighthouse.terminate()
        lighthouse.wait()
    if stopped_by:  # torchrun exits 1 after a signal, however its workers ended
        return 128 + stopped_by[0]
    for g, code in enumerate(codes):
        print(f"replica group {g}: exit code {code}")
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
