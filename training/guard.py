"""Non-finite and spiking steps never reach the weights: the update is decided before the optimizer applies it.

Each rank marks, without a host sync, whether a loss or any incoming gradient of its micro-batches was non-finite
(tensor hooks on the parameters: they see every rank's local gradient before DeepSpeed reduces it, so a NaN on any
rank is seen whatever the ZeRO stage or precision). Before the optimizer step, `decide()` sums over the world one
small tensor (non-finite count, loss sum, loss count): every rank gets the same verdict. A rejected step applies
nothing: the optimizer's step and the LR scheduler's step are gated (no weight, Adam moment or schedule change),
exactly what DeepSpeed does itself when its own overflow check skips a step (ZeRO 1-3 check gradients in every
precision and get there first; stage 0 fp32 has no such check, the gate does it). The step's batch is consumed.

The spike guard (optional, `train.spike_factor`) also rejects a finite step whose mean loss exceeds `spike_factor`
x the mean of the last `spike_window` accepted steps, once that window is full.

Counters (skipped steps by reason, the current streak of consecutive skipped steps) are state: saved in every
checkpoint and restored on resume, so the limit on consecutive skipped steps means the same across a restart.
"""
from __future__ import annotations

import math
import types
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Verdict:
    apply: bool
    nonfinite: bool
    spike: bool
    loss: float  # the step's mean loss over micro-batches and ranks (nan when non-finite)


class StepGuard:
    def __init__(self, device: torch.device, spike_factor: float | None = None, spike_window: int = 100):
        self.device = device
        self.spike_factor, self.spike_window = spike_factor, spike_window
        self._gradient_sum = torch.zeros((), dtype=torch.float32, device=device)
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self._loss_count = 0
        self._verdict: Verdict | None = None
        self.recent = deque(maxlen=spike_window)  # losses of accepted steps
        self.totals = {"total": 0, "nonfinite": 0, "spike": 0, "deepspeed": 0}
        self.streak = 0  # consecutive skipped steps up to now

    # -- wiring ---------------------------------------------------------------------------------------------------
    def watch(self, module: torch.nn.Module) -> None:
        """Mark non-finite incoming gradients of every trainable parameter (no host sync)."""
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._mark_gradient)

    def _mark_gradient(self, grad: torch.Tensor) -> None:
        # Two kernels per gradient, no per-element masks: the running sum of every gradient's sum is non-finite when
        # any element was NaN or infinite (NaN and inf propagate through the sums, and through the all-reduce in
        # `decide`), or when finite sums overflow fp32 (|sum| > 3e38: gradients no step should apply either).
        self._gradient_sum.add_(grad.sum(dtype=torch.float32))

    def gate(self, optimizer: torch.optim.Optimizer) -> None:
        """Make `optimizer.step()` do nothing in a step `decide()` rejected (an instance attribute, as torch's LR
        schedulers patch it; the optimizer's state_dict does not hold it)."""
        opt_step = optimizer.step

        def guarded_optimizer_step(_optimizer, *args, **kwargs):
            if self._verdict is None and not self._loss_count:  # not a training step (DeepSpeed's set-up step)
                return opt_step(*args, **kwargs)
            if self.decide().apply:
                return opt_step(*args, **kwargs)
            return None

        optimizer.step = types.MethodType(guarded_optimizer_step, optimizer)  # bound, as LR schedulers expect

    def schedule_may_advance(self) -> bool:
        """False in a step this guard rejected: the LR schedule holds, as for a step DeepSpeed skips."""
        return self._verdict is None or self._verdict.apply

    # -- one step -------------------------------------------------------------------------------------------------
    def observe_loss(self, loss: torch.Tensor) -> None:
        self._loss_sum.add_(loss.detach().float())  # a non-finite loss makes the sum non-finite
        self._loss_count += 1

    def decide(self) -> Verdict:
        """This step's verdict, the same on every rank (collective over the world, once per step)."""
        if self._verdict is not None:
            return self._verdict
        summed = torch.stack([self._gradient_sum, self._loss_sum,
                              torch.tensor(float(self._loss_count), device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(summed)
        gradient_sum, loss_sum, count = summed.tolist()
        nonfinite = not (math.isfinite(gradient_sum) and math.isfinite(loss_sum))
        loss = loss_sum / count if count and not nonfinite else float("nan")
        spike = (not nonfinite and self.spike_factor is not None and len(self.recent) == self.spike_window
                 and loss > self.spike_factor * (sum(self.recent) / len(self.recent)))
        self._verdict = Verdict(not (nonfinite or spike), nonfinite, spike, loss)
        return self._verdict

    def finish_step(self, applied_by_engine: bool) -> dict[str, float]:
        """Count the step (rejected here, or skipped by DeepSpeed's own overflow check) and reset for the next one.
        Returns the step's metrics; `self.streak` is the number of consecutive skipped steps."""
        verdict = self._verdict
        skipped_here = verdict is not None and not verdict.apply
        skipped = skipped_here or not applied_by_engine
        if skipped:
            self.totals["total"] += 1
            self.streak += 1
            if verdict is not None and verdict.nonfinite:
                self.totals["nonfinite"] += 1
            elif verdict is not None and verdict.spike:
                self.totals["spike"] += 1
            else:
                self.totals["deepspeed"] += 1
        else:
            self.streak = 0
            if verdict is not None and math.isfinite(verdict.loss):
                self.recent.append(verdict.loss)
        self._gradient_sum.zero_()
        self._loss_sum.zero_()
        self._loss_count, self._verdict = 0, None
        return {"train/skipped": float(skipped), **{f"train/skipped_{k}": float(v) for k, v in self.totals.items()}}

    def reason(self) -> str:
        """Why the steps of the current streak were skipped (for the stop message)."""
        return ", ".join(f"{v} {k}" for k, v in self.totals.items() if v and k != "total")

    # -- checkpointed state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "totals": dict(self.totals), "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(state["recent"], maxlen=self.spike_window)
        self.totals = dict(state["totals"])
        self.streak = state["streak"]
