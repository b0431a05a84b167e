"""SRU++ blocks ("When Attention Meets Fast Recurrence", Lei, EMNLP 2021) as a drop-in for the transformer `Block`.

One SRU++ layer, for a block input x [b, s, d] and the projection width d' (default d / 4):

    Q = W_q RMSNorm(x)                                 [b, s, d']
    A = Attention(Q, K = W_k Q, V = W_v Q)             causal softmax attention, no positions (the recurrence
                                                       carries order); single head by default
    U = W_o LayerNorm(Q + alpha * A)                   [b, s, 3d]: per hidden unit the candidate, forget and reset
                                                       inputs; alpha is a learned scalar starting at 0
    f_t, r_t, c_t, h_t = the SRU recurrence over U     with the v * c_{t-1} terms and the highway (1 - r_t) * x_t
                                                       (see training/kernels/reference.py)

Layers without attention (`model.srupp.attention_every`) drop the A term and keep the low-rank projection
U = W_o LayerNorm(Q), as the paper's non-attention layers do. There is no feed-forward sub-layer: the recurrence is it.

Normalization and residual placement, against the paper:
- LayerNorm(Q + alpha * A) inside the attention sub-layer is the paper's (post-norm on the attention output, before
  W_o), and is applied in the non-attention layers too, so both kinds of layer see the same input scale.
- The block input is normalized before W_q (pre-norm, RMSNorm like the rest of skiptron). The paper's enwik8/wiki-103
  models have no such norm; its released code offers it as the pre-norm `layer_norm` option, and pre-norm keeps deep
  stacks stable and matches the transformer blocks and the final norm in `Head` (so mixing or swapping blocks keeps
  one residual-stream convention).
- The residual is the highway: h = r * c + (1 - r) * x with the un-normalized x, the paper's own skip connection; no
  extra `x +`. With the reset bias at -2 each layer starts close to the identity (r ~ 0.12).

Tensor parallelism shards the hidden units, which the recurrence treats independently: W_o is column-parallel (megatron
`stride=3`, so each rank holds the candidate/forget/reset rows of the same units), v and the gate biases are split the
same way, each rank runs the recurrence on its units with its slice of x for the highway, and the unit outputs are
gathered back to [b, s, d] (the layer has no output matrix to make row-parallel; the gather is what the paper's layer
needs and adds no parameters). W_q is row-parallel over the input features (its all-reduce is only d' wide). The
attention over d' is small and runs replicated on every rank. Every weight is drawn whole from the shared seed and
sharded, so any TP layout starts from the TP=1 weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp
from torch import nn

from skiptron.parallel.tensor_parallel import gather_tp
from .config import ModelConfig
from .kernels import sru_recurrence
from .layers import NormalLinear, normal_init, rms_norm
from .selection import Packed


def _local_units(t: torch.Tensor) -> torch.Tensor:
    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return t.chunk(tp, dim=-1)[rank].contiguous()


class _ScatterUnits(torch.autograd.Function):
    """This rank's slice of the last (hidden) dimension; the backward gathers the slices' gradients. (megatron-core's
    own scatter/gather allocate on the current CUDA device, so they cannot run on gloo/CPU.)"""

    @staticmethod
    def forward(ctx, x):
        return _local_units(x)

    @staticmethod
    def backward(ctx, grad):
        return gather_tp(grad, dim=-1)


class _GatherUnits(torch.autograd.Function):
    """The whole last (hidden) dimension from every rank's slice; the backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        return gather_tp(x, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return _local_units(grad)


@dataclass
class SRUppState:
    """What one layer carries from token to token when decoding: the recurrence state c [b, local units] and, for
    attention layers, the keys and values of every token so far [b, heads, t, head dim]; `present` [b, t] marks the
    keys that are visible (None: all), for a routed layer whose skipped tokens are cached but invisible."""

    c: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    present: torch.Tensor | None = None


