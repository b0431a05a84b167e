"""The building blocks every model part shares: norms, megatron-core parallel linears, rotary positions, attention,
the SwiGLU MLP and the transformer block.

`training/model.py` assembles the model from them; the router (`training/routing.py`) wraps a `Block` and SRU++
(`training/srupp.py`) reuses the norm and the initialization. They all import from here, so imports point one way
(layers <- routing, srupp <- model). See model.py's docstring for the tensor- and sequence-parallel layout.
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

from skiptron.parallel import sequence_parallel as sp
from skiptron.parallel.tensor_parallel import copy_to_tp_region, split_tp

from . import attention as kernels
from .config import ModelConfig, RopeScaling
from .fused_projections import heads_rotated, swiglu
from .norms import RMSNorm
from .selection import Packed

try:
    from apex.normalization import FusedRMSNorm as _ApexRMSNorm
except ImportError:
    _ApexRMSNorm = None


def rms_norm(size: int, eps: float) -> nn.Module:
    """apex's fused RMSNorm on GPU when importable, `norms.RMSNorm` otherwise (identical math)."""
    if _ApexRMSNorm is not None and torch.cuda.is_available():
        return _ApexRMSNorm(size, eps=eps)
    return RMSNorm(size, eps=eps)


def megatron_config(tp: int) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def normal_init(std: float):
    """N(0, std) drawn in fp32 on the CPU from torch's CPU generator, whatever the device and dtype of `w` (under
    `deepspeed.zero.Init` megatron's whole weight is made on the target device in the training precision): every
    device, precision and layout starts from the same numbers, those of an fp32 TP=1 build."""

    def init(w: torch.Tensor) -> torch.Tensor:
        if w.device.type == "cpu" and w.dtype == torch.float32:
            return nn.init.normal_(w, mean=0.0, std=std)
        with torch.no_grad():
            return w.copy_(torch.normal(0.0, std, size=tuple(w.shape), device="cpu"))

    return init


