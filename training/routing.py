"""Learned per-token layer skipping ("Learning to Skip for Language Modeling", arXiv 2311.15436).

A router in front of a block (`training/routers.py`: the decision rule, its gradient estimator and budget) picks the
tokens that execute it and the gate their output is scaled by. Only the active tokens are gathered and computed; a
skipped token passes through unchanged. An active token's output is x + gate * (F(x) - x).

A routed block returns what it computed: `forward(x, positions) -> (out, RoutingRecord)`, the record holding its aux
loss (with grad) and the detached statistics the trainer logs and the budget controller reads. Nothing is left in
module attributes, so compiled and pipelined code can use the results.

Balance: an active token's position-wise work (its MLP; in `layer`/`attention` granularity also its attention
projections: Q, or QKV with `kv: active`, and the output projection) runs after the active tokens are evened out across
data-parallel ranks (`skiptron.parallel.balance`). Only the attention scores stay where the sequence lives, since its
keys and values do (with `kv: all` every token's K and V are projected there too: that work is not routed).
"""
from __future__ import annotations

from typing import NamedTuple

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from skiptron.parallel import state
from skiptron.parallel.balance import BalanceStats, balance, gather_counts
from skiptron.parallel.timing import Stopwatch

from .config import SkipConfig
from .layers import Block
from .routers import Decision, build_router
from .selection import Tokens, chosen_tokens, pack_positions, read_counts


BALANCE_KEYS = ("imbalance_before", "imbalance_after", "shed_tokens", "tokens_moved", "bytes_moved", "exchange_ms")


class RoutingRecord(NamedTuple):
    """What one routed block's forward computed besides its output: the aux loss (with grad) and detached
    statistics for metrics. A named tuple, so DeepSpeed (ZeRO-3's output hooks) and torch.compile see its tensors.

    The rate and the logit quantile stay on the device (0-d tensors): `RoutingMeter.reduce` reads all layers' values
    back in one transfer per step; `exec_rate` / `logit_quantile` read one back (tests, benchmarks)."""

    aux_loss: torch.Tensor
    rate: torch.Tensor  # executed fraction of this rank's tokens
    quantile: torch.Tensor  # (1 - target) quantile of the router logits
    active_tokens: int
    computed_tokens: list  # rows of each position-wise computation this rank ran (after balancing)
    balance: dict  # host-side statistics of the DP exchanges (see `BalanceStats`), {} when none ran
    exchange_time: Stopwatch | None  # the exchanges' time, read once per step
    agreement: torch.Tensor | None = None  # mod: predictor vs top-k agreement (0-d, detached), else None

    @property
    def exec_rate(self) -> float:
        return float(self.rate)

    @property
    def logit_quantile(self) -> float:
        return float(self.quantile)


