"""Model FLOPs per token and device peak FLOP/s, the two inputs of MFU.

MFU = tokens_per_s * model_flops_per_token(...) / peak_flops(...). It counts
the FLOPs the model needs, not the ones the hardware ran (activation
recomputation is not counted), so it is comparable across runs and papers.
"""
from __future__ import annotations

import re

import torch


def transformer_layer_flops(hidden_size: int, ffn_hidden_size: int, num_heads: int, seq_len: int, *,
                            num_kv_heads: int | None = None, swiglu: bool = True) -> dict[str, float]:
    """Forward FLOPs per token of one transformer layer, by part (see `model_flops_per_token`)."""
    kv_width = (num_kv_heads or num_heads) * hidden_size / num_heads
    return {"q": 2 * hidden_size * hidden_size, "kv": 2 * 2 * hidden_size * kv_width,
            "scores": 2 * 2 * seq_len * hidden_size, "out": 2 * hidden_size * hidden_size,
            "mlp": 2 * (3 if swiglu else 2) * hidden_size * ffn_hidden_size}


def srupp_layer_flops(hidden_size: int, proj_size: int, seq_len: int, attention: bool) -> dict[str, float]:
    """Forward FLOPs per token of one SRU++ layer, by part: the query projection d -> d', in attention layers keys
    and values from the query (d' -> 2d') and the scores over the sequence, and the gate projection d' -> 3d. The
    elementwise recurrence (about 15 FLOPs per unit) is ignored like norms and softmax."""
    parts = {"query": 2 * hidden_size * proj_size, "gates": 2 * proj_size * 3 * hidden_size}
    if attention:
        parts.update(kv=2 * proj_size * 2 * proj_size, scores=2 * 2 * seq_len * proj_size)
    return parts


def model_flops_per_token(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_heads: int,
    vocab_size: int,
    seq_len: int,
    *,
    num_kv_heads: int | None = None,
    swiglu: bool = True,
    exec_rate: float = 1.0,
) -> float:
    """Training FLOPs per token of a Llama-style decoder (Megatron/PaLM style).

    A matmul of a token's d_in vector by a d_in x d_out weight costs 2*d_in*d_out
    FLOPs. With h = hidden_size, f = ffn_hidden_size, s = seq_len,
    kv = num_kv_heads * h / num_heads (the K/V width; GQA shrinks it), per layer
    and token, forward:

        qkv + out projection   2*h*h + 2*2*h*kv + 2*h*h
        attention              2*2*s*h   (QK^T scores and scores@V)
        mlp                    2*3*h*f   (SwiGLU: gate, up, down; 2*2*h*f without)

    and once per token the LM head, 2*h*vocab. Training (forward + backward,
    the backward costing twice the forward) is 3x the forward:

        flops = 3 * (num_layers * exec_rate * per_layer + 2*h*vocab)

    The attention term is not halved for the causal mask, as in Megatron-LM and
    PaLM, so numbers match published MFU. Embedding lookups, norms, softmax and
    rotary embeddings are ignored (negligible). `exec_rate` is the fraction of
    (token, layer) pairs actually executed, for models that skip layers.
    """
    per_layer = sum(transformer_layer_flops(hidden_size, ffn_hidden_size, num_heads, seq_len,
                                            num_kv_heads=num_kv_heads, swiglu=swiglu).values())
    return 3.0 * (num_layers * exec_rate * per_layer + 2 * hidden_size * vocab_size)


def _routed_parts(skip) -> set[str]:
    """The parts of a routed layer that run for active tokens only (the rest runs for every token)."""
    if skip.granularity == "mlp":
        return {"mlp"}
    attention = {"q", "scores", "out"} | ({"kv"} if skip.kv == "active" else set())
    return attention | ({"mlp"} if skip.granularity == "layer" else set())


def router_flops(skip, hidden_size: int) -> float:
    """Forward FLOPs per token of one router: sigmoid w . x (d -> 1), gumbel W x (d -> 2), mod its weight (d -> 1)
    plus the decision predictor (d -> width -> 1)."""
    if skip.router == "gumbel":
        return 2.0 * 2 * hidden_size
    if skip.router == "mod":
        return 2.0 * hidden_size + 2.0 * (hidden_size * skip.predictor_hidden + skip.predictor_hidden)
    return 2.0 * hidden_size


