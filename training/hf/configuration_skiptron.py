"""Hugging Face configuration of an exported skiptron model (`model_type: skiptron`).

Self-contained (transformers only): `skiptron-convert to-hf` copies this file next to the weights, and
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` imports it from there. Routed layers and SRU++ attention
layers are stored as explicit layer lists, resolved from the skiptron config at export, so this file needs none of
skiptron's layer-selection rules.
"""
from __future__ import annotations

from transformers import PretrainedConfig

CHOICES = {"block": ("transformer", "srupp"), "skip_granularity": ("layer", "mlp", "attention"),
           "skip_kv": ("all", "active"), "skip_router": ("sigmoid", "gumbel", "mod")}


class SkiptronConfig(PretrainedConfig):
    """Names follow Llama's where the meaning is the same; the rest are skiptron's `model.*` keys, flattened."""

    model_type = "skiptron"

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 256, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None, intermediate_size: int = 704, max_position_embeddings: int = 256,
                 rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0, rotary_scaling: dict | None = None,
                 initializer_range: float = 0.02, bias: bool = False, qkv_bias: bool = False, tie_embeddings: bool = True, embedding_rank: int | None = None,
                 block: str = "transformer", routed_layers: list[int] | None = None, skip_granularity: str = "layer",
                 skip_kv: str = "all", skip_router: str = "sigmoid", skip_predictor_hidden: int = 64,
                 srupp_proj_size: int | None = None, srupp_num_heads: int = 1,
                 srupp_attention_layers: list[int] | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # skiptron's model.rope_scaling (type llama3) or None; not `rope_scaling`, which transformers rewrites
        self.rotary_scaling = rotary_scaling
        self.initializer_range = initializer_range
        self.bias = bias
        self.qkv_bias = qkv_bias
        self.tie_embeddings = tie_embeddings
        self.embedding_rank = embedding_rank
        self.block = block
        self.routed_layers = list(routed_layers or [])
        self.skip_granularity = skip_granularity
        self.skip_kv = skip_kv
        self.skip_router = skip_router
        self.skip_predictor_hidden = skip_predictor_hidden
        self.srupp_proj_size = srupp_proj_size or max(hidden_size // 4, 1)
        self.srupp_num_heads = srupp_num_heads
        self.srupp_attention_layers = list(srupp_attention_layers or [])
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"SkiptronConfig.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if block == "srupp" and self.routed_layers and skip_granularity != "layer":
            raise ValueError("SkiptronConfig.skip_granularity: a routed SRU++ block is routed whole ('layer')")
        # The output layer is the model's own (tied or not): nothing for transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
