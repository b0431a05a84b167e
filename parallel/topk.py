"""Exact top-k over the scores of a whole process group: capacity routing picks the k highest router scores of the
DP batch, and at hundreds of ranks the batch's scores are too many to send to every rank.

The k highest of every rank's scores taken together, ties to the lower global index (rank-major, then the local
flat index), the same split derived on every rank. Two ways to the same result:

- `gather`: every rank's scores (one all_gather, then a sort of world x n values). For small groups and batches,
  where one collective beats several.
- `select`: radix selection of the k-th highest value over the scores' order-preserving 32-bit keys, a byte per
  round. Each round all-reduces a 256-bin histogram of the next byte over the tokens still tied with the k-th (4
  rounds of 2 KiB, whatever the world and batch size); then one all_gather of each rank's (above, tied) counts, two
  integers, splits the ties by rank. Per rank O(n) work, no sort, and no host synchronization (`tests/test_topk.py`
  counts the reads).

`auto` gathers while the group's scores number at most `GATHER_MAX`, else selects. The collective that starts first
is in flight when `start_top_k` returns: the caller computes what does not depend on the split, then `wait()`s.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .state import all_gather_async, all_gather_tensor

GATHER_MAX = 1 << 16  # scores in the whole group up to which one all_gather (and a sort) is cheaper than selection
METHODS = ("auto", "gather", "select")


class PendingTopK:
    """A top-k split whose collective is in flight: `wait()` -> (this rank's mask, shaped as its scores; every
    rank's count of chosen scores [world], None over one rank)."""

    def __init__(self, finish: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]):
        self._finish = finish

    def wait(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._finish()


def start_top_k(scores: torch.Tensor, k: int, group=None, method: str = "auto") -> PendingTopK:
    """Start choosing the k highest of `scores` (fp32, any shape, the same numel on every rank of `group`) over the
    whole group. Collective: every rank of the group calls it with the same k and method."""
    if method not in METHODS:
        raise ValueError(f"top-k method {method!r} is not one of {METHODS}")
    world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    flat = scores.detach().flatten().float()
    if not 0 <= k <= world * flat.numel():
        raise ValueError(f"top-k: k = {k} outside 0 .. {world * flat.numel()} scores of the group")
    if method == "select" or (method == "auto" and world > 1 and world * flat.numel() > GATHER_MAX):
        if not dist.is_initialized():
            raise ValueError("top-k by selection needs an initialized process group")
        return _start_select(flat, scores.shape, k, group, world)
    return _start_gather(flat, scores.shape, k, group, world)


def _start_gather(flat, shape, k: int, group, world: int) -> PendingTopK:
    gathered = all_gather_async(flat, group if world > 1 else None)

    def finish():
        everything = gathered.wait()
        chosen = torch.zeros_like(everything, dtype=torch.bool)
        chosen[torch.argsort(-everything, stable=True)[:k]] = True
        rank = dist.get_rank(group) if world > 1 else 0
        counts = chosen.view(world, -1).sum(1) if world > 1 else None
        return chosen[rank * flat.numel():(rank + 1) * flat.numel()].view(shape), counts
    return PendingTopK(finish)


def sortable_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) ordered as the fp32 values x are (-0.0 just below +0.0): the IEEE bits of a
    non-negative float grow with it, a negative float's magnitude bits are reversed below them."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + 2**31, 2**31 - 1 - (bits & 0x7FFFFFFF))


def _histogram(digits: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Counts [256] (int64) of the candidates' digits (the others counted in a 257th bin, dropped). A scatter-add
    into fixed bins: `bincount` reads its input's largest value to size its output, a host synchronization on CUDA
    (a scatter-add of a 1-d tensor is deterministic there, and exact for integers anywhere)."""
    bins = torch.where(candidate, digits, 256)
    return torch.zeros(257, dtype=torch.int64, device=digits.device).scatter_add_(
        0, bins, torch.ones((), dtype=torch.int64, device=digits.device).expand_as(bins))[:256]


def _start_select(flat, shape, k: int, group, world: int) -> PendingTopK:
    device = flat.device
    if k == 0:
        zeros = torch.zeros(world, dtype=torch.int64, device=device)
        return PendingTopK(lambda: (torch.zeros(shape, dtype=torch.bool, device=device), zeros))
    keys = sortable_keys(flat)
    shifts = (24, 16, 8, 0)
    candidate = torch.ones_like(flat, dtype=torch.bool)
    hist = _histogram((keys >> shifts[0]) & 255, candidate)
    first = dist.all_reduce(hist, group=group, async_op=True)

    def finish():
        nonlocal hist, candidate
        first.wait()
        needed = torch.tensor([k], dtype=torch.int64, device=device)  # of the tokens tied so far, how many to take
        threshold = torch.zeros((), dtype=torch.int64, device=device)
        for i, shift in enumerate(shifts):
            if i:
                hist = _histogram((keys >> shift) & 255, candidate)
                dist.all_reduce(hist, group=group)
            at_or_above = hist.flip(0).cumsum(0)  # [j]: candidates whose digit is >= 255 - j
            j = torch.searchsorted(at_or_above, needed)  # the first digit from the top that reaches `needed`
            digit = 255 - j
            needed = needed - (at_or_above[j] - hist[digit])  # minus the candidates with a higher digit
            threshold = threshold | (digit[0] << shift)
            candidate = candidate & (((keys >> shift) & 255) == digit)
        above = keys > threshold
        counts = torch.stack([above.sum(), candidate.sum()])[None]  # candidate: now exactly the ties at the threshold
        everyone = torch.empty(world, 2, dtype=torch.int64, device=device)
        all_gather_tensor(everyone, counts, group=group)
        tied_before = everyone[:, 1].cumsum(0) - everyone[:, 1]
        taken = (needed - tied_before).clamp(min=0).minimum(everyone[:, 1])  # ties each rank takes, lower ranks first
        rank = dist.get_rank(group) if world > 1 else 0
        chosen_ties = candidate & (candidate.cumsum(0) <= taken[rank])
        return (above | chosen_ties).view(shape), everyone[:, 0] + taken
    return PendingTopK(finish)