def config_flops_per_token(model, padded_vocab: int, layer_rates: dict[int, float] | None = None) -> float:
    """Training FLOPs per token of the model a `ModelConfig` describes (transformer or SRU++ blocks). A routed layer's
    routed parts count at its execution rate (`layer_rates`: layer -> measured rate; the configured target when not
    given), the parts every token still runs (K/V with `kv: all`, attention with `mlp` granularity) in full, and its
    router for every token. Router `gumbel` also runs the routed parts forward (no backward) for its skipped tokens
    in training (its soft path needs their branch): a third of their training cost."""
    routed = set(model.skip.routed_layers(model.num_layers)) if model.skip.enabled else set()
    total = 2.0 * model.hidden_size * padded_vocab  # the LM head
    if model.embedding_rank:
        # a factorized embedding's decoder, k -> d per token (the tied output layer's codes @ decoder.T is computed
        # once per micro-batch, not per token: ignored)
        total += 2.0 * model.embedding_rank * model.hidden_size
    for layer in range(model.num_layers):
        if model.block == "srupp":
            proj = model.srupp.projection(model.hidden_size)
            parts = srupp_layer_flops(model.hidden_size, proj, model.seq_len, model.srupp.has_attention(layer))
            scaled = set(parts)  # a routed SRU++ layer runs for its active tokens only
        else:
            parts = transformer_layer_flops(model.hidden_size, model.ffn_size, model.num_heads, model.seq_len,
                                            num_kv_heads=model.kv_heads)
            scaled = _routed_parts(model.skip)
        rate = (layer_rates or {}).get(layer, model.skip.target_rate) if layer in routed else 1.0
        if layer in routed:
            total += router_flops(model.skip, model.hidden_size)
        share = rate + (1.0 - rate) / 3 if layer in routed and model.skip.router == "gumbel" else rate
        total += sum(f * (share if name in scaled else 1.0) for name, f in parts.items())
    return 3.0 * total


# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendor data sheets,
# per dtype (float32 = TF32). Matched as a whole word of
# torch.cuda.get_device_name(), the more specific names first.
_CUDA_PEAKS: tuple[tuple[str, float | None, float, float], ...] = (
    # name,       bf16,     fp16,     tf32
    ("H100 PCIe", 756e12, 756e12, 378e12),
    ("H100 NVL", 835e12, 835e12, 418e12),
    ("H100", 989e12, 989e12, 494.5e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H800", 989e12, 989e12, 494.5e12),
    ("H200", 989e12, 989e12, 494.5e12),
    ("GH200", 989e12, 989e12, 494.5e12),
    ("B200", 2250e12, 2250e12, 1100e12),
    ("A100", 312e12, 312e12, 156e12),
    ("A800", 312e12, 312e12, 156e12),
    ("A10G", 70e12, 70e12, 35e12),
    ("A10", 125e12, 125e12, 62.5e12),
    ("L40S", 362e12, 362e12, 183e12),
    ("L40", 181e12, 181e12, 90.5e12),
    ("L4", 121e12, 121e12, 60e12),
    ("RTX 4090", 165e12, 165e12, 82.6e12),  # fp32 accumulate
    ("RTX 3090", 71e12, 71e12, 35.6e12),
    ("V100", None, 125e12, 15.7e12),  # no bf16 or tf32 tensor cores
)
_DTYPE_COLUMN = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def peak_flops(
    device: torch.device, dtype: torch.dtype, configured: float | None, tf32: bool = True
) -> float | None:
    """Peak dense FLOP/s of one device for `dtype` (the precision a run computes in), or None when unknown.

    `configured` (FLOP/s, e.g. from the run config) always wins, so unknown
    hardware can still report MFU. Otherwise CUDA devices are looked up in a
    table of data-sheet peaks: bf16 and fp16 their own columns, float32 the TF32
    tensor-core peak when `tf32` is on (the table has no plain-fp32 peaks, so
    float32 without TF32 is unknown). CPUs, unknown GPUs and unlisted dtypes
    return None: MFU is then not reported.
    """
    if configured is not None:
        return float(configured)
    if device.type != "cuda" or dtype not in _DTYPE_COLUMN or dtype == torch.float32 and not tf32:
        return None
    name = torch.cuda.get_device_name(device)
    for row in _CUDA_PEAKS:
        if re.search(rf"\b{re.escape(row[0])}\b", name):
            return row[_DTYPE_COLUMN[dtype]]
    return None