class TokenExchanges:
    """The position-wise computations of one routed forward (`tokenwise`), balanced over the DP group when the
    balancer is on; made per forward and read into its `RoutingRecord` (an explicit context, not module state).

    Every computation of one forward runs on the same active rows, so the ranks' counts are gathered once and reused:
    by the router's proposal (`rank_counts`, overlapped with other work), else here at the first."""

    def __init__(self, group, min_tokens: int | None, device: torch.device,
                 rank_counts: tuple[int, ...] | None = None):
        self.group = group if min_tokens is not None else None
        self.min_tokens = min_tokens
        self.rank_counts = rank_counts
        self.computed: list[int] = []
        self.stats: list[BalanceStats] = []
        self.watch = Stopwatch(device)

    def __call__(self, fn, *rows: torch.Tensor) -> torch.Tensor:
        """fn(*rows) for position-wise work on active tokens' rows ([n, ...] each). With the DP balancer on, some rows
        are computed on other ranks and their results (and, in the backward, gradients) come back."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            self.computed.append(rows[0].shape[0])
            return fn(*rows)
        with self.watch.region("exchange"):
            if self.rank_counts is None:
                self.rank_counts = gather_counts(rows[0].shape[0], self.group, rows[0].device)
            work = balance(rows, self.group, self.min_tokens, self.rank_counts)
        y = fn(*work.tokens)
        with self.watch.region("exchange"):
            y = work.restore(y)
        self.computed.append(work.num_tokens)
        self.stats.append(work.stats)
        return y

    def metrics(self) -> dict:
        """This forward's exchanges together: the loads are the same for each, the traffic adds up. `shed_tokens`:
        what balancing takes off the most loaded rank (exchanged or not: compare with `balance_min_tokens`)."""
        if not self.stats:
            return {}
        first = self.stats[0]
        return {"imbalance_before": first.imbalance_before, "imbalance_after": first.imbalance_after,
                "shed_tokens": first.shed_tokens,
                "tokens_moved": sum(s.tokens_moved for s in self.stats),
                "bytes_moved": sum(s.bytes_moved for s in self.stats)}


class LayerFeedback(NamedTuple):
    """What a train step measured for one routed layer over the DP batch, fed back before the next step: the
    (1 - target) quantile of its router logits (the budget controller's signal) and the tokens its most loaded DP
    rank would have shed to balance the layer's load (the largest over the step's micro-batches; None: unknown)."""

    logit_quantile: float
    shed_tokens: int | None = None


class RoutedBlock(nn.Module):
    """A transformer block (or its MLP, or its attention), or an SRU++ layer, executed only for the tokens its router
    picks. `forward(x, positions) -> (out, RoutingRecord)`; `step(x, cache) -> (out, cache)` for decoding."""

    def __init__(self, block: Block, skip: SkipConfig, hidden: int, eps: float, init_std: float,
                 balance: int | None):
        super().__init__()
        self.block = block
        self.router = build_router(skip, hidden, eps, init_std)
        self.skip = skip
        self.balance = balance  # tokens the most loaded DP rank must shed for the exchange to run; None: never
        self.counts_due = True  # whether this step gathers the DP ranks' counts for the balancer (`update_after_step`)
        # Queries of `kv: all` layers are projected with slices of the fused QKV weight, outside that module's
        # forward: ZeRO-3 must gather it for this block's forward.
        for param in block.attn.projection_parameters() if isinstance(block, Block) else ():
            deepspeed.zero.register_external_parameter(self, param)

    def update_after_step(self, feedback: LayerFeedback) -> None:
        """The budget controller's update, and whether the next step gathers the ranks' counts. The gather is a
        point where every DP rank waits for the slowest, per layer and micro-batch; threshold routing makes it only
        for the balancer, which exchanges when a rank would shed `balance` tokens. So it is skipped while the last
        step's loads stayed below half of that (random loads, once the routers are trained, shed a few dozen
        tokens). Capacity routing's top-k brings the counts anyway. Every rank gets the same feedback, so all skip
        together; balancing never changes the results, only which rank computes."""
        self.router.update_controller(feedback.logit_quantile)
        self.counts_due = (self.balance is not None and
                           (feedback.shed_tokens is None or 2 * feedback.shed_tokens >= self.balance))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.block.mlp(self.block.mlp_norm(h[None])).squeeze(0)  # a squeeze's backward is a view, a select's a copy

    def _mlp_rows(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The MLP of `h` [b, t, d] at the flat `rows` of [b * t], zero elsewhere: decoding runs it only for the
        tokens that execute (none: not at all; every TP rank decides alike, so its collectives still match)."""
        flat = h.reshape(-1, h.shape[-1])
        out = torch.zeros_like(flat)
        if rows.numel():
            out.index_copy_(0, rows, self._mlp(flat.index_select(0, rows)))
        return out.view_as(h)

    def _attn_out_and_mlp(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """An active token's position-wise rest of the block: output projection, residual, MLP (minus its input x)."""
        a = self.block.attn.project_out(context)
        return a + self._mlp(x + a)

    def step(self, x: torch.Tensor, cache):
        """Incremental forward with a KV cache: the same per-token decisions as `forward` in threshold mode (a
        token's router sees only its own hidden state). Skipped tokens' rows are masked rather than gathered (decoding
        steps are a token per sequence, and a decoding GEMM's time is its weight's reads, whatever its rows), except in
        the MLP, which runs only for the executing tokens; with `kv: active` they are cached but invisible. When no
        token executes, attention computes only what the cache needs."""
        active, p = self.router.decide_step(x)
        active = active[..., None]
        gate = p.to(x.dtype)[..., None]
        block, granularity = self.block, self.skip.granularity
        if not isinstance(block, Block):  # SRU++: its state advances over the active tokens only
            y, cache = block.step_selected(x, cache, active[..., 0])
            return x + torch.where(active, gate * (y - x), 0.0), cache
        rows = active.flatten().nonzero().squeeze(1)  # the executing tokens: the step's one host read
        if granularity == "mlp":
            a, cache = block.attn.step(block.attn_norm(x), cache, torch.ones_like(active[..., 0]))
            h = x + a
            return h + gate * self._mlp_rows(h, rows), cache
        kv_all = self.skip.kv == "all"
        if not rows.numel():  # no token runs the attention (batch 1: every skipped token): the cache advances
            cache = block.attn.step_skipped(block.attn_norm(x) if kv_all else x, cache, kv_all)  # active: no norm
            return (x + block.mlp(block.mlp_norm(x)) if granularity == "attention" else x), cache
        present = active[..., 0] if self.skip.kv == "active" else torch.ones_like(active[..., 0])
        a, cache = block.attn.step(block.attn_norm(x), cache, present)
        a = torch.where(active, a, 0.0)  # a skipped token's own row may have had nothing to attend to
        if granularity == "attention":
            h = x + gate * a
            return h + block.mlp(block.mlp_norm(h)), cache
        delta = a + self._mlp_rows(x + a, rows)
        return x + torch.where(active, gate * delta, 0.0), cache

    def _branch(self, x: torch.Tensor, base: torch.Tensor, tokens: Tokens, tokenwise,
                keys_values: tuple | None = None, normed: torch.Tensor | None = None) -> torch.Tensor:
        """The branch the gate multiplies, for `tokens` [n, d]: the block's F(x) - x, its MLP (granularity mlp, on
        `base` = x + attention) or its attention output (granularity attention). `keys_values`, `normed`: with
        `kv: all`, every token's keys and values and the normed x."""
        b, s, d = x.shape
        flat, rows = x.reshape(b * s, d), tokens.rows
        if not isinstance(self.block, Block):  # SRU++: the whole layer over each sequence's active tokens, packed
            return self.block.forward_selected(x, pack_positions(tokens)) - flat.index_select(0, rows)
        if self.skip.granularity == "mlp":
            return tokenwise(self._mlp, base.reshape(b * s, d).index_select(0, rows))
        packed = pack_positions(tokens)
        attn = self.block.attn
        if keys_values is not None:
            context = attn.forward_selected(normed, packed, tokenwise, keys_values=keys_values)
        else:
            context = attn.forward_selected(x, packed, tokenwise, self.block.attn_norm)
        if self.skip.granularity == "attention":
            return tokenwise(attn.project_out, context)
        return tokenwise(self._attn_out_and_mlp, context, flat.index_select(0, rows))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, RoutingRecord]:
        b, s, d = x.shape
        transformer = isinstance(self.block, Block)
        dp = state.dp_group_or_none()
        proposal = self.router.propose(x, dp if self.balance is not None and self.counts_due else None)
        # what the decision does not change runs while its DP collective is in flight (`Proposal`)
        base, normed, keys_values = x, None, None
        if transformer and self.skip.granularity == "mlp":
            base = x + self.block.attn(self.block.attn_norm(x), positions)
        elif transformer and self.skip.kv == "all":
            normed = self.block.attn_norm(x)
            keys_values = self.block.attn.keys_values(normed)
        decision: Decision = proposal.decide()
        counts, rank_counts = read_counts(decision.active, decision.rank_counts)  # the layer's one host read
        tokens = chosen_tokens(decision.active, counts)
        # rows move by index_select: its backward is an index_add, an advanced index's an accumulating index_put
        gate = decision.gate.flatten().index_select(0, tokens.rows).to(x.dtype)[:, None]
        balance = self.balance if rank_counts is not None else None  # the balancer plans from gathered counts only
        tokenwise = TokenExchanges(dp, balance, x.device, rank_counts)
        out = base.reshape(b * s, d).index_add(0, tokens.rows, gate * self._branch(x, base, tokens, tokenwise,
                                                                                  keys_values, normed))
        if decision.skipped_gate is not None:
            # gumbel in training: the soft path's gradient for a skipped token needs its branch, multiplied by a
            # forward value of exactly 0; computed without grad (balanced like the executed work, not recorded)
            others = chosen_tokens(~decision.active, [s - c for c in counts])
            # every DP rank's skipped tokens: its micro-batch (one shape on every rank) minus its active ones
            other_counts = None if rank_counts is None else tuple(b * s - c for c in rank_counts)
            with torch.no_grad():
                branch = self._branch(x, base, others, TokenExchanges(dp, balance, x.device, other_counts),
                                      keys_values, normed)
            out = out.index_add(0, others.rows, decision.skipped_gate.flatten().index_select(0, others.rows)
                                .to(x.dtype)[:, None] * branch)
        out = out.view(b, s, d)
        if transformer and self.skip.granularity == "attention":
            out = out + self.block.mlp(self.block.mlp_norm(out))
        record = RoutingRecord(
            aux_loss=decision.aux_loss, rate=decision.rate, quantile=decision.quantile,
            active_tokens=int(tokens.rows.numel()), computed_tokens=list(tokenwise.computed),
            balance=tokenwise.metrics(), exchange_time=tokenwise.watch, agreement=decision.agreement)
        return out, record


