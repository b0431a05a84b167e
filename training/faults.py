"""Fault injection for tests and fire drills, read from the environment variable SKIPTRON_FAULTS.

    SKIPTRON_FAULTS="kill:at=save:step=4:rank=1;nan-grad:step=3"

Entries are separated by `;`; each is a kind and `key=value` conditions:

    kind       kill (SIGKILL this rank), hang (sleep for `seconds`, default forever), nan-loss (the step's loss
               becomes NaN), nan-grad (one parameter's gradient becomes NaN, the loss stays finite)
    step       the optimizer step it happens at (1-based); required
    rank       the global rank it happens on (default: every rank)
    at         step (default: at the start of the step, before its data is read) or save (inside the checkpoint
               save of `step`, after this rank's files are written)
    once       a file path: the fault fires only if the file does not exist, and creates it (a restarted job then
               runs clean)

Nothing here runs unless the variable is set; a malformed entry fails at start-up, naming it.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "SKIPTRON_FAULTS"
KINDS = ("kill", "hang", "nan-loss", "nan-grad")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None
    at: str = "step"
    seconds: float = float("inf")
    once: str | None = None

    def applies(self, at: str, step: int, rank: int) -> bool:
        if (self.at, self.step) != (at, step) or self.rank not in (None, rank):
            return False
        if self.once:
            marker = Path(self.once)
            if marker.exists():
                return False
            marker.touch()
        return True


def parse(spec: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        kind, *conditions = entry.split(":")
        fields = dict(c.split("=", 1) for c in conditions if "=" in c)
        if kind not in KINDS or "step" not in fields or len(fields) != len(conditions):
            raise ValueError(f"{ENV}: '{entry}' is not <{'|'.join(KINDS)}>:step=N[:rank=R][:at=step|save]"
                             f"[:seconds=S][:once=PATH]")
        faults.append(Fault(kind, int(fields["step"]), int(fields["rank"]) if "rank" in fields else None,
                            fields.get("at", "step"), float(fields.get("seconds", "inf")), fields.get("once")))
    return faults


def active() -> list[Fault]:
    return parse(os.environ.get(ENV, ""))


def fire(at: str, step: int, rank: int) -> None:
    """Kill or hang this rank if a fault is set for this point."""
    for fault in active():
        if fault.kind in ("kill", "hang") and fault.applies(at, step, rank):
            print(f"[faults] {fault.kind} on rank {rank} at {at} of step {step}", flush=True)
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            deadline = time.monotonic() + fault.seconds
            while time.monotonic() < deadline:
                time.sleep(1.0)


def poison_loss(loss, module, step: int, rank: int):
    """The loss as the model computed it, or with a NaN injected for this step: in its value (nan-loss), or in the
    gradient of the first trainable parameter only (nan-grad: adds sqrt(w - w) * 0, which is exactly 0 with a NaN
    derivative)."""
    import torch

    for fault in active():
        if fault.kind == "nan-loss" and fault.applies("step", step, rank):
            return loss * float("nan")
        if fault.kind == "nan-grad" and fault.applies("step", step, rank):
            weight = next(p for p in module.parameters() if p.requires_grad and p.numel())
            return loss + (torch.sqrt(weight - weight.detach()) * 0).sum()
    return loss
