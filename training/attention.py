"""Attention kernels: which fused kernel each attention variant runs on, without an s x s mask where one is avoidable.

- dense blocks, SRU++ and routed `kv: active` blocks: `scaled_dot_product_attention(..., is_causal=True)`. A routed
  `kv: active` layer packs each sequence's active tokens left-aligned ([b, n], padding after them), so causal among
  the packed rows is exactly "active tokens see the earlier active tokens"; a padded row sees real rows only.
- routed `kv: all` blocks: the selected queries (at positions `index` [b, n]) attend to every earlier token. Kernel
  `sdpa` scatters the queries back to their positions in an [b, heads, s, hd] tensor and runs the causal kernel over
  the whole sequence (flash / memory-efficient on GPU, the fused CPU kernel here; the rows of skipped positions are
  computed and dropped, so attention costs what a dense layer's does); kernel `flex` runs
  `torch.nn.attention.flex_attention` with a block mask (key <= query position) built from `index`: only the
  selected rows are computed; kernel `mask` is the [b, n, s] boolean mask (what the CPU's fused kernel runs fastest).
  `auto` (`resolve_kv_all_kernel`) picks flex on CUDA, mask on CPU. All are exact (`tests/test_routing.py`).
- decoding with a cache (`Attention.step`) keeps a boolean [b, n, t] mask: n new tokens are few, t is the cache.

Grouped-query attention: K and V carry fewer heads than Q; every kernel gets `enable_gqa` (query head i uses key/value
head i // (heads / kv heads), as transformers' `repeat_kv`).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

KV_ALL_KERNELS = ("sdpa", "flex", "mask")


def resolve_kv_all_kernel(kernel: str, device: torch.device) -> str:
    """`auto`: flex_attention on CUDA when it compiles there (else the scattered-query causal kernel); on CPU the
    [b, n, s]-masked call, because the CPU's fused SDPA kernel takes masks and measured faster than the mask-free
    kernels there (docs/benchmarks.md). Any other value is taken as given."""
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        return "flex" if _flex_compiles(device) else "sdpa"
    return "mask"


@functools.cache
def _flex_compiles(device: torch.device) -> bool:
    """Whether the compiled flex_attention runs forward and backward on `device` (probed once per process)."""
    try:
        q, k, v = (torch.randn(1, 2, 128, 16, device=device, requires_grad=True) for _ in range(3))
        index = torch.arange(0, 128, device=device)[None]
        _flex_at_positions(q, index, k, v).sum().backward()
        return True
    except Exception as err:  # no Triton / compiler for this device or torch build: the SDPA kernel is used
        warnings.warn(f"flex_attention does not compile on {device} ({type(err).__name__}: {err}); routed kv: all "
                      f"layers use the scattered-query SDPA kernel")
        return False


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [b, h, s, hd] over k, v [b, kv heads, s, hd]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention with a boolean mask [b, n, t] (True: may attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])


def at_positions(q: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kernel: str = "auto") -> torch.Tensor:
    """Queries q [b, h, n, hd] standing at positions `index` [b, n] (distinct per row) attend to the keys at positions
    <= their own, of k, v [b, kv heads, s, hd]. Returns [b, h, n, hd]."""
    kernel = resolve_kv_all_kernel(kernel, q.device)
    if kernel == "flex":
        return _flex_at_positions(q, index, k, v)
    if kernel == "mask":
        return masked(q, k, v, torch.arange(k.shape[2], device=q.device)[None, None, :] <= index[:, :, None])
    b, h, n, hd = q.shape
    where = index[:, None, :, None].expand(b, h, n, hd)
    full = q.new_zeros(b, h, k.shape[2], hd).scatter(2, where, q)
    return causal(full, k, v).gather(2, where)


def _flex_at_positions(q, index, k, v):
    from torch.nn.attention.flex_attention import create_block_mask

    def key_not_after_query(b, h, q_idx, kv_idx):
        return kv_idx <= index[b, q_idx]

    on_gpu = q.is_cuda
    mask = create_block_mask(key_not_after_query, q.shape[0], None, q.shape[2], k.shape[2], device=q.device,
                             _compile=on_gpu)
    return _flex_kernel(on_gpu)(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex_kernel(compiled: bool):
    """flex_attention, compiled once per process on GPU (dynamic shapes: n changes every step). On CPU the eager
    reference implementation runs (it materializes the scores: for tests of exactness only)."""
    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        return _compiled_flex()

    def eager(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(*args, **kwargs)
    return eager


def _sdpa_backend(call, device: torch.device) -> str:
    """The first SDPA backend, in torch's own priority order, that accepts `call` on `device` ("none" if none)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    for backend in order:
        try:
            with sdpa_kernel([backend]):
                call()
            return backend.name.lower()
        except RuntimeError:
            continue
    return "none"


def attention_backend_report(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                             heads: int = 4, kv_heads: int = 2, seq: int = 64, head_dim: int = 32) -> dict[str, str]:
    """Which kernel each attention variant of skiptron runs on `device` in `dtype` (for skiptron-gpu-check): the SDPA
    backend torch picks for the exact call the variant makes, or the flex path. Runs tiny calls on the device."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)

    def rand(h, n):
        return torch.randn(1, h, n, head_dim, generator=g).to(device, dtype)

    q, k, v = rand(heads, seq), rand(kv_heads, seq), rand(kv_heads, seq)
    index = torch.arange(0, seq, 2, device=device)[None]
    mask = torch.ones(1, 1, seq, dtype=torch.bool, device=device)
    report = {
        "dense": "sdpa is_causal: " + _sdpa_backend(lambda: causal(q, k, v), device),
        "routed_kv_active": "sdpa is_causal on packed rows: " + _sdpa_backend(
            lambda: causal(q[:, :, :seq // 2], k[:, :, :seq // 2], v[:, :, :seq // 2]), device),
        "routed_kv_all[auto]": resolve_kv_all_kernel("auto", device),
        "routed_kv_all[sdpa]": "sdpa is_causal on scattered queries: " + _sdpa_backend(
            lambda: at_positions(q[:, :, :seq // 2], index, k, v, "sdpa"), device),
        "routed_kv_all[mask]": "sdpa with a [n, s] mask: " + _sdpa_backend(
            lambda: at_positions(q[:, :, :seq // 2], index, k, v, "mask"), device),
        "decode_step": "sdpa with a [n, cache] mask: " + _sdpa_backend(lambda: masked(q[:, :, -1:], k, v, mask),
                                                                        device),
    }
    try:
        at_positions(q[:, :, :seq // 2], index, k, v, kernel="flex")
        report["routed_kv_all[flex]"] = "flex_attention block mask: " + (
            "compiled" if device.type == "cuda" else "eager reference (materializes scores)")
    except Exception as err:  # flex needs a recent torch and, on GPU, a working compiler
        report["routed_kv_all[flex]"] = f"unavailable: {type(err).__name__}: {err}"
    return report
