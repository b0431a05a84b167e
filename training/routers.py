"""Router decisions for learned layer skipping: which tokens execute a routed block, and with what weight.

This is the seam between a routed block (`training/routing.py`, which gathers, computes and scatters the active
tokens) and the rule that picks them. A router is a module with

    decide(x [b, s, d]) -> Decision    the hard active mask, the gate the executed branch is scaled by, the weighted
                                       aux loss and the statistics the trainer logs and the controller reads; in
                                       training mode (`module.training`) the training rule, in eval mode the
                                       inference rule (what decoding and the Hugging Face export use)
    decide_step(x) -> (active, gate)   the inference decision for decoding steps (per token, no batch-wide rule)
    update_controller(quantile)        the budget controller's step update (a no-op for rules that need none)
    propose(x, count_group) -> Proposal
                                       `decide` in two halves (`RouterBase`): the DP collectives start, and
                                       `Proposal.decide()` waits for them, so a routed block computes what does
                                       not depend on the decision in between

`build_router(skip, ...)` makes the one `model.skip.router` configures. Every rank of a TP group must reach the same
decisions (same seed, same inputs, same noise); a rule that looks across the DP batch (capacity) gathers it in
`propose`.

- `sigmoid` (skiptron's own): p = sigmoid(w . rmsnorm(x) + b + offset); p > 0.5 (`threshold`) or a top-k over the
  DP batch (`capacity`); the branch is scaled by p; the budget loss (rate - target)^2 on the straight-through rate
  and a controller that moves `offset` to the budget (docs/routing.md).
- `gumbel` (SkipLayer, "Learning to Skip for Language Modeling"): a bias-free linear map to 2 logits (skip, execute)
  per token. Training samples the decision with straight-through Gumbel-softmax: the forward is the hard sample
  (executed tokens get exactly F(x), skipped ones exactly x), the backward that of the soft sample, whose gradient
  for a skipped token needs that token's branch F(x) - x: the block computes it, without grad, in training only
  (`Decision.skipped_gate`). The capacity loss weight * (rate - target)^2 uses the hard rate (straight-through
  gradient); the sum over layers is the model's. Inference is greedy: argmax of the logits, no noise.
- `mod` (Mixture-of-Depths, Raposo et al. 2024): a scalar router weight r = w . rmsnorm(x) + b; exactly k =
  round(capacity x s) tokens per sequence execute (the top-k of r, expert choice), the branch scaled by sigmoid(r).
  Top-k looks at the whole sequence, so it is not causal; a small predictor (MLP on the stop-gradient router
  input) learns with BCE which tokens are in the top-k, and inference (evaluation and decoding) uses its decisions
  (logit > 0). `Decision.agreement` is how often predictor and top-k agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from skiptron.parallel import state
from skiptron.parallel.topk import start_top_k

from .config import SkipConfig
from .layers import ScoreLinear, rms_norm


@dataclass
class Decision:
    """One routed layer's decision for a batch [b, s]."""

    active: torch.Tensor  # bool [b, s]: tokens that execute the block
    gate: torch.Tensor  # [b, s] fp32, with grad: the multiplier of an active token's branch (F(x) - x)
    aux_loss: torch.Tensor  # 0-d, with grad, weighted (model.skip.*_weight): what this layer adds to the loss
    rate: torch.Tensor  # 0-d, detached: executed fraction of this rank's tokens
    quantile: torch.Tensor  # 0-d, detached: the budget controller's signal (sigmoid threshold; else 0)
    # gumbel in training: the soft path's multiplier of a skipped token's branch (value exactly 0); its gradient
    # needs the skipped tokens' branch, which the block computes without grad. None: skipped tokens need nothing.
    skipped_gate: torch.Tensor | None = None
    agreement: torch.Tensor | None = None  # mod: fraction of tokens on which predictor and top-k agree (detached)
    # every DP rank's count of active tokens [world] when the rule already gathered them (capacity), else None
    rank_counts: torch.Tensor | None = None


