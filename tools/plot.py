"""skiptron-plot: training curves of one or more runs, from their metrics.jsonl, to a PNG.

Uses matplotlib's object-oriented Figure (Agg canvas) rather than pyplot, so the
training entry point can call `plot_runs` without touching global GUI state.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from skiptron.training import verbosity
from skiptron.training.metrics import read_metrics

DEFAULT_METRICS = ("loss", "val_loss", "lr", "tokens_per_s", "mfu")
RATE_PREFIX = "skip/rate/L"


def _series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) at the steps that logged `metric`; null becomes a NaN gap."""
    points = [(r["step"], r[metric]) for r in records if metric in r]
    return [s for s, _ in points], [math.nan if v is None else v for _, v in points]


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> Path:
    """Draw one subplot per metric (x = step), one line per run; return the PNG path.

    Metrics that no run logged are left out. Raises FileNotFoundError when a run
    dir has no metrics.jsonl and ValueError when none of `metrics` was logged.
    """
    runs = [(Path(d).resolve().name, read_metrics(d)) for d in run_dirs]
    present = [m for m in metrics if any(m in r for _, recs in runs for r in recs)]
    if not present:
        raise ValueError(f"none of the metrics {list(metrics)} were logged in {list(run_dirs)}")
    ncols = min(2, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = Figure(figsize=(6 * ncols, 3.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, metric in zip(axes, present):
        for name, records in runs:
            steps, values = _series(records, metric)
            if steps:
                sparse = len(steps) <= 50
                ax.plot(steps, values, label=name, marker="o" if sparse else None, markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(present):]:
        ax.set_visible(False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def plot_rate_heatmap(run_dir: str | Path, out: str | Path) -> Path:
    """Execution rate per routed layer (rows) over training steps (columns), from `skip/rate/L<i>`."""
    records = read_metrics(run_dir)
    layers = sorted({int(k[len(RATE_PREFIX):]) for r in records for k in r if k.startswith(RATE_PREFIX)})
    if not layers:
        raise ValueError(f"{run_dir} logged no {RATE_PREFIX}<i> metrics: was model.skip.enabled set?")
    steps = [r["step"] for r in records if f"{RATE_PREFIX}{layers[0]}" in r]
    grid = [[math.nan if r.get(f"{RATE_PREFIX}{i}") is None else r[f"{RATE_PREFIX}{i}"]
             for r in records if f"{RATE_PREFIX}{layers[0]}" in r] for i in layers]
    fig = Figure(figsize=(10, 1.2 + 0.35 * len(layers)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap="viridis",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), [f"L{i}" for i in layers])
    ax.set_xlabel("step")
    ax.set_title(f"execution rate per routed layer: {Path(run_dir).resolve().name}")
    fig.colorbar(image, ax=ax, label="fraction of tokens executed")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skiptron-plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default: <first RUN_DIR>/curves.png)")
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help="comma-separated metric keys (default: %(default)s)",
    )
    parser.add_argument("--rate-heatmap", action="store_true",
                        help="instead: execution rate per routed layer over steps (first RUN_DIR)")
    verbosity.add_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = "rates.png" if args.rate_heatmap else "curves.png"
    out = args.out or Path(args.run_dirs[0]) / name
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        if args.rate_heatmap:
            path = plot_rate_heatmap(args.run_dirs[0], out)
        else:
            path = plot_runs(args.run_dirs, out, metrics)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(path)


if __name__ == "__main__":
    main()
