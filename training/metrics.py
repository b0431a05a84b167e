"""Per-step training metrics: a JSONL file, TensorBoard scalars and a console view.

Every rank builds a MetricsLogger so the training loop needs no rank checks;
only the writer (rank 0) touches files or the console. metrics.jsonl is the
source of truth (plots and tests read it); it is flushed on every call so a
crashed run keeps its history. Non-finite values (NaN, inf) are written as JSON
`null`, since json.dumps would otherwise emit `NaN`, which is not valid JSON.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics-superseded.jsonl"


def read_metrics(path_or_run_dir: str | Path) -> list[dict[str, Any]]:
    """Load a metrics.jsonl (or a run dir holding one) as a list of records.

    `null` values come back as None. A truncated last line, left by a crash
    in the middle of a write, is ignored.
    """
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} at {path}: not a skiptron run directory?")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return current_timeline(records)


def current_timeline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the rows a restart superseded: a row whose step is before the previous row's starts over from there (a
    resume from an earlier checkpoint), so the earlier rows of that step or later go (several rows of one step are
    kept). Files written before the logger truncated on resume hold such repeats."""
    out: list[dict[str, Any]] = []
    for record in records:
        step = record.get("step")
        if out and isinstance(step, int) and step < out[-1].get("step", step):
            while out and out[-1].get("step", step) >= step:
                out.pop()
        out.append(record)
    return out


def supersede_history(run_dir: str | Path, start_step: int) -> int:
    """Before a run continues from `start_step`, move the rows of later steps (logged by an earlier attempt past
    the checkpoint it resumes from) out of metrics.jsonl into metrics-superseded.jsonl, so the history holds each
    step once and nothing is thrown away. Returns the number of rows moved."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep, moved = [], []
    for line in lines:
        try:
            step = json.loads(line).get("step")
        except json.JSONDecodeError:  # a torn last line of a crashed write
            moved.append(line)
            continue
        (keep if step is not None and step <= start_step else moved).append(line)
    if not moved:
        return 0
    with open(path.with_name(SUPERSEDED_FILE), "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in moved))
    tmp = path.with_name(f".tmp-{METRICS_FILE}")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(moved)


def _number(value: Any) -> Any:
    """Unwrap 0-d tensors / numpy scalars so they serialize as plain numbers."""
    return value.item() if hasattr(value, "item") else value


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _si(value: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}"
    return f"{value:.1f}"


def _sci(value: float) -> str:
    """2.9e-04 -> 2.9e-4: compact learning rates."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_stats(metrics: dict[str, Any]) -> str:
    """The few metrics worth a glance, e.g. `loss 3.412 | lr 2.9e-4 | 15.2k tok/s`.

    `mfu` is a fraction (0.031) and is shown as a percentage.
    """
    fields = (
        ("loss", lambda v: f"loss {v:.3f}"),
        ("val_loss", lambda v: f"val {v:.3f}"),
        ("lr", lambda v: f"lr {_sci(v)}"),
        ("tokens_per_s", lambda v: f"{_si(v)} tok/s"),
        ("mfu", lambda v: f"mfu {100 * v:.1f}%"),
    )
    return " | ".join(
        fmt(metrics[key]) for key, fmt in fields if isinstance(metrics.get(key), (int, float))
    )


class MetricsLogger:
    """Writes one record per `log` call to JSONL, TensorBoard and the console.

    On a terminal, rank 0 shows a live rich progress bar; otherwise (CI, log
    files) it prints a plain line every `print_every` steps. Resumed runs pass
    `start_step` so the bar and the ETA start from there, and the history keeps
    one row per step: rows past it move out of metrics.jsonl
    (`supersede_history`) and TensorBoard purges its events past it. Non-writer
    ranks do nothing.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        is_writer: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        print_every: int = 10,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_writer = is_writer
        self.total_steps = total_steps
        self.start_step = start_step
        self.print_every = print_every
        self._closed = not is_writer
        self._start_time = time.monotonic()
        self._last: dict[str, Any] = {"step": start_step}
        self._best_val: float | None = None
        self._samples: dict[str, list[float]] = {"tokens_per_s": [], "mfu": []}
        if not is_writer:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        superseded = supersede_history(self.run_dir, start_step)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # readers drop the events of steps >= purge_step written before this one: those past the checkpoint
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        self._console = Console()
        self._live = progress and self._console.is_terminal
        # The Progress also runs hidden (disable=True): its task yields the ETA
        # of the plain lines.
        self._progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[stats]}", markup=False),
            TextColumn("| eta"),
            TimeRemainingColumn(compact=True),
            TextColumn("| elapsed"),
            TimeElapsedColumn(),
            console=self._console,
            disable=not self._live,
            speed_estimate_period=600.0,
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=start_step, stats=""
        )
        self._progress.start()
        if superseded:
            self.log_text(f"{METRICS_FILE}: {superseded} rows past step {start_step} (an earlier attempt beyond the "
                          f"checkpoint) moved to {SUPERSEDED_FILE}")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` (name -> number) for `step`; keys may be namespaced, `skip/...`."""
        if self._closed:
            return
        metrics = {key: _number(value) for key, value in metrics.items()}
        record = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
        self._track(step, metrics)
        self._show(step, metrics)

    def _track(self, step: int, metrics: dict[str, Any]) -> None:
        self._last.update(metrics)
        self._last["step"] = max(self._last["step"], step)
        val = metrics.get("val_loss")
        if _is_finite(val) and (self._best_val is None or val < self._best_val):
            self._best_val = val
        for key, values in self._samples.items():
            if _is_finite(metrics.get(key)):
                values.append(metrics[key])

    def _show(self, step: int, metrics: dict[str, Any]) -> None:
        stats = format_stats(metrics)
        self._progress.update(self._task, completed=step, stats=stats)
        if self._live or not (step % self.print_every == 0 or step == self.total_steps):
            return
        eta = self._progress.tasks[self._task].time_remaining
        parts = [f"step {step}/{self.total_steps}", stats]
        if eta is not None:
            parts.append(f"eta {_duration(eta)}")
        self.log_text(" | ".join(p for p in parts if p))

    def log_text(self, msg: str) -> None:
        """Print a rank-0 message above the progress bar without breaking it."""
        if not self._closed:
            self._console.print(msg, markup=False, highlight=False, soft_wrap=True)

    def summary(self) -> dict[str, Any]:
        """End-of-run figures; None where the metric was never logged (final_loss may be NaN)."""

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        return {
            "steps": self._last["step"],
            "final_loss": self._last.get("loss"),
            "best_val_loss": self._best_val,
            "mean_tokens_per_s": mean(self._samples["tokens_per_s"]),
            "mean_mfu": mean(self._samples["mfu"]),
            "wall_time_s": time.monotonic() - self._start_time,
        }

    def close(self) -> None:
        """Stop the display, print the summary and close the files (idempotent)."""
        if self._closed:
            return
        self._progress.stop()
        s = self.summary()
        parts = [f"done: {s['steps']} steps"]
        if s["final_loss"] is not None:
            parts.append(f"final loss {s['final_loss']:.3f}")
        if s["best_val_loss"] is not None:
            parts.append(f"best val loss {s['best_val_loss']:.3f}")
        if s["mean_tokens_per_s"] is not None:
            parts.append(f"mean {_si(s['mean_tokens_per_s'])} tok/s")
        if s["mean_mfu"] is not None:
            parts.append(f"mean mfu {100 * s['mean_mfu']:.1f}%")
        parts.append(f"wall {_duration(s['wall_time_s'])}")
        self.log_text(" | ".join(parts))
        self._closed = True
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
