"""Hugging Face modeling code for exported skiptron models: dense, skip-routed and SRU++ blocks, ordinary or
factorized token embeddings.

Self-contained (torch + transformers only): `skiptron-convert to-hf` copies this file and
`configuration_skiptron.py` next to the weights, and `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads it. Module and parameter names are skiptron's own (`blocks.3.block.attn.qkv.weight`),
so an export is skiptron's TP=1 state dict minus the vocabulary padding. Each forward reproduces skiptron's `GPT.logits`
(training/model.py, training/routing.py, training/srupp.py) on whole sequences:

- a routed block decides per token, from that token's own hidden state, so decisions are causal: router `sigmoid`
  p > 0.5 (threshold mode), `gumbel` greedily (argmax of its two logits, no noise), `mod` by its predictor (the
  top-k of training looks at the whole sequence). All tokens are computed and the skipped ones masked out (as in skiptron's incremental decoder) rather than
  gathered: the same values, simpler code. With `kv: active` skipped tokens are invisible to attention. A routed
  SRU++ layer (granularity `layer`) runs its recurrence and attention over each sequence's active tokens only.
- SRU++ runs the recurrence as the plain PyTorch loop (skiptron's reference definition; its fused kernels match it).

No KV cache: `generate()` re-runs the whole sequence for every new token (`use_cache` is ignored; the returned
`past_key_values` is None). Padding is supported on the right only (a left-padded row would shift positions and the
recurrence).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_skiptron import SkiptronConfig


def rotary_inv_freq(head_dim: int, theta: float, scaling: dict | None, device: torch.device) -> torch.Tensor:
    """Rotary inverse frequencies, default or `llama3`-scaled (skiptron's `layers.rotary_inv_freq`; this file must
    stand alone)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    if not scaling:
        return inv_freq
    old, low, high = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / scaling["factor"], inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / scaling["factor"] + smooth * scaled
    return torch.where((wavelen >= old / high) & (wavelen <= old / low), smoothed, scaled)


