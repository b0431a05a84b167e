"""Blending prepared data sources with weights: which source global sample p comes from, in O(1).

The mixture is a fixed schedule of BLOCK slots repeated forever: source j gets c_j = round(w_j * BLOCK) slots
(largest remainder, so they sum to BLOCK), its k-th slot placed at its ideal time (k + 1/2) / c_j of the block,
so every prefix of the stream is within a sample or two of the weights (as Megatron's BlendedDataset, which
gives each sample to the source furthest below its share). Global sample p is source `order[p % BLOCK]`, and that source's own sample number is
`(p // BLOCK) * c_j + count of j in order[:p % BLOCK]`: the position of every source at any global position is
arithmetic, so resuming (under any DP size) needs only the global sample count. Each source is its own exact
stream (training/loader.py) read at its own positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

BLOCK = 10_000


@dataclass(frozen=True)
class Source:
    """One prepared data directory in a blend; `name` (the directory's name) labels its metrics."""

    name: str
    weight: float
    path: str


def parse_blend(spec: Sequence) -> list[Source]:
    """`[[0.7, dir], [0.3, dir]]` or Megatron's flat `[0.7, dir, 0.3, dir]` -> sources; ValueError says what is wrong."""
    if not spec:
        raise ValueError("empty blend: give [[weight, dir], ...] or [weight, dir, weight, dir, ...]")
    if all(isinstance(item, (list, tuple)) for item in spec):
        pairs = [tuple(item) for item in spec]
    elif len(spec) % 2 == 0:
        pairs = [(spec[i], spec[i + 1]) for i in range(0, len(spec), 2)]
    else:
        raise ValueError(f"a flat blend alternates weight and dir; got {len(spec)} items")
    sources = []
    for pair in pairs:
        if len(pair) != 2 or isinstance(pair[0], bool) or not isinstance(pair[0], (int, float)) \
                or not isinstance(pair[1], str):
            raise ValueError(f"blend entry {list(pair)} is not [weight, dir]")
        weight, path = float(pair[0]), pair[1]
        if not weight > 0:
            raise ValueError(f"blend weight of {path} must be > 0, got {pair[0]}")
        sources.append(Source(Path(path).name, weight, path))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"blend sources must have distinct directory names (they label the metrics): {names}")
    total = sum(s.weight for s in sources)
    return [Source(s.name, s.weight / total, s.path) for s in sources]


class Mixture:
    """The repeating schedule of a blend (see the module docstring)."""

    def __init__(self, weights: Sequence[float]):
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        exact = w * BLOCK
        counts = np.floor(exact).astype(np.int64)
        for j in np.argsort(-(exact - counts), kind="stable")[: BLOCK - counts.sum()]:
            counts[j] += 1
        if (counts == 0).any():
            raise ValueError(f"blend weights {list(np.round(w, 6))}: each must be at least {1 / BLOCK}")
        # the k-th slot of source j ideally sits at (k + 1/2) * BLOCK / c_j: sorting those times (ties by source)
        # gives every prefix within about one sample of each share
        source = np.repeat(np.arange(len(w)), counts)
        ideal = (np.concatenate([np.arange(c) for c in counts]) + 0.5) / counts[source]
        order = source[np.lexsort((source, ideal))]
        self.counts, self.order = counts, order
        self.prefix = np.zeros((BLOCK + 1, len(w)), dtype=np.int64)  # prefix[t, j]: slots of j among order[:t]
        np.add.at(self.prefix[1:], (np.arange(BLOCK), order), 1)
        np.cumsum(self.prefix, axis=0, out=self.prefix)

    def consumed(self, p: int) -> np.ndarray:
        """Samples taken from each source among global positions [0, p)."""
        blocks, rest = divmod(p, BLOCK)
        return blocks * self.counts + self.prefix[rest]

    def locate(self, p: int) -> tuple[int, int]:
        """(source, that source's own position) of global sample p."""
        blocks, rest = divmod(p, BLOCK)
        j = int(self.order[rest])
        return j, int(blocks * self.counts[j] + self.prefix[rest, j])
