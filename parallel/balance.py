"""Data-parallel token balancing for per-token layer skipping.

A router lets each token skip a layer (or its MLP), so data-parallel ranks end up with different numbers of *active*
tokens. `balance` moves active tokens from over-loaded to under-loaded ranks so that every rank computes the same
number (within one token), and `BalancedTokens.restore` sends the results back to the tokens' home ranks, in their
original local order. All DP ranks hold the same weights and the DP gradient reduction sums contributions whichever
rank computed them, so forward results and gradients are those of computing locally (up to fp rounding).

    bt = balance([hidden, scale], group=dp_group())      # hidden [n, H], scale [n, 1]
    h, s = bt.tokens                                       # [m, H], [m, 1]: own kept tokens, then received ones
    out = bt.restore(mlp(h) * s)                           # [n, H], rows in the order of `hidden`
    log(bt.stats.imbalance_before, bt.stats.imbalance_after, bt.stats.tokens_moved, bt.stats.bytes_moved)

Communication per call: one all_gather of one int64 per rank into one tensor (the counts), then one all_to_all
forward in `balance` and one in each `restore` (and one each in backward). Several per-token tensors travel in the
same all_to_all, packed as bytes. When the counts are already balanced (no moves), no all_to_all happens; a group
of size 1 makes no collective at all.

When to exchange (`min_tokens`): an exchange shortens the step by the tokens the most loaded rank sheds (its load
minus the highest target), and costs a fixed latency per collective (two there and back in the forward, two in the
backward), on which every rank waits for the slowest. `balance` exchanges only when the most loaded rank would shed
at least `min_tokens` tokens; 0 exchanges whenever the counts are uneven (exact balance). Every rank decides from the
same gathered counts, so all skip together.

Rules (every rank derives the same plan from the same all-gathered counts):
* Targets: with total T over W ranks, q, r = divmod(T, W), every rank ends with q or q + 1 tokens. The r ranks
  that end with q + 1 are chosen first among the ranks holding more than q tokens (lowest rank first), then among
  the rest (lowest rank first). This makes the number of moved tokens the least any floor/ceil assignment allows
  (a rank at or below the floor never sends, a rank at or above the ceil never receives).
* Matching: surplus ranks and deficit ranks, each in rank order, are matched greedily (two pointers); only surplus
  ranks send and only deficit ranks receive, and at most (#senders + #receivers - 1) rank pairs exchange tokens.
  A rank computes only its own sends and receives, as overlaps of its interval on the cumulative surplus (or deficit)
  line with the other side's: a few numpy vector operations over the group, no Python loop over ranks (about 0.1 ms
  of host time per call at 1024 ranks, where the loops took 1 ms; the counts arrive in one gathered tensor).
* Which tokens: a sending rank keeps its first `n - surplus` tokens and sends its last `surplus` tokens, the first
  of those to the lowest destination rank. A receiving rank computes its own tokens followed by the received ones
  in source rank order.

Autograd: the exchange is a custom autograd Function (same mechanics as `torch.distributed.nn.functional.
all_to_all_single`, which is deprecated and moves one tensor per call): backward sends gradients back along the
reversed plan, so input gradients arrive at the origin tokens and parameter gradients accumulate on the rank that
computed the token (to be summed by the usual DP all-reduce). As with any collective in backward, all ranks of the
group must run the same backward: `requires_grad` of the inputs and the order of `balance`/`restore` calls must
agree across ranks (they do for DP replicas of one model).

Works on gloo (CPU) and NCCL (CUDA) unchanged: tensors stay on the device they come on; the counts are read back to
the host once per `balance` (the split sizes of the all_to_all must be known on the host).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .state import all_gather_tensor

__all__ = ["plan_targets", "plan_moves", "plan_transfers", "rank_splits", "shed_tokens", "BalanceStats",
           "BalancedTokens", "balance", "gather_counts"]


# --------------------------------------------------------------------------------------------------------- planning
class _Plan(NamedTuple):
    """The whole group's plan as int64 vectors over ranks: targets, and each rank's place on the two lines that the
    matching walks (sent tokens [send_start, send_end) in senders' rank order, received tokens [recv_start, recv_end)
    in receivers'). Sender i sends to receiver j the overlap of its interval with j's: the greedy two-pointer match in
    rank order, computed for any rank in a few vector operations, without Python loops over the group (numpy: a
    torch op's dispatch costs several times as much on vectors this short)."""

    counts: np.ndarray
    targets: np.ndarray
    send_start: np.ndarray
    send_end: np.ndarray
    recv_start: np.ndarray
    recv_end: np.ndarray


def _plan(counts: Sequence[int]) -> _Plan:
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if (c < 0).any():
        raise ValueError(f"token counts must be >= 0, got {list(counts)}")
    world = c.size
    q, r = divmod(int(c.sum()), max(world, 1))
    targets = np.full_like(c, q)
    if r:  # the r ceil targets: over-loaded ranks first, then the rest, each in rank order
        above = c > q
        n_above = int(above.sum())
        if r <= n_above:
            targets += above & (above.cumsum() <= r)
        else:
            targets += above | ((~above).cumsum() <= r - n_above)
    surplus, deficit = np.maximum(c - targets, 0), np.maximum(targets - c, 0)
    send_end, recv_end = surplus.cumsum(), deficit.cumsum()
    return _Plan(c, targets, send_end - surplus, send_end, recv_end - deficit, recv_end)


def _overlap(start, end, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    return np.maximum(np.minimum(ends, end) - np.maximum(starts, start), 0)


def _rank_splits(plan: _Plan, rank: int) -> tuple[list[int], list[int]]:
    """(send_splits, recv_splits) of one rank: rows to and from every rank of the group."""
    send = _overlap(plan.send_start[rank], plan.send_end[rank], plan.recv_start, plan.recv_end)
    recv = _overlap(plan.recv_start[rank], plan.recv_end[rank], plan.send_start, plan.send_end)
    return send.tolist(), recv.tolist()


def rank_splits(counts: Sequence[int], rank: int) -> tuple[list[int], list[int]]:
    """(send_splits, recv_splits) of `rank` under the plan for `counts`: its row and column of `plan_transfers`, what
    `balance` hands to its all_to_all, in O(W) vector operations."""
    return _rank_splits(_plan(counts), rank)


def plan_targets(counts: Sequence[int]) -> list[int]:
    """The load each rank ends with: floor or ceil of the mean, the ceil going to over-loaded ranks first."""
    return _plan(counts).targets.tolist()


def plan_moves(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """The plan as a sparse list of (src, dst, n) with n > 0, sorted by src then dst: the segments between the two
    lines' interval ends, each lying in one sender's and one receiver's interval; O(W log W)."""
    plan = _plan(counts)
    ends = np.union1d(plan.send_end, plan.recv_end)
    if not ends.size:
        return []
    starts = np.concatenate(([0], ends[:-1]))
    segments = ends > starts
    starts, lengths = starts[segments], (ends - starts)[segments]
    src = np.searchsorted(plan.send_end, starts, side="right")
    dst = np.searchsorted(plan.recv_end, starts, side="right")
    return list(zip(src.tolist(), dst.tolist(), lengths.tolist()))


def plan_transfers(counts: Sequence[int]) -> list[list[int]]:
    """Dense send matrix S: S[i][j] tokens go from rank i to rank j (S[i][i] == 0). See the module notes.

    Pure and deterministic. The matrix is W x W; for very large groups prefer `plan_moves`. `balance` computes only
    its own rank's row and column (`rank_splits`).
    """
    world = len(counts)
    send = [[0] * world for _ in range(world)]
    for src, dst, n in plan_moves(counts):
        send[src][dst] = n
    return send


# --------------------------------------------------------------------------------------------------------- exchange
def _pack(tensors: Sequence[torch.Tensor], n: int) -> tuple[torch.Tensor, list[tuple]]:
    """Tensors with first dim n as one [n, bytes] uint8 tensor, and the layout to unpack them."""
    layout, parts = [], []
    for t in tensors:
        t = t.contiguous()
        width = math.prod(t.shape[1:]) * t.element_size()
        layout.append((t.dtype, tuple(t.shape[1:]), width))
        parts.append(t.reshape(n, math.prod(t.shape[1:])).view(torch.uint8) if width
                     else t.new_empty((n, 0), dtype=torch.uint8))
    buf = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return buf, layout


def _unpack(buf: torch.Tensor, layout: list[tuple]) -> list[torch.Tensor]:
    n, out, col = buf.shape[0], [], 0
    for dtype, tail, width in layout:
        # A column slice is copied to a fresh tensor so its storage offset suits the wider dtype.
        part = buf if len(layout) == 1 else buf[:, col:col + width].clone(memory_format=torch.contiguous_format)
        col += width
        if width == 0:
            out.append(torch.empty((n, *tail), dtype=dtype, device=buf.device))
        else:
            out.append(part.view(dtype).reshape(n, *tail))
    return out


def _all_to_all(tensors: Sequence[torch.Tensor], send_splits: list[int], recv_splits: list[int], group) -> list:
    """Non-differentiable all_to_all of tensors sharing the first dim, in one collective."""
    n_in, n_out = sum(send_splits), sum(recv_splits)
    if len(tensors) == 1 and tensors[0].dtype not in (torch.bool,):
        src = tensors[0].contiguous()
        out = src.new_empty((n_out, *src.shape[1:]))
        dist.all_to_all_single(out, src, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
        return [out]
    buf, layout = _pack(tensors, n_in)
    out = buf.new_empty((n_out, buf.shape[1]))
    dist.all_to_all_single(out, buf, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    return _unpack(out, layout)


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class _Exchange(torch.autograd.Function):
    """all_to_all of several tensors forward; the reversed all_to_all of their gradients backward."""

    @staticmethod
    def forward(ctx, send_splits, recv_splits, group, *tensors):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        ctx.meta = [(t.shape[1:], t.dtype, _differentiable(t)) for t in tensors]
        ctx.device = tensors[0].device
        outs = _all_to_all(tensors, send_splits, recv_splits, group)
        non_diff = [o for o in outs if not _differentiable(o)]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n_out = sum(ctx.recv_splits)
        # The layout depends on dtypes only (never on which inputs need grad here), so it agrees across ranks.
        idx = [i for i, (_, _, diff) in enumerate(ctx.meta) if diff]
        send = []
        for i in idx:
            tail, dtype, _ = ctx.meta[i]
            g = grads[i]
            send.append(torch.zeros((n_out, *tail), dtype=dtype, device=ctx.device) if g is None else g.to(dtype))
        result = [None] * len(ctx.meta)
        if send:
            back = _all_to_all(send, ctx.recv_splits, ctx.send_splits, ctx.group)
            for i, g in zip(idx, back):
                result[i] = g
        return (None, None, None, *result)


class _Attach(torch.autograd.Function):
    """`main` unchanged, with an empty exchange output hooked into the graph so that its backward (a collective every
    rank must join) still runs on this rank."""

    @staticmethod
    def forward(ctx, main, empty):
        ctx.empty_shape, ctx.empty_dtype = empty.shape, empty.dtype
        return main.view_as(main)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.empty_shape, dtype=ctx.empty_dtype)


def _join(head: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """cat([head, tail]) where tail comes out of an exchange; keeps the exchange in the graph even when empty."""
    if tail.shape[0]:
        return torch.cat([head, tail], dim=0)
    if torch.is_grad_enabled() and tail.requires_grad and _differentiable(head):
        return _Attach.apply(head, tail)
    return head


# ------------------------------------------------------------------------------------------------------------ stats
@dataclass(frozen=True)
class BalanceStats:
    """One `balance` call. Loads are per-rank active token counts over the group; only scalars are kept, so a
    forward's statistics cost the same at any DP size."""

    imbalance_before: float          # max load / mean load (1.0 when all ranks hold 0 tokens)
    imbalance_after: float
    shed_tokens: int                 # what balancing takes off the most loaded rank (`shed_tokens`), moved or not
    tokens_moved: int                # tokens sent in total, all ranks together
    tokens_sent: int                 # by this rank
    tokens_received: int             # by this rank
    bytes_moved: int                 # sent by this rank in the forward `balance` exchange (all tensors together)


def _imbalance(loads: np.ndarray) -> float:
    total = int(loads.sum())
    return 1.0 if total == 0 else int(loads.max()) * loads.size / total


# ---------------------------------------------------------------------------------------------------------- balance
@dataclass
class BalancedTokens:
    """What this rank computes after balancing, and the way back.

    `tokens`: a tensor (or tuple, when `balance` got a list) of m rows: this rank's kept tokens in their original
    order, then the received ones (by source rank, each source's in its order). `restore(y)` takes m rows (a tensor
    or a sequence of tensors, each with first dim m, any trailing shape and dtype) and returns n_local rows each, in
    the original local order of the tokens given to `balance`.
    """

    tokens: torch.Tensor | tuple[torch.Tensor, ...]
    stats: BalanceStats
    n_local: int
    n_kept: int
    send_splits: list[int] = field(repr=False)
    recv_splits: list[int] = field(repr=False)
    group: object = field(default=None, repr=False)
    moved: bool = False  # whether any token moves anywhere in the group (else no all_to_all happens)

    @property
    def num_tokens(self) -> int:
        """m: the rows this rank computes."""
        return self.n_kept + sum(self.recv_splits)

    def restore(self, y):
        single = isinstance(y, torch.Tensor)
        ys = [y] if single else list(y)
        if not ys:
            raise ValueError("restore needs at least one tensor")
        for t in ys:
            if t.shape[0] != self.num_tokens:
                raise ValueError(f"restore expects {self.num_tokens} rows, got shape {tuple(t.shape)}")
        if not self.moved:
            return y if single else tuple(ys)
        back = _Exchange.apply(self.recv_splits, self.send_splits, self.group,
                               *[t[self.n_kept:] for t in ys])
        out = [_join(t[:self.n_kept], b) for t, b in zip(ys, back)]
        return out[0] if single else tuple(out)


def gather_counts(n: int, group, device: torch.device) -> tuple[int, ...]:
    """Every rank's row count n over `group` (one all_gather; (n,) without a process group)."""
    world = 1 if not dist.is_initialized() else dist.get_world_size(group)
    if world == 1:
        return (int(n),)
    local = torch.tensor([n], dtype=torch.int64, device=device)
    gathered = local.new_empty(world)
    all_gather_tensor(gathered, local, group=group)
    return tuple(gathered.tolist())


def shed_tokens(counts: Sequence[int]) -> int:
    """How many tokens the most loaded rank's load drops by when `counts` are balanced: what an exchange saves."""
    return _shed(_plan(counts)) if len(counts) else 0


def _shed(plan: _Plan) -> int:
    return int(plan.counts.max() - plan.targets.max())


def balance(x, group=None, min_tokens: int = 0, counts: tuple[int, ...] | None = None) -> BalancedTokens:
    """Balance active tokens over `group` (default: the world). Collective: every rank of the group must call it.

    x: a tensor [n_local, ...] or a sequence of tensors sharing the first dim n_local (any dtypes, same device),
    moved together. See the module notes for the plan, which tokens move, and autograd. No token moves when the most
    loaded rank would shed fewer than `min_tokens` tokens (`shed_tokens`; 0: balance any unevenness).
    `counts`: every rank's n_local when the caller already has them, the same tuple on every rank (`gather_counts`
    of an earlier call on the same rows, or a routing rule that gathered its decisions): no collective then, unless
    tokens move. A collective skipped is a synchronization point less, per routed layer and micro-batch.
    """
    single = isinstance(x, torch.Tensor)
    xs = [x] if single else list(x)
    if not xs:
        raise ValueError("balance needs at least one tensor")
    n = xs[0].shape[0]
    device = xs[0].device
    for t in xs:
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"all tensors need the same first dim {n}, got {[tuple(t.shape) for t in xs]}")
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in xs]}")

    world = 1 if not dist.is_initialized() else dist.get_world_size(group)
    rank = 0 if world == 1 else dist.get_rank(group)
    if counts is None:
        counts = gather_counts(n, group, device)
    elif len(counts) != world or counts[rank] != n:
        raise ValueError(f"balance: counts {tuple(counts)} given for a group of {world} ranks, but rank {rank} has "
                         f"{n} rows")
    if min_tokens < 0:
        raise ValueError(f"balance: min_tokens must be >= 0, got {min_tokens}")
    plan = _plan(counts)
    shed = _shed(plan)
    moved = world > 1 and shed >= min_tokens and int(plan.send_end[-1]) > 0
    if moved:
        send_splits, recv_splits = _rank_splits(plan, rank)
    else:
        send_splits = recv_splits = [0] * world
    sent, received = sum(send_splits), sum(recv_splits)
    after = plan.targets if moved else plan.counts
    per_token_bytes = sum(math.prod(t.shape[1:]) * t.element_size() for t in xs)
    stats = BalanceStats(
        imbalance_before=_imbalance(plan.counts), imbalance_after=_imbalance(after),
        shed_tokens=shed, tokens_moved=int(plan.send_end[-1]) if moved else 0, tokens_sent=sent,
        tokens_received=received,
        bytes_moved=sent * per_token_bytes,
    )
    n_kept = n - sent
    if not moved:
        tokens = xs
    else:
        recv = _Exchange.apply(send_splits, recv_splits, group, *[t[n_kept:] for t in xs])
        tokens = [_join(t[:n_kept], r) for t, r in zip(xs, recv)]
    return BalancedTokens(
        tokens=tokens[0] if single else tuple(tokens), stats=stats, n_local=n, n_kept=n_kept,
        send_splits=send_splits, recv_splits=recv_splits, group=group, moved=moved,
    )
