"""Plot training curves from the metrics.jsonl of one or several runs, one PNG per figure.

    python scripts/plot_metrics.py --runs outputs/run_a outputs/run_b --out figs/

Figures: loss.png (loss; bpb with val/bpb dashed), bytes_per_chunk.png (one panel per routed stage),
throughput.png (bytes/s, TFLOP/s and MFU per device), lr.png. A figure, or a panel, without data in any
run is left out. Runs are labelled by their folder names; a step logged twice (a resumed run) keeps
its last value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Series = dict[str, tuple[list[int], list[float]]]
# Figure -> panels, each (title, keys); keys after the first are drawn dashed in the run's colour.
FIGURES: dict[str, list[tuple[str, list[str]]]] = {
    "loss": [("loss (nats)", ["loss"]), ("bits per byte (dashed: validation)", ["bpb", "val/bpb"])],
    "throughput": [("bytes/s per device", ["bytes_per_sec"]), ("TFLOP/s per device", ["tflops"]),
                   ("MFU %", ["mfu_pct"])],
    "lr": [("learning rate (base)", ["lr"])],
}


def read_run(folder: Path) -> Series:
    """{key: (steps, values)} from ``folder/metrics.jsonl``."""
    by_key: dict[str, dict[int, float]] = {}
    with open(folder / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            step = record.pop("step")
            for key, value in record.items():
                by_key.setdefault(key, {})[step] = value
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def stage_panels(runs: dict[str, Series]) -> list[tuple[str, list[str]]]:
    keys = sorted({k for series in runs.values() for k in series if k.startswith("bytes_per_chunk/")})
    return [(f"bytes per chunk, stage {k.split('/')[1]}", [k]) for k in keys]


def plot_figure(runs: dict[str, Series], panels: list[tuple[str, list[str]]], path: Path) -> bool:
    """Draw the panels that have data in some run; False (nothing written) when none has."""
    panels = [(title, keys) for title, keys in panels if any(k in s for s in runs.values() for k in keys)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for i, (label, series) in enumerate(runs.items()):
            for j, key in enumerate(keys):
                if key in series:
                    steps, values = series[key]
                    ax.plot(steps, values, color=f"C{i}", linestyle="-" if j == 0 else "--",
                            marker=None if j == 0 else "o", markersize=3, label=label if j == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_runs(folders: list[Path], out: Path) -> list[Path]:
    """Write the figures for these run folders into ``out``; returns the PNGs written."""
    runs = {folder.resolve().name: read_run(folder) for folder in folders}
    out.mkdir(parents=True, exist_ok=True)
    figures = {**FIGURES, "bytes_per_chunk": stage_panels(runs)}
    return [out / f"{name}.png" for name, panels in figures.items() if plot_figure(runs, panels, out / f"{name}.png")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="run folders holding metrics.jsonl")
    p.add_argument("--out", type=Path, default=Path("figs"), help="folder for the PNGs")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.runs if not (f / "metrics.jsonl").is_file()]
    if missing:
        p.error("no metrics.jsonl in " + ", ".join(missing))
    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