class Proposal:
    """A decision whose DP collective may still be in flight: the capacity rule's scores, or every rank's count of
    active tokens for the balancer. A routed block starts it (`propose`), computes what does not depend on the
    decision (every token's keys and values with `kv: all`), then `decide()`s: a rank that arrives early at the
    collective works instead of waiting, once per routed layer."""

    def __init__(self, finish: Callable[[], Decision]):
        self._finish = finish

    def decide(self) -> Decision:
        return self._finish()


class RouterBase(nn.Module):
    """What every router shares: `propose` over a rule that decides at once (`decide`), its counts gathered
    asynchronously when the balancer wants them."""

    def decide(self, x: torch.Tensor) -> Decision:
        raise NotImplementedError

    def propose(self, x: torch.Tensor, count_group=None) -> Proposal:
        """Start deciding for x; `count_group`: gather every rank's count of active tokens over it (the DP balancer's
        plan) into `Decision.rank_counts`, overlapped like the rule's own collectives (None: not gathered)."""
        return with_counts(self.decide(x), count_group)


def with_counts(decision: Decision, count_group) -> Proposal:
    """A decision made, its ranks' counts gathered over `count_group` (None: none) by the time it is `decide()`d."""
    if count_group is None:
        return Proposal(lambda: decision)
    counts = state.all_gather_async(decision.active.sum()[None], count_group)
    return Proposal(lambda: replace(decision, rank_counts=counts.wait()))


def sequence_capacity(capacity: float, seq_len: int) -> int:
    """Tokens per sequence a Mixture-of-Depths layer executes: round(capacity x s), at least 1."""
    return max(1, round(capacity * seq_len))


def top_k_per_sequence(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [b, s]: the k highest scores of each row, ties to the lower position."""
    order = torch.argsort(-scores.detach(), dim=1, stable=True)[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, True)


def gumbel_noise(shape: torch.Size, device: torch.device, group) -> torch.Tensor:
    """Standard Gumbel noise for this rank's [b, s, 2] logits (its slice of the DP batch over `group`)."""
    world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    return gumbel_noise_slice(shape, device, dist.get_rank(group) if world > 1 else 0)


def gumbel_noise_slice(shape: torch.Size, device: torch.device, rank: int) -> torch.Tensor:
    """Gumbel noise for slice `rank` of a DP batch made of equal slices `shape`: a function of one seed drawn from
    torch's RNG and of each value's index in the whole batch (splitmix64's sequence). Every rank draws the same seed
    (TP replicas make the same decisions), DP ranks index different values, a DP=2 batch sees the noise of the same
    batch at DP=1, and a rank computes its own slice only, so the cost does not grow with the world. The RNG streams
    are saved in checkpoints and activation recomputation restores them: resumed and recomputed forwards draw the
    same seed."""
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    n = math.prod(shape)
    index = torch.arange(rank * n + 1, (rank + 1) * n + 1, dtype=torch.int64, device=device)
    bits = _splitmix64(seed + index * _GOLDEN_GAMMA)
    uniform = (_shift_right(bits, 12).double() + 0.5) / 2.0**52  # in (0, 1), exactly, from 52 random bits
    return (-torch.log(-torch.log(uniform))).float().view(shape)


_GOLDEN_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's constants as signed int64 (torch's products wrap mod 2^64)
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 states (Steele et al. 2014): a bijective mix of all 64 bits."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=x.device)


