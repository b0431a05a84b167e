"""Model FLOPs per token and device peak FLOP/s, the two inputs of MFU.

MFU = tokens_per_s * model_flops_per_token(...) / peak_flops(...). It counts
the FLOPs the model needs, not the ones the hardware ran (activation
recomputation is not counted), so it is comparable across runs and papers.
"""
from __future__ import annotations

import re

import torch


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
    kv_width = (num_kv_heads or num_heads) * hidden_size / num_heads
    projections = 2 * hidden_size * (2 * hidden_size + 2 * kv_width)
    attention = 2 * 2 * seq_len * hidden_size
    mlp = 2 * (3 if swiglu else 2) * hidden_size * ffn_hidden_size
    per_layer = projections + attention + mlp
    lm_head = 2 * hidden_size * vocab_size
    return 3.0 * (num_layers * exec_rate * per_layer + lm_head)


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
    device: torch.device, dtype: torch.dtype, configured: float | None
) -> float | None:
    """Peak dense FLOP/s of one device for `dtype`, or None when unknown.

    `configured` (FLOP/s, e.g. from the run config) always wins, so unknown
    hardware can still report MFU. Otherwise CUDA devices are looked up in a
    table of data-sheet peaks; float32 assumes TF32 tensor cores are enabled.
    CPUs, unknown GPUs and unlisted dtypes return None: MFU is then not reported.
    """
    if configured is not None:
        return float(configured)
    if device.type != "cuda" or dtype not in _DTYPE_COLUMN:
        return None
    name = torch.cuda.get_device_name(device)
    for row in _CUDA_PEAKS:
        if re.search(rf"\b{re.escape(row[0])}\b", name):
            return row[_DTYPE_COLUMN[dtype]]
    return None