class ProjectedAttention(nn.Module):
    """A = softmax(Q K^T / sqrt(head dim)) V with K, V = W_kv Q, causal, in the projected width d'. Replicated over
    TP ranks (d' is small; the paper uses one head, which could not be split anyway)."""

    def __init__(self, proj: int, heads: int, init_std: float):
        super().__init__()
        self.heads, self.head_dim = heads, proj // heads
        self.kv = NormalLinear(proj, 2 * proj, bias=False, std=init_std)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, q: torch.Tensor, state: SRUppState | None, present: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Attention output [b, n, d'] for the n new queries, and the keys/values and visibility (`SRUppState`)
        including them. With a state, the new tokens follow the `state.k.shape[2]` earlier ones and see the visible
        ones; `present` [b, n] marks which new tokens are visible (None: all). An absent token's own row sees
        everything, so its (unused) output stays finite."""
        k, v = (self._split(t) for t in self.kv(q).chunk(2, dim=-1))
        qh = self._split(q)
        seen = state.present if state is not None and state.k is not None else None
        if present is not None or seen is not None:
            old = 0 if state is None or state.k is None else state.k.shape[2]
            seen = torch.cat([seen if seen is not None else q.new_ones(q.shape[0], old, dtype=torch.bool),
                              present if present is not None else q.new_ones(q.shape[:2], dtype=torch.bool)], dim=1)
        if state is not None and state.k is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        n, total = qh.shape[2], k.shape[2]
        if seen is None and total == n:
            y = F.scaled_dot_product_attention(qh, k, v, is_causal=True)
        else:
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=total - n)[None]
            if seen is not None:
                mask = mask & seen[:, None, :] | ~seen[:, -n:, None]
            y = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask[:, None])
        b, _, n, _ = y.shape
        return y.transpose(1, 2).reshape(b, n, -1), k, v, seen


class SRUppBlock(nn.Module):
    """One SRU++ layer with the interface of `Block`: forward(x [b, s, d], positions [s]) -> [b, s, d]. `positions` is
    unused (no positional encoding); `step` is the same layer for incremental decoding."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, layer: int):
        super().__init__()
        sc = cfg.srupp
        d, proj, tp = cfg.hidden_size, sc.projection(cfg.hidden_size), mcfg.tensor_model_parallel_size
        if d % tp:
            raise ValueError(f"SRU++: hidden size {d} is not divisible by tensor-parallel size {tp}")
        self.local_units = d // tp
        self.norm = rms_norm(d, cfg.norm_eps)
        self.query = mtp.RowParallelLinear(
            d, proj, config=mcfg, init_method=normal_init(cfg.init_std), bias=False, input_is_parallel=True,
            skip_bias_add=False)
        self.attention = ProjectedAttention(proj, sc.num_heads, cfg.init_std) if sc.has_attention(layer) else None
        self.alpha = nn.Parameter(torch.zeros(1)) if self.attention is not None else None
        self.proj_norm = nn.LayerNorm(proj, eps=cfg.norm_eps)
        self.gates = mtp.ColumnParallelLinear(
            proj, 3 * d, config=mcfg, init_method=normal_init(cfg.init_std), bias=False, gather_output=False, stride=3)
        # v_f, v_r: E[v] = 0, Var[v] = 1/2 (the SRU paper's choice); forget bias 0, reset bias `highway_bias`.
        weight_c = (torch.rand(2, d) * 2 - 1) * math.sqrt(3 * 0.5)
        bias = torch.tensor([0.0, sc.highway_bias])[:, None].expand(2, d)
        self.weight_c = self._sharded(weight_c)
        self.bias = self._sharded(bias)

    def _sharded(self, full: torch.Tensor) -> nn.Parameter:
        """This rank's columns of a [2, d] per-unit parameter, marked so gathering and grad norms treat it as TP."""
        rank = ps.get_tensor_model_parallel_rank()
        param = nn.Parameter(full[:, rank * self.local_units:(rank + 1) * self.local_units].clone())
        mtp.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=1, stride=1)
        return param

    @property
    def has_attention(self) -> bool:
        return self.attention is not None

    def step(self, x: torch.Tensor, state: SRUppState | None = None, present: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, SRUppState]:
        """Run the layer on x [b, n, d], the n tokens that follow `state` (None: the start of the sequence); return
        the output [b, n, d] and the state after them. `present` [b, n] (decoding through a routed layer, n = 1):
        a token that is not present leaves the recurrence state as it was and its key invisible; its output is
        meaningless (the router passes the token through)."""
        if present is not None and x.shape[1] != 1:
            raise ValueError("SRU++ step: per-token presence needs one token per call (the fused recurrence has no "
                             "per-token mask)")
        q, _ = self.query(_ScatterUnits.apply(self.norm(x)))
        k = v = seen = None
        if self.attention is not None:
            a, k, v, seen = self.attention(q, state, present)
            q = q + self.alpha * a
        u, _ = self.gates(self.proj_norm(q))
        b, n, _ = x.shape
        u = u.view(b, n, 3, self.local_units)
        x_local = _ScatterUnits.apply(x)
        c0 = state.c if state is not None else x.new_zeros(b, self.local_units)
        h, c = sru_recurrence(u, x_local, self.weight_c, self.bias, c0)
        if present is not None:
            c = torch.where(present, c, c0)
        return _GatherUnits.apply(h), SRUppState(c, k, v, seen)

    def forward_selected(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Outputs [selected tokens, d] (row-major order) of the layer run over each sequence's selected tokens alone,
        in order: `packed` holds their positions, left-aligned (`selection.pack_positions`; the padding comes after
        them, so the causal recurrence and attention never carry it into a selected token)."""
        b, m = packed.index.shape
        if m == 0:
            return x.new_zeros(0, x.shape[-1])
        rows = torch.gather(x, 1, packed.index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.step(rows)[0].reshape(b * m, x.shape[-1]).index_select(0, packed.slots)

    def step_selected(self, x: torch.Tensor, state: SRUppState | None, present: torch.Tensor
                      ) -> tuple[torch.Tensor, SRUppState]:
        """`step` for routed decoding: token by token, each sequence's state advanced only over its present
        ([b, n]) tokens, which gives `forward_selected`'s outputs for them."""
        outs = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t:t + 1], state, present[:, t:t + 1])
            outs.append(y)
        return torch.cat(outs, dim=1), state

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.step(x)[0]