def rotate(x: torch.Tensor, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Rotary positions 0..s-1 on x [b, heads, s, head dim] (rotate-half form, as skiptron's `Rotary`)."""
    hd, s = x.shape[-1], x.shape[-2]
    inv_freq = rotary_inv_freq(hd, theta, scaling, x.device)
    freqs = torch.arange(s, dtype=torch.float32, device=x.device)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos().to(x.dtype) + torch.cat([-x2, x1], dim=-1) * emb.sin().to(x.dtype)


class Attention(nn.Module):
    """Causal attention: multi-head with a fused QKV projection ([q; k; v] rows), or grouped-query with `q` and
    `kv` ([k; v] rows of the fewer key/value heads)."""

    def __init__(self, config: SkiptronConfig):
        super().__init__()
        d = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.theta, self.scaling = d // self.heads, config.rope_theta, config.rotary_scaling
        bias = config.bias or config.qkv_bias
        if self.kv_heads == self.heads:
            self.qkv = nn.Linear(d, 3 * d, bias=bias)
        else:
            self.q = nn.Linear(d, d, bias=bias)
            self.kv = nn.Linear(d, 2 * self.kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(d, d, bias=config.bias)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """`present` [b, s]: the tokens that may be attended to (None: all). Rows of absent queries attend to
        everything so they stay finite; their outputs are the caller's to discard."""
        b, s, _ = x.shape
        qkv = self.qkv(x) if hasattr(self, "qkv") else torch.cat([self.q(x), self.kv(x)], dim=-1)
        widths = [self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in qkv.split(widths, dim=-1))
        q, k = rotate(q, self.theta, self.scaling), rotate(k, self.theta, self.scaling)
        gqa = self.kv_heads != self.heads
        if present is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            mask = (causal[None] & present[:, None, :]) | ~present[:, :, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: SkiptronConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: SkiptronConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Router(nn.Module):
    """Router `sigmoid`: p = sigmoid(w . rmsnorm(x) + b + offset), `offset` the budget controller's frozen state;
    a token executes when p > 0.5, its branch scaled by p."""

    def __init__(self, config: SkiptronConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.proj = nn.Linear(config.hidden_size, 1)
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(active [b, s] bool, gate [b, s])."""
        p = torch.sigmoid(self.proj(self.norm(x)).squeeze(-1).float() + self.offset)
        return p > 0.5, p


class GumbelRouter(nn.Module):
    """Router `gumbel` (SkipLayer) at inference: greedy, a token executes when its execute logit beats its skip
    logit (W x / rms(x), bias-free), and its branch is added whole."""

    def __init__(self, config: SkiptronConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.proj = nn.Linear(config.hidden_size, 2, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(F.rms_norm(x, (x.shape[-1],), eps=self.eps)).float()
        return logits[..., 1] > logits[..., 0], torch.ones_like(logits[..., 0])


class DecisionPredictor(nn.Module):
    def __init__(self, config: SkiptronConfig):
        super().__init__()
        self.hidden = nn.Linear(config.hidden_size, config.skip_predictor_hidden)
        self.out = nn.Linear(config.skip_predictor_hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.hidden(h))).squeeze(-1).float()


class MoDRouter(nn.Module):
    """Router `mod` (Mixture-of-Depths) at inference: the causal predictor decides (logit > 0), the branch is
    scaled by sigmoid of the router weight r = w . rmsnorm(x) + b (training's per-sequence top-k is not causal)."""

    def __init__(self, config: SkiptronConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.proj = nn.Linear(config.hidden_size, 1)
        self.predictor = DecisionPredictor(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        return self.predictor(h) > 0, torch.sigmoid(self.proj(h).squeeze(-1).float())


ROUTERS = {"sigmoid": Router, "gumbel": GumbelRouter, "mod": MoDRouter}


class RoutedBlock(nn.Module):
    """A block (or its MLP, or its attention) applied to the tokens its router picks, an executed branch scaled by
    the router's gate; a skipped token passes through unchanged. A routed SRU++ layer runs over each sequence's
    active tokens alone."""

    def __init__(self, config: SkiptronConfig, block: nn.Module):
        super().__init__()
        self.block = block
        self.router = ROUTERS[config.skip_router](config)
        self.granularity, self.kv_all = config.skip_granularity, config.skip_kv == "all"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active, p = self.router(x)
        active = active[..., None]
        gate = p.to(x.dtype)[..., None]
        block = self.block
        if isinstance(block, SRUppBlock):
            # active tokens first, in order: the causal layer never carries a skipped token into an active one
            order = torch.argsort((~active[..., 0]).to(torch.int8), dim=1, stable=True)[..., None].expand_as(x)
            y = torch.empty_like(x).scatter(1, order, block(torch.gather(x, 1, order)))
            return x + torch.where(active, gate * (y - x), 0.0)
        if self.granularity == "mlp":
            h = x + block.attn(block.attn_norm(x))
            return h + torch.where(active, gate * block.mlp(block.mlp_norm(h)), 0.0)
        a = block.attn(block.attn_norm(x), None if self.kv_all else active[..., 0])
        a = torch.where(active, a, 0.0)
        if self.granularity == "attention":
            h = x + gate * a
            return h + block.mlp(block.mlp_norm(h))
        return x + torch.where(active, gate * (a + block.mlp(block.mlp_norm(x + a))), 0.0)


class ProjectedAttention(nn.Module):
    """SRU++'s attention in the projected width: K, V = W_kv Q, causal, no positions."""

    def __init__(self, proj: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, proj // heads
        self.kv = nn.Linear(proj, 2 * proj, bias=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        b, s, _ = q.shape
        qh, k, v = (t.view(b, s, self.heads, self.head_dim).transpose(1, 2) for t in (q, *self.kv(q).chunk(2, -1)))
        return F.scaled_dot_product_attention(qh, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)


def sru_recurrence(u: torch.Tensor, x: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h [b, s, d] from u [b, s, 3, d] (candidate, forget, reset inputs), highway input x, v and bias [2, d]."""
    u_c, u_f, u_r = u.unbind(2)
    (v_f, v_r), (b_f, b_r) = v, bias
    c, hs = x.new_zeros(x.shape[0], x.shape[2]), []
    for t in range(x.shape[1]):
        f = torch.sigmoid(u_f[:, t] + v_f * c + b_f)
        r = torch.sigmoid(u_r[:, t] + v_r * c + b_r)
        c = f * c + (1 - f) * u_c[:, t]
        hs.append(r * c + (1 - r) * x[:, t])
    return torch.stack(hs, dim=1)


class SRUppBlock(nn.Module):
    """U = W_o LayerNorm(Q + alpha * A(Q)) with Q = W_q RMSNorm(x) (no A term without attention), then the SRU
    recurrence over U with the highway to x."""

    def __init__(self, config: SkiptronConfig, attention: bool):
        super().__init__()
        d, proj = config.hidden_size, config.srupp_proj_size
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.query = nn.Linear(d, proj, bias=False)
        self.attention = ProjectedAttention(proj, config.srupp_num_heads) if attention else None
        self.alpha = nn.Parameter(torch.zeros(1)) if attention else None
        self.proj_norm = nn.LayerNorm(proj, eps=config.rms_norm_eps)
        self.gates = nn.Linear(proj, 3 * d, bias=False)
        self.weight_c = nn.Parameter(torch.zeros(2, d))
        self.bias = nn.Parameter(torch.zeros(2, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(self.norm(x))
        if self.attention is not None:
            q = q + self.alpha * self.attention(q)
        b, s, d = x.shape
        return sru_recurrence(self.gates(self.proj_norm(q)).view(b, s, 3, d), x, self.weight_c, self.bias)


class Embedding(nn.Module):
    """Token table, or with `embedding_rank` k the factorization codes [vocab, k] @ decoder [hidden, k]^T."""

    def __init__(self, config: SkiptronConfig):
        super().__init__()
        if config.embedding_rank:
            self.codes = nn.Embedding(config.vocab_size, config.embedding_rank)
            self.decoder = nn.Linear(config.embedding_rank, config.hidden_size, bias=False)
        else:
            self.tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    @property
    def factorized(self) -> bool:
        return not hasattr(self, "tokens")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.codes(ids)) if self.factorized else self.tokens(ids)

    def matrix(self) -> torch.Tensor:
        """The [vocab, hidden] embedding (what a tied output layer multiplies by)."""
        return self.codes.weight @ self.decoder.weight.T if self.factorized else self.tokens.weight


class Head(nn.Module):
    def __init__(self, config: SkiptronConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class SkiptronPreTrainedModel(PreTrainedModel):
    config_class = SkiptronConfig
    base_model_prefix = "skiptron"
    _no_split_modules = ["Block", "RoutedBlock", "SRUppBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights as skiptron draws them (only for a model built from a config; loading overwrites them)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, Router):
            module.offset.zero_()
        elif isinstance(module, SRUppBlock):
            module.weight_c.uniform_(-(1.5 ** 0.5), 1.5 ** 0.5)
            module.bias.copy_(torch.tensor([[0.0], [-2.0]]).expand_as(module.bias))
            if module.alpha is not None:
                module.alpha.zero_()


class SkiptronForCausalLM(SkiptronPreTrainedModel, GenerationMixin):
    def __init__(self, config: SkiptronConfig):
        super().__init__(config)
        routed, attention = set(config.routed_layers), set(config.srupp_attention_layers)

        def block(i: int) -> nn.Module:
            inner = SRUppBlock(config, i in attention) if config.block == "srupp" else Block(config)
            return RoutedBlock(config, inner) if i in routed else inner

        self.embedding = Embedding(config)
        self.blocks = nn.ModuleList(block(i) for i in range(config.num_hidden_layers))
        self.head = Head(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(input_ids)
        for block in self.blocks:
            h = block(h)
        h = self.head.norm(h)
        return self.head.output(h) if self.head.output is not None else F.linear(h, self.embedding.matrix())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs):
        if attention_mask is not None and (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError("SkiptronForCausalLM: attention_mask has left padding (a 0 before a 1); skiptron models "
                             "take right-padded batches only (tokenizer.padding_side = 'right')")
        logits = self.logits(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """No cache: every step sees the whole sequence so far."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