class NormalLinear(nn.Linear):
    """An nn.Linear initialized N(0, std), bias zero, inside its own constructor: under `deepspeed.zero.Init` a
    module's parameters are partitioned as soon as its constructor returns, so a parent could not re-initialize
    them afterwards. nn.Linear's own draws still happen first, so torch's RNG advances as it always did."""

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float):
        self.std = std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        normal_init(self.std)(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ScoreLinear(NormalLinear):
    """A one-output NormalLinear (a router's score w . x + b), computed as a matrix-vector product. As a [n, d] x
    [d, 1] matmul its backward runs a K = 1 and an N = 1 GEMM, which the CPU's BLAS does at 2-5 GFLOP/s: 15 ms of a
    routed step at `tiny` with 8 layers (docs/benchmarks.md); gemv and the outer product its backward takes are
    memory-bound passes. A module, so ZeRO-3's hooks gather its parameters as for any linear."""

    def __init__(self, in_features: int, bias: bool, std: float):
        super().__init__(in_features, 1, bias=bias, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.mv(x.reshape(-1, x.shape[-1]), self.weight.squeeze(0)).view(*x.shape[:-1], 1)
        return score if self.bias is None else score + self.bias


class SequenceParallelRowLinear(mtp.RowParallelLinear):
    """A RowParallelLinear whose output is reduce-scattered along the sequence ([b, s, d] partial sums -> this
    rank's [b, s/tp, d]) instead of all-reduced. Same parameters and initialization; a subclass, so ZeRO-3's module
    hooks and mask finetuning's forward wrapper (training/masking.py) apply to it as to its parent."""

    def forward(self, x: torch.Tensor):
        y = sp.reduce_scatter_to_sequence(F.linear(x, self.weight))
        return (y if self.bias is None else y + self.bias), None


def row_parallel_linear(sequence_parallel: bool, *args, **kwargs) -> mtp.RowParallelLinear:
    return (SequenceParallelRowLinear if sequence_parallel else mtp.RowParallelLinear)(*args, **kwargs)


def shard_local(*params: nn.Parameter | None) -> None:
    """Sequence parallelism: these replicated parameters (norm gains, row-parallel biases) see only this rank's
    tokens; their gradients are summed over TP."""
    for param in params:
        if param is not None:
            sp.sum_grad_over_tp(param)


def rotary_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] (transformers' default and `llama3` rope types), fp32, built on
    `device` (no host-to-device copy, which would synchronize a GPU stream at every layer)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    if scaling is None:
        return inv_freq
    old = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form, as in Llama and Hugging Face). The angles are computed from the
    positions themselves (fp32, as transformers does), so any position works: decoding past model.seq_len included."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [s, hd] (or [b, 1, s, hd] for positions [b, s]) in `dtype`, for `rotate`; computed once for
        the queries and keys of a layer."""
        inv_freq = rotary_inv_freq(self.head_dim, self.theta, self.scaling, positions.device)
        freqs = positions.to(torch.float32)[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [b, heads, s, hd] rotated by the angles of `angles`."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [b, heads, s, hd]; positions: [s] or [b, s]."""
        return self.rotate(x, *self.angles(positions, x.dtype))


class KVProjection(nn.Module):
    """Keys and values of grouped-query attention, [K; V] rows of the KV heads this TP rank's query heads use.

    The whole weight is [K; V] (2 x kv heads x head dim rows, drawn whole from the shared seed). With kv heads
    divisible by TP each rank keeps its heads' rows (megatron's stride-2 split, like a ColumnParallelLinear). With
    fewer kv heads than TP ranks (multi-query, or GQA at a high TP) every rank keeps the whole weight, replicated,
    and uses its head's rows; the weight enters through megatron's copy region, so its gradient (each rank's rows)
    is summed over TP and the replicas stay identical, and DeepSpeed counts it once in the gradient norm like any
    replicated parameter. Checkpoints hold the whole [K; V] either way, so they reshard between the two."""

    def __init__(self, hidden: int, kv_heads: int, head_dim: int, tp: int, bias: bool, init_method,
                 sequence_parallel: bool = False):
        super().__init__()
        tp_rank = ps.get_tensor_model_parallel_rank()
        full = torch.empty(2 * kv_heads * head_dim, hidden)
        init_method(full)
        self.sequence_parallel = sequence_parallel
        self.replicated = kv_heads < tp
        if self.replicated:
            head = tp_rank * kv_heads // tp
            self.rows = (slice(head * head_dim, (head + 1) * head_dim),
                         slice((kv_heads + head) * head_dim, (kv_heads + head + 1) * head_dim))
            self.weight = nn.Parameter(full)
            self.bias = nn.Parameter(torch.zeros(full.shape[0])) if bias else None
            return
        self.weight = nn.Parameter(split_tp(full, 0, 2, tp, tp_rank))
        mtp.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=2)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.weight.shape[0]))
            mtp.set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=2)

    def _local(self, param: torch.Tensor | None) -> torch.Tensor | None:
        if param is None or not self.replicated:
            return param
        whole = copy_to_tp_region(param)
        return torch.cat([whole[rows] for rows in self.rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> this rank's [K; V] [..., 2 x local kv heads x head dim]. With sequence parallelism x is
        the gathered sequence, whose backward already sums the input gradient over TP."""
        if not self.sequence_parallel:
            x = copy_to_tp_region(x)
        return F.linear(x, self._local(self.weight), self._local(self.bias))


class Attention(nn.Module):
    """Causal self-attention; heads are split over TP ranks (column-parallel QKV, row-parallel output).

    Multi-head (num_kv_heads = num_heads): one fused `qkv` projection (megatron stride 3: each rank holds [q; k; v]
    of its heads). Grouped-query (fewer kv heads): `q` (column-parallel) and `kv` (`KVProjection`, split or
    replicated over TP). Either way `project(x, parts)` gives this rank's rows [q; k; v] of its heads."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, sequence_parallel: bool = False):
        super().__init__()
        tp = mcfg.tensor_model_parallel_size
        self.local_heads = cfg.num_heads // tp
        self.local_kv_heads = max(cfg.kv_heads // tp, 1)
        self.head_dim = cfg.head_dim
        self.sequence_parallel = sequence_parallel
        self.kv_all_kernel = cfg.skip.kv_all_kernel
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        bias = cfg.bias or cfg.qkv_bias
        if cfg.kv_heads == cfg.num_heads:
            self.qkv = mtp.ColumnParallelLinear(
                cfg.hidden_size, 3 * cfg.hidden_size, config=mcfg, init_method=normal_init(cfg.init_std),
                bias=bias, gather_output=False, stride=3, disable_grad_reduce=sequence_parallel)
        else:
            self.q = mtp.ColumnParallelLinear(
                cfg.hidden_size, cfg.hidden_size, config=mcfg, init_method=normal_init(cfg.init_std), bias=bias,
                gather_output=False, disable_grad_reduce=sequence_parallel)
            self.kv = KVProjection(cfg.hidden_size, cfg.kv_heads, cfg.head_dim, tp, bias, normal_init(cfg.init_std),
                                   sequence_parallel)
        self.out = row_parallel_linear(
            sequence_parallel, cfg.hidden_size, cfg.hidden_size, config=mcfg, init_method=normal_init(out_std),
            bias=cfg.bias, input_is_parallel=True, skip_bias_add=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if sequence_parallel:
            shard_local(self.out.bias)

    @property
    def fused(self) -> bool:
        return hasattr(self, "qkv")

    def projection_parameters(self) -> list[nn.Parameter]:
        """The Q/K/V weights and biases (routed layers project with slices of them outside their module's forward)."""
        return [p for name in ("qkv", "q", "kv") if hasattr(self, name) for p in getattr(self, name).parameters()]

    def _heads(self, x: torch.Tensor, positions: torch.Tensor):
        """q, k, v as [b, local heads, s, head dim] (k, v: local kv heads), rotated by their positions."""
        return self._split_heads(self.project(x), positions)

    def _split_heads(self, t: torch.Tensor, positions: torch.Tensor, parts: str = "qkv"):
        """The `parts` of a projection [b, s, q rows + k rows + v rows] as [b, heads, s, hd] each."""
        heads = {"q": self.local_heads, "k": self.local_kv_heads, "v": self.local_kv_heads}
        cos, sin = self.rotary.angles(positions, t.dtype)
        return heads_rotated(t, cos, sin, tuple(heads[part] * self.head_dim for part in parts),
                             tuple(part in "qk" for part in parts), self.head_dim)

    def project(self, x: torch.Tensor, parts: str = "qkv") -> torch.Tensor:
        """The projection's `parts` ("qkv", "q" or "kv") for tokens x [..., hidden]. Routed layers project only some
        tokens' queries; with the fused weight they use slices of it (this rank's rows are [q; k; v] of its heads)."""
        if not self.fused:
            if parts == "q":
                return self.q(x)[0]
            if parts == "kv":
                return self.kv(x)
            return torch.cat([self.q(x)[0], self.kv(x)], dim=-1)
        if parts == "qkv":
            return self.qkv(x)[0]
        n = self.local_heads * self.head_dim
        rows = slice(0, n) if parts == "q" else slice(n, 3 * n)
        bias = self.qkv.bias[rows] if self.qkv.bias is not None else None
        # a masked layer (mask finetuning) multiplies by W * mask: its slices must be of that, not of W
        weight = self.qkv.effective_weight() if hasattr(self.qkv, "effective_weight") else self.qkv.weight
        return F.linear(copy_to_tp_region(x), weight[rows], bias)

    def project_out(self, context: torch.Tensor) -> torch.Tensor:
        """The row-parallel output projection of attention context rows [n, local heads x hd] -> [n, hidden]."""
        return self.out(context[None])[0].squeeze(0)

    def _merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """[b, heads, n, hd] -> [b, n, heads x hd]"""
        b, _, n, _ = y.shape
        return y.transpose(1, 2).reshape(b, n, self.local_heads * self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [b, s, hidden], or this rank's [b, s/tp, hidden] with sequence parallelism; positions: [s]."""
        if self.sequence_parallel:
            x = sp.gather_from_sequence(x)
        q, k, v = self._heads(x, positions)
        y, _ = self.out(self._merge_heads(kernels.causal(q, k, v)))
        return y

    def step(self, x: torch.Tensor, cache: KVCache | None, present: torch.Tensor):
        """Incremental attention for the next tokens x [b, n, hidden] after `cache`; `present` [b, n] marks which
        of them later tokens (and they themselves) may attend to. Returns (output [b, n, hidden], cache); the
        cache holds this rank's kv heads only."""
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        q, k, v = self._heads(x, positions)
        cache = KVCache.extended(cache, k, v, present)
        keys = torch.arange(cache.length, device=x.device)
        mask = (keys[None, :] <= positions[:, None])[None] & cache.present[:, None, :]
        y, _ = self.out(self._merge_heads(kernels.masked(q, cache.k, cache.v, mask)))
        return y, cache

    def step_skipped(self, x: torch.Tensor, cache: KVCache | None, kv_all: bool) -> KVCache:
        """The cache after tokens x [b, n, hidden] that a routed layer skips, every one of them: with `kv_all` their
        keys and values, which later tokens attend to, are projected (no query, attention or output projection);
        otherwise nothing is computed and they are cached as invisible (zeros, not `present`)."""
        start = cache.length if cache is not None else 0
        b, n, _ = x.shape
        if kv_all:
            k, v = self.keys_values(x, torch.arange(start, start + n, device=x.device))
        else:
            k = x.new_zeros(b, self.local_kv_heads, n, self.head_dim)
            v = torch.zeros_like(k)
        present = torch.full((b, n), kv_all, dtype=torch.bool, device=x.device)
        return KVCache.extended(cache, k, v, present)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, kv heads, s, hd] of tokens x [b, s, hidden] (normed), rotated by their `positions`
        (default: 0 .. s - 1)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        return self._split_heads(self.project(x, "kv"), positions, "kv")

    def forward_selected(self, x: torch.Tensor, packed: Packed, tokenwise=None, norm=None,
                         keys_values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Attention context rows [selected tokens, local heads x hd] (before the output projection, `project_out`)
        of the selected tokens only, in row-major order: `packed` holds their positions per sequence, ascending and
        left-aligned (`selection.pack_positions`). Keys and values come from every token (`keys_values`, as
        `keys_values(x)` gives them: `kv: all`; Q is projected for the selected tokens, and x must come normed) or
        from the selected tokens alone. No s x s mask is built (`training/attention.py`). The selected rows'
        projection is position-wise: `tokenwise(fn, rows)` runs it (a routed block balances it across DP ranks;
        default: here). `norm`: the pre-attention norm of the selected tokens (default: x comes normed), applied
        within `tokenwise`."""
        tokenwise = tokenwise or (lambda fn, rows: fn(rows))
        norm = norm or (lambda t: t)
        index, valid, slots = packed.index, packed.valid, packed.slots
        b, n = valid.shape
        # Index copies, not boolean masks: masked_select/masked_scatter (and their backwards) cost several times as
        # much over the [b, n, width] rows.
        picked = x.reshape(b * x.shape[1], x.shape[-1]).index_select(0, packed.rows)

        def padded(rows: torch.Tensor) -> torch.Tensor:
            return rows.new_zeros(b * n, rows.shape[-1]).index_copy_(0, slots, rows).view(b, n, rows.shape[-1])

        if keys_values is not None:
            q, = self._split_heads(padded(tokenwise(lambda rows: self.project(rows, "q"), picked)), index, "q")
            y = kernels.at_positions(q, index, *keys_values, self.kv_all_kernel)
        else:
            projected = tokenwise(lambda rows: self.project(norm(rows[None])).squeeze(0), picked)
            q, k, v = self._split_heads(padded(projected), index)
            y = kernels.causal(q, k, v)  # packed rows: causal among them is causal among the selected tokens
        return self._merge_heads(y).reshape(b * n, self.local_heads * self.head_dim).index_select(0, slots)


@dataclass(frozen=True)
class KVCache:
    """Keys and values of the tokens decoded so far ([b, heads, t, hd]) and which of them are visible
    (`present` [b, t]: a token a routed `kv: active` layer skipped is cached but masked).

    They live in buffers with room to grow (capacity doubled when full), so a decoding step writes only its own
    tokens rather than copying the whole cache (`torch.cat` took 18% of a routed model's decoding step at width 512).
    `filled` is the buffers' filled length, shared by the caches made on them: a cache that is not the newest (a
    caller that branches from an earlier state) copies into new buffers before it appends, so no state ever changes."""

    k_buf: torch.Tensor
    v_buf: torch.Tensor
    present_buf: torch.Tensor
    length: int
    filled: list[int]

    @property
    def k(self) -> torch.Tensor:
        return self.k_buf[:, :, :self.length]

    @property
    def v(self) -> torch.Tensor:
        return self.v_buf[:, :, :self.length]

    @property
    def present(self) -> torch.Tensor:
        return self.present_buf[:, :self.length]

    @staticmethod
    def extended(cache: KVCache | None, k: torch.Tensor, v: torch.Tensor, present: torch.Tensor) -> KVCache:
        """`cache` (None: empty) followed by the keys, values [b, heads, n, hd] and visibility [b, n] of n tokens."""
        start = 0 if cache is None else cache.length
        end = start + k.shape[2]
        if cache is None or end > cache.k_buf.shape[2] or cache.filled[0] != start:
            capacity = max(64, 2 * end)
            b, heads, _, hd = k.shape
            k_buf, v_buf = k.new_empty(b, heads, capacity, hd), v.new_empty(b, heads, capacity, hd)
            present_buf = present.new_zeros(b, capacity)
            if cache is not None:
                k_buf[:, :, :start], v_buf[:, :, :start] = cache.k, cache.v
                present_buf[:, :start] = cache.present
            cache = KVCache(k_buf, v_buf, present_buf, start, [start])
        cache.k_buf[:, :, start:end], cache.v_buf[:, :, start:end] = k, v
        cache.present_buf[:, start:end] = present
        cache.filled[0] = end
        return KVCache(cache.k_buf, cache.v_buf, cache.present_buf, end, cache.filled)


class SwiGLU(nn.Module):
    """SwiGLU MLP; the FFN dimension is split over TP ranks."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.gate_up = mtp.ColumnParallelLinear(
            cfg.hidden_size, 2 * cfg.ffn_size, config=mcfg, init_method=normal_init(cfg.init_std), bias=cfg.bias,
            gather_output=False, stride=2, disable_grad_reduce=sequence_parallel)
        self.down = row_parallel_linear(
            sequence_parallel, cfg.ffn_size, cfg.hidden_size, config=mcfg, init_method=normal_init(out_std),
            bias=cfg.bias, input_is_parallel=True, skip_bias_add=False)
        if sequence_parallel:
            shard_local(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = sp.gather_from_sequence(x)
        gate_up, _ = self.gate_up(x)
        y, _ = self.down(swiglu(gate_up))
        return y


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)). With sequence parallelism x and the
    norms are this rank's tokens [b, s/tp, d]."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, sequence_parallel: bool = False):
        super().__init__()
        self.attn_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, mcfg, sequence_parallel)
        self.mlp_norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, mcfg, sequence_parallel)
        if sequence_parallel:
            shard_local(*self.attn_norm.parameters(), *self.mlp_norm.parameters())

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x: torch.Tensor, cache: KVCache | None):
        """Incremental forward of the next tokens with a KV cache (see `IncrementalDecoder`)."""
        a, cache = self.attn.step(self.attn_norm(x), cache, torch.ones_like(x[..., 0], dtype=torch.bool))
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), cache