class Router(RouterBase):
    """The sigmoid router: p = sigmoid(w . rmsnorm(x) + b + offset); a token executes when p > 0.5 (`threshold`) or
    when it is among the round(target x tokens) highest p of the DP batch (`capacity`), its branch scaled by p.
    Replicated on TP ranks (same seed, same inputs, same gradients).

    `offset` is the budget controller's state, not a learned weight: after every step it moves a fraction
    `controller_rate` of the way to minus the (1 - target) quantile of the step's router logits, averaged over the
    DP batch so every replica applies the same update. The threshold so tracks the budget while the router keeps
    learning which tokens deserve it; the aux loss alone, through Adam's momentum, overshoots back and forth on
    short runs. At inference the offset is frozen, so decisions match training."""

    def __init__(self, skip: SkipConfig, hidden: int, eps: float, init_std: float):
        super().__init__()
        self.skip = skip
        self.norm = rms_norm(hidden, eps)
        self.proj = ScoreLinear(hidden, bias=True, std=init_std)
        self.register_buffer("offset", torch.zeros(()))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits before the controller's offset, [b, s] fp32."""
        return self.proj(self.norm(x)).squeeze(-1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """p [b, s]."""
        return torch.sigmoid(self.logits(x) + self.offset)

    def decide(self, x: torch.Tensor) -> Decision:
        return self.propose(x).decide()

    def propose(self, x: torch.Tensor, count_group=None) -> Proposal:
        """Capacity mode starts the DP batch's top-k (`parallel/topk.py`; its collective is the rule, over more than
        one rank), threshold mode the counts' gather when `count_group` is given; either in flight until `decide()`."""
        logits = self.logits(x)
        p = torch.sigmoid(logits + self.offset)
        if self.skip.mode == "capacity":  # exactly round(target x DP batch) tokens: the highest p, ties to lower index
            group = state.dp_group_or_none()
            world = dist.get_world_size(group) if group is not None else 1
            chosen = start_top_k(p, round(self.skip.target_rate * p.numel() * world), group)
            return Proposal(lambda: self._decision(logits, p, *chosen.wait()))
        return with_counts(self._decision(logits, p, p > 0.5), count_group)

    def _decision(self, logits: torch.Tensor, p: torch.Tensor, active: torch.Tensor,
                  rank_counts: torch.Tensor | None = None) -> Decision:
        hard = active.float()
        rate = (hard + p - p.detach()).mean()
        return Decision(active=active, gate=p, aux_loss=self.skip.aux_loss_weight * (rate - self.skip.target_rate) ** 2,
                        rate=hard.mean().detach(),
                        quantile=torch.quantile(logits.detach().flatten(), 1 - self.skip.target_rate),
                        rank_counts=rank_counts)

    def decide_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(active [b, n] bool, gate [b, n]) for decoding: threshold mode only, since a token's router sees only its
        own hidden state there; capacity routing looks at the whole batch."""
        if self.skip.mode != "threshold":
            raise ValueError("model.skip.mode: capacity routing looks at the whole batch; decode with threshold mode")
        p = self(x)
        return p > 0.5, p

    @torch.no_grad()
    def update_controller(self, logit_quantile: float) -> None:
        if self.skip.mode == "threshold":
            self.offset.lerp_(torch.full_like(self.offset, -logit_quantile), self.skip.controller_rate)


class GumbelRouter(RouterBase):
    """SkipLayer's router: logits [skip, execute] = W x / rms(x) (bias-free, no gain), straight-through
    Gumbel-softmax in training, argmax at inference. Replicated on TP ranks; the noise is the same on every TP rank
    (`gumbel_noise`).

    The hidden state is RMS-normalized (as every router here sees it) because the early residual stream is small
    (|x| ~ init_std x sqrt(hidden)): Adam moves each weight by about lr per step, so on raw x the logits could move
    by only ~2 lr |x|_1 per step and the capacity loss could not bring the rate to its budget in a few hundred steps."""

    def __init__(self, skip: SkipConfig, hidden: int, eps: float, init_std: float):
        super().__init__()
        self.skip = skip
        self.eps = eps
        self.proj = nn.Linear(hidden, 2, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, 2] fp32: (skip, execute)."""
        return self.proj(F.rms_norm(x, (x.shape[-1],), eps=self.eps)).float()

    def decide(self, x: torch.Tensor) -> Decision:
        logits = self.logits(x)
        if not self.training:
            active, _ = self.decide_step(x)
            hard = active.float()
            return Decision(active=active, gate=torch.ones_like(hard), aux_loss=_zero(x), rate=hard.mean(),
                            quantile=_zero(x))
        y = logits + gumbel_noise(logits.shape, logits.device, state.dp_group_or_none())
        active = y[..., 1] > y[..., 0]
        soft = torch.softmax(y / self.skip.gumbel_temperature, dim=-1)[..., 1]
        hard = active.float()
        straight = hard + (soft - soft.detach())  # exactly the hard sample forward, the soft one's gradient backward
        rate = straight.mean()
        return Decision(active=active, gate=straight, skipped_gate=straight,
                        aux_loss=self.skip.aux_loss_weight * (rate - self.skip.target_rate) ** 2,
                        rate=hard.mean().detach(), quantile=_zero(x))

    def decide_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy: execute when the execute logit wins; an executed branch is added whole (gate 1)."""
        logits = self.logits(x)
        active = logits[..., 1] > logits[..., 0]
        return active, torch.ones_like(logits[..., 0])

    def update_controller(self, logit_quantile: float) -> None:
        """No controller: the capacity loss alone holds the budget (as in the paper)."""


class DecisionPredictor(nn.Module):
    """Mixture-of-Depths' causal fix: an MLP on a token's (stop-gradient) router input predicting whether the
    token is in its sequence's top-k."""

    def __init__(self, hidden: int, width: int, init_std: float):
        super().__init__()
        self.hidden = nn.Linear(hidden, width)
        self.out = nn.Linear(width, 1)
        for layer in (self.hidden, self.out):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [b, s] fp32 (> 0: predicted to execute)."""
        return self.out(F.silu(self.hidden(h))).squeeze(-1).float()


class MoDRouter(RouterBase):
    """Mixture-of-Depths: router weight r = w . rmsnorm(x) + b, top-k per sequence in training, the predictor's
    decisions at inference; the branch scaled by sigmoid(r). Replicated on TP ranks."""

    def __init__(self, skip: SkipConfig, hidden: int, eps: float, init_std: float):
        super().__init__()
        self.skip = skip
        self.norm = rms_norm(hidden, eps)
        self.proj = ScoreLinear(hidden, bias=True, std=init_std)
        self.predictor = DecisionPredictor(hidden, skip.predictor_hidden, init_std)

    def decide(self, x: torch.Tensor) -> Decision:
        h = self.norm(x)
        weight = self.proj(h).squeeze(-1).float()
        predicted = self.predictor(h.detach())
        chosen = top_k_per_sequence(weight, sequence_capacity(self.skip.target_rate, x.shape[1]))
        active = chosen if self.training else predicted > 0
        aux = self.skip.predictor_loss_weight * F.binary_cross_entropy_with_logits(predicted, chosen.float())
        return Decision(active=active, gate=torch.sigmoid(weight), aux_loss=aux if self.training else _zero(x),
                        rate=active.float().mean().detach(), quantile=_zero(x),
                        agreement=((predicted > 0) == chosen).float().mean().detach())

    def decide_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor's decision (causal), the branch scaled by sigmoid(r)."""
        h = self.norm(x)
        return self.predictor(h) > 0, torch.sigmoid(self.proj(h).squeeze(-1).float())

    def update_controller(self, logit_quantile: float) -> None:
        """No controller: the capacity is exact."""


def build_router(skip: SkipConfig, hidden: int, eps: float, init_std: float) -> nn.Module:
    """The router `model.skip.router` configures."""
    if skip.router == "gumbel":
        return GumbelRouter(skip, hidden, eps, init_std)
    if skip.router == "mod":
        return MoDRouter(skip, hidden, eps, init_std)
    return Router(skip, hidden, eps, init_std)
