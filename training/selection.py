"""The tokens a routed layer computes, found with one read from the device per layer.

Gathering the active rows of a [b, s] mask needs their number on the host (it shapes every tensor that follows),
and packing them per sequence needs the longest sequence's count. A GPU stalls the host at each such read: the host
stops running ahead of the kernels and the device idles while it catches up. So a routed layer reads everything it
needs at once (`read_counts`: each sequence's count, and the DP ranks' counts when the balancer wants them), and
the rest is derived on the device with those sizes known (`torch.nonzero_static`, which does not synchronize).

    counts, rank_counts = read_counts(active, decision.rank_counts)
    tokens = chosen_tokens(active, counts)       # tokens.rows [n]: flat indices in [b * s], row-major
    packed = pack_positions(tokens)              # per sequence, left-aligned: for attention and SRU++
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class Tokens(NamedTuple):
    """A [b, s] mask's tokens: `counts` per sequence (host ints) and `rows` [n], their flat indices in [b * s] in
    row-major order."""

    mask: torch.Tensor
    counts: tuple[int, ...]
    rows: torch.Tensor


class Packed(NamedTuple):
    """A mask's tokens packed per sequence: `index` [b, m] their positions, ascending and left-aligned, `valid` [b, m]
    the real entries (m: the longest sequence's count), `slots` [n] the valid entries' places in [b * m] and `rows`
    [n] the tokens' flat indices in [b * s], both in row-major order."""

    index: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor


def read_counts(mask: torch.Tensor, rank_counts: torch.Tensor | None = None
                ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Each sequence's count of `mask` [b, s], and `rank_counts` (every DP rank's count [world], or None), on the
    host: one device-to-host transfer."""
    parts = [mask.sum(1)]
    if rank_counts is not None:
        parts.append(rank_counts.to(parts[0].dtype))
    host = torch.cat(parts).tolist()
    b = mask.shape[0]
    return tuple(host[:b]), (tuple(host[b:]) if rank_counts is not None else None)


def chosen_tokens(mask: torch.Tensor, counts: Sequence[int] | None = None) -> Tokens:
    """The tokens of `mask` [b, s]; `counts`: each sequence's count as `read_counts` gives it (None: read here)."""
    if counts is None:
        counts, _ = read_counts(mask)
    rows = torch.nonzero_static(mask.flatten(), size=sum(counts)).squeeze(1)
    return Tokens(mask, tuple(counts), rows)


def pack_positions(tokens: Tokens) -> Packed:
    """`tokens` packed per sequence; valid entries in row-major order are the tokens in the order of `tokens.rows`."""
    mask = tokens.mask
    m = max(tokens.counts, default=0)
    index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=mask.device)[None, :] < mask.sum(1)[:, None]  # no host-to-device copy
    slots = torch.nonzero_static(valid.flatten(), size=tokens.rows.numel()).squeeze(1)
    return Packed(index, valid, slots, tokens.rows)
