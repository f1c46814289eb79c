"""torch.profiler traces of chosen training steps, one Chrome trace per window and rank.

Windows are placed by the run's global step, so a resumed run profiles the same steps a straight run
would: the window ending at step s (a multiple of ``profiling.freq``) records its last ``active`` steps
after ``warmup`` steps under the profiler that are not kept (the profiler's own start-up cost lands there).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from hnet_titan.config import Profiling


def step_action(cfg: Profiling, step: int) -> ProfilerAction:
    """What the profiler does during global step ``step`` (1-based)."""
    into_window = (step - 1) % cfg.freq  # 0 .. freq - 1; the window's last step is freq - 1
    if into_window >= cfg.freq - cfg.active:
        return ProfilerAction.RECORD_AND_SAVE if into_window == cfg.freq - 1 else ProfilerAction.RECORD
    if into_window >= cfg.freq - cfg.active - cfg.warmup:
        return ProfilerAction.WARMUP
    return ProfilerAction.NONE


def build_profiler(cfg: Profiling, folder: Path, rank: int,
                   current_step: Callable[[], int]) -> torch.profiler.profile | None:
    """A started profiler, or None when profiling is off. The training loop calls its ``step()`` between
    committed steps (not after the last) and ``stop()`` at the end, which saves a window the run ends in.
    ``current_step()`` is the last completed global step: the profiler starts at the one after it, and
    traces go to ``folder/iteration_{step}/rank{rank}_trace.json.gz``, named by it when a window ends."""
    if not cfg.enable:
        return None
    first_step = current_step() + 1

    def save(prof: torch.profiler.profile) -> None:
        path = folder / f"iteration_{current_step()}" / f"rank{rank}_trace.json.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = torch.profiler.profile(
        activities=activities, schedule=lambda n: step_action(cfg, first_step + n), on_trace_ready=save,
        record_shapes=cfg.record_shapes, with_stack=cfg.with_stack,
    )
    prof.start()
    return prof
