"""Router decisions for learned layer skipping: which tokens execute a routed block, and with what weight.

This is the seam between a routed block (`training/routing.py`, which gathers, computes and scatters the active
tokens) and the rule that picks them. A router is a module with

    decide(x [b, s, d]) -> Decision    the hard active mask, the gate the executed branch is scaled by, the budget
                                       (aux) loss and the statistics the trainer logs and the controller reads
    decide_step(x) -> (active, gate)   the same decision for decoding steps (per token, no batch-wide rule)
    update_controller(quantile)        the budget controller's step update (a no-op for rules that need none)

`build_router(skip, ...)` makes the one `model.skip` configures. Every rank of a TP group must reach the same
decisions (same seed, same inputs); a rule that looks across the DP batch (capacity) gathers it in `decide`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from skiptron.parallel import state

from .config import SkipConfig
from .layers import rms_norm


@dataclass
class Decision:
    """One routed forward's decision. `active` [b, s] bool; `gate` [b, s] fp32 with grad (an executed token's output
    is x + gate * (F(x) - x)); `aux_loss` 0-d with grad; `rate` the hard executed fraction (0-d, detached);
    `quantile` the (1 - target) quantile of the router logits (0-d, detached: the controller's input)."""

    active: torch.Tensor
    gate: torch.Tensor
    aux_loss: torch.Tensor
    rate: torch.Tensor
    quantile: torch.Tensor


def capacity_mask(p: torch.Tensor, rate: float, group) -> torch.Tensor:
    """Exactly round(rate x global tokens) tokens execute across the DP group: the highest p, ties to the lower
    global index. Every rank sees the same gathered scores, so all derive the same split."""
    world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    flat = p.detach().flatten()
    if world > 1:
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat.contiguous(), group=group)
        everything, rank = torch.cat(parts), dist.get_rank(group)
    else:
        everything, rank = flat, 0
    k = round(rate * everything.numel())
    chosen = torch.zeros_like(everything, dtype=torch.bool)
    chosen[torch.argsort(-everything, stable=True)[:k]] = True
    return chosen[rank * flat.numel():(rank + 1) * flat.numel()].view_as(p)


class Router(nn.Module):
    """p = sigmoid(w . rmsnorm(x) + b + offset); a token executes when p > 0.5 (`threshold`) or when it is among the
    round(target x tokens) highest p of the DP batch (`capacity`). Replicated on TP ranks (same seed, same inputs,
    same gradients).

    Gradient estimator: the executed branch is scaled by p (as MoE gating does), so the router learns from the LM
    loss through p on the tokens it executed. Budget: (rate - target)^2 with rate = mean(hard + p - stopgrad(p)),
    the measured hard rate in the forward and the soft rate's gradient in the backward.

    `offset` is the budget controller's state, not a learned weight: after every step it moves a fraction
    `controller_rate` of the way to minus the (1 - target) quantile of the step's router logits, averaged over the
    DP batch so every replica applies the same update. The threshold so tracks the budget while the router keeps
    learning which tokens deserve it; the aux loss alone, through Adam's momentum, overshoots back and forth on
    short runs. At inference the offset is frozen, so decisions match training."""

    def __init__(self, skip: SkipConfig, hidden: int, eps: float, init_std: float):
        super().__init__()
        self.mode, self.target_rate, self.controller_rate = skip.mode, skip.target_rate, skip.controller_rate
        self.norm = rms_norm(hidden, eps)
        self.proj = nn.Linear(hidden, 1)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("offset", torch.zeros(()))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits before the controller's offset, [b, s] fp32."""
        return self.proj(self.norm(x)).squeeze(-1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """p [b, s]."""
        return torch.sigmoid(self.logits(x) + self.offset)

    def decide(self, x: torch.Tensor) -> Decision:
        logits = self.logits(x)
        p = torch.sigmoid(logits + self.offset)
        if self.mode == "capacity":
            active = capacity_mask(p, self.target_rate, state.dp_group_or_none())
        else:
            active = p > 0.5
        hard = active.float()
        rate = (hard + p - p.detach()).mean()
        return Decision(active=active, gate=p, aux_loss=(rate - self.target_rate) ** 2, rate=hard.mean().detach(),
                        quantile=torch.quantile(logits.detach().flatten(), 1 - self.target_rate))

    def decide_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(active [b, n] bool, gate [b, n]) for decoding: threshold mode only, since a token's router sees only its
        own hidden state there; capacity routing looks at the whole batch."""
        if self.mode != "threshold":
            raise ValueError("model.skip.mode: capacity routing looks at the whole batch; decode with threshold mode")
        p = self(x)
        return p > 0.5, p

    @torch.no_grad()
    def update_controller(self, logit_quantile: float) -> None:
        if self.mode == "threshold":
            self.offset.lerp_(torch.full_like(self.offset, -logit_quantile), self.controller_rate)


def build_router(skip: SkipConfig, hidden: int, eps: float, init_std: float) -> Router:
    """The router `model.skip` configures."""
    return Router(skip, hidden, eps, init_std)