class BalancerGathers:
    """Which routed layers gather the ranks' counts in the next step (`RoutedBlock.counts_due`), as a checkpointed
    object (`Trainer.extra_state`): a resumed run gathers, and so balances, exactly where the uninterrupted run would
    (an exchange changes which rank computes a token, so the rounding of the sums). A layer without a saved state
    (an older checkpoint, another pipeline layout) gathers."""

    def __init__(self, layers: dict[int, "RoutedBlock"]):
        self.layers = layers

    def state_dict(self) -> dict:
        return {i: block.counts_due for i, block in self.layers.items()}

    def load_state_dict(self, state: dict) -> None:
        for i, block in self.layers.items():
            block.counts_due = bool(state.get(i, True))


class RoutingMeter:
    """Accumulates routed blocks' records over a step's micro-batches; `metrics()` averages them over DP."""

    def __init__(self):
        self.records: list[dict[int, RoutingRecord]] = []

    def add(self, records: dict[int, RoutingRecord]) -> None:
        if records:
            self.records.append(records)

    def reduce(self, group) -> tuple[dict[str, float], dict[int, LayerFeedback]]:
        """(metrics averaged over micro-batches and DP, layer -> what the next step needs: `LayerFeedback`).

        The per-layer values stay on the device until here: two all-reduces (the mean, and the ranks' largest active
        counts) on the layout's device (what NCCL needs) and one read-back per step."""
        if not self.records:
            return {}, {}
        layers = sorted(self.records[0])
        n = len(self.records)
        device = self.records[0][layers[0]].rate.device

        def per_layer(field: str) -> torch.Tensor:  # [layers], averaged over micro-batches
            return torch.stack([torch.stack([getattr(r[i], field) for r in self.records]).double().mean()
                                for i in layers])

        aux = torch.stack([r[i].aux_loss.detach().double() for r in self.records for i in layers]).sum() / n
        predicted = [i for i in layers if self.records[0][i].agreement is not None]  # mod layers
        agreement = [torch.stack([r[i].agreement for r in self.records]).double().mean() for i in predicted]
        parts = [per_layer("quantile"), per_layer("rate"), aux[None], *[a[None] for a in agreement]]
        balanced = [(r[i].balance, r[i].exchange_time) for r in self.records for i in layers if r[i].balance]
        if balanced:
            stats = [{**b, "exchange_ms": 1e3 * watch.take().get("exchange", 0.0)} for b, watch in balanced]
            host = [sum(b[k] for b in stats) / len(stats) for k in BALANCE_KEYS]
            parts.append(torch.tensor(host, dtype=torch.float64, device=device))
        # each rank's active tokens per (layer, micro-batch): their sum (in the mean's all-reduce) and largest give
        # `balance.shed_tokens` of every layer and micro-batch
        active = torch.tensor([[r[i].active_tokens for r in self.records] for i in layers], dtype=torch.float64,
                              device=device)
        largest = active.clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
        world = dist.get_world_size(group)
        reduced = state.all_reduce_mean(torch.cat(parts + [active.flatten()]), group)
        mean_load = torch.round(reduced[-active.numel():].view_as(active) * world) / world
        shed = (largest - torch.ceil(mean_load)).amax(dim=1)
        host = torch.cat([reduced[:-active.numel()], shed]).tolist()
        mean, shed = host[:-len(layers)], host[-len(layers):]
        feedback = {i: LayerFeedback(mean[j], int(shed[j])) for j, i in enumerate(layers)}
        mean = mean[len(layers):]
        out = {f"skip/rate/L{i}": mean[j] for j, i in enumerate(layers)}
        out["skip/exec_rate"] = sum(mean[:len(layers)]) / len(layers)
        out["skip/aux_loss"] = mean[len(layers)]
        mean = mean[len(layers) + 1:]
        if predicted:
            out.update({f"skip/predictor_agreement/L{i}": v for i, v in zip(predicted, mean)})
            out["skip/predictor_agreement"] = sum(mean[:len(predicted)]) / len(predicted)
            mean = mean[len(predicted):]
        if balanced:
            out.update({f"skip/{k}": v for k, v in zip(BALANCE_KEYS, mean)})
        return out, feedback
