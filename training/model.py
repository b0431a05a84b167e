"""A Llama-style decoder built from megatron-core tensor-parallel layers, assembled from the building blocks of
`training/layers.py` (attention, MLP, block), routed blocks (`training/routing.py`) and SRU++ blocks
(`training/srupp.py`), which import those building blocks too: imports point one way, layers <- routing, srupp <- model.

Pre-norm RMSNorm, rotary positions, SwiGLU MLP, no biases by default, grouped-query attention, tied or untied
embeddings. The model is a flat sequence of stages (embedding, N blocks, head) so the same definition can feed
DeepSpeed's pipeline engine and so a block can be wrapped by a router.

Every layer builds its full weight on the CPU from the same seed and keeps its own shard
(`use_cpu_initialization`), so any tensor-parallel layout starts from exactly the weights of TP=1. Fused
(QKV, gate+up) projections use megatron's `stride` so each TP shard holds whole heads / matching gate and up rows;
grouped-query K/V heads are split the same way, or replicated when there are fewer of them than TP ranks
(`layers.KVProjection`).

With `sequence_parallel` (dense blocks only) the residual stream and the norms hold s / tp tokens per TP rank
([b, s/tp, d]); the TP regions gather the sequence on entry and reduce-scatter it on exit
(`parallel/sequence_parallel.py`). megatron's linears keep `sequence_parallel=False` (they shard dim 0 of
sequence-first tensors): column-parallel ones skip their input-gradient all-reduce (`disable_grad_reduce`, the
gather's backward reduce-scatters instead), row-parallel ones are `SequenceParallelRowLinear`, which reduce-scatters
its output instead of all-reducing it. Same parameters and names either way, so checkpoints do not depend on it.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import deepspeed
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mtp
from torch import nn

from skiptron.parallel import sequence_parallel as sp
from skiptron.parallel.tensor_parallel import copy_to_tp_region, reduce_from_tp_region

from .config import ModelConfig
from .fused_loss import chunked_cross_entropy
from .layers import Block, megatron_config, normal_init, rms_norm, shard_local
from .routing import LayerFeedback, RoutedBlock
from .srupp import SRUppBlock


class Embedding(nn.Module):
    """The token embedding: a vocab-parallel V x d table, or with `model.embedding_rank` k the factorization
    `codes @ decoder.T` (codes V x k, vocab-parallel like the table; decoder d x k, replicated), which holds V*k + d*k
    instead of V*d parameters (what `skiptron-compress` writes). `output_weight()` is the matrix tied logits use."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, padded_vocab: int):
        super().__init__()
        self.rank = cfg.embedding_rank
        if self.rank is None:
            self.tokens = mtp.VocabParallelEmbedding(
                padded_vocab, cfg.hidden_size, init_method=normal_init(cfg.init_std), config=mcfg)
            return
        tp, tp_rank = mcfg.tensor_model_parallel_size, ps.get_tensor_model_parallel_rank()
        per_rank = padded_vocab // tp
        self.vocab_start = tp_rank * per_rank
        # the whole codes drawn on every rank, then sliced: any TP layout starts from the TP=1 weights. A decoder
        # with entries of variance 1/k gives the reconstructed embedding the table's init_std.
        codes = torch.randn(padded_vocab, self.rank) * cfg.init_std
        self.codes = nn.Parameter(codes[self.vocab_start:self.vocab_start + per_rank].clone())
        mtp.set_tensor_model_parallel_attributes(self.codes, is_parallel=True, dim=0, stride=1)
        self.decoder = nn.Parameter(torch.randn(cfg.hidden_size, self.rank) / math.sqrt(self.rank))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return self.tokens(tokens)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.codes.shape[0])
        codes = F.embedding(local.masked_fill(outside, 0), self.codes).masked_fill(outside[..., None], 0.0)
        # k-wide all-reduce (cheaper than d-wide), then the replicated decoder
        return F.linear(reduce_from_tp_region(codes), self.decoder)

    def output_weight(self) -> torch.Tensor:
        """This TP rank's vocabulary rows of the embedding matrix [V / tp, d]. Factorized: local codes @ decoder.T,
        the decoder entering through megatron's copy region so its gradient from every rank's rows is summed."""
        if self.rank is None:
            return self.tokens.weight
        return self.codes @ copy_to_tp_region(self.decoder).T


def vocab_start(padded_vocab: int, tp: int) -> int:
    """The first vocabulary entry of this TP rank's slice."""
    return ps.get_tensor_model_parallel_rank() * (padded_vocab // tp)


def vocab_padding(vocab_size: int, padded_vocab: int, tp: int) -> torch.Tensor:
    """Which entries of this TP rank's vocabulary slice are padding (their logits are set to -inf)."""
    start = vocab_start(padded_vocab, tp)
    return torch.arange(start, start + padded_vocab // tp) >= vocab_size


def seeded(seed: int, build):
    """`build()` with torch's RNG seeded to `seed` (restored afterwards): each layer of the flat sequence draws its
    weights from its own seed, so a pipeline stage that builds only its own layers gets the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def layer_sequence(cfg: ModelConfig, vocab_size: int, tp: int, balance: int | None = 0,
                   base_seed: int | None = None, sequence_parallel: bool = False,
                   loss_chunk_tokens: int = 1024) -> list[tuple[str, object]]:
    """GPT's flat layer sequence: (name in GPT, builder) for the embedding, each block and the head. `GPT` and the
    pipeline module (`training/pipeline.py`) are both built from it. `base_seed` defaults to a draw from torch's RNG
    (the same on every rank after `seed_everything`). `sequence_parallel` covers dense blocks only (the config
    refuses it with routing, SRU++ blocks and pipeline parallelism). `loss_chunk_tokens`: the head's (`train.loss_chunk_tokens`)."""
    if base_seed is None:
        base_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item())  # also under torch.device("meta")
    mcfg = megatron_config(tp)
    padded = cfg.padded_vocab_size(vocab_size)
    routed = set(cfg.skip.routed_layers(cfg.num_layers))

    def block(i: int) -> nn.Module:
        if cfg.block == "srupp":
            inner = SRUppBlock(cfg, mcfg, i)
        else:
            inner = Block(cfg, mcfg, sequence_parallel)
        if i in routed:
            return RoutedBlock(inner, cfg.skip, cfg.hidden_size, cfg.norm_eps, cfg.init_std, balance)
        return inner

    seq = [("embedding", lambda: seeded(base_seed, lambda: Embedding(cfg, mcfg, padded)))]
    seq += [(f"blocks.{i}", (lambda i=i: seeded(base_seed + 1 + i, lambda: block(i)))) for i in range(cfg.num_layers)]
    seq.append(("head", lambda: seeded(base_seed + 1 + cfg.num_layers,
                                       lambda: Head(cfg, mcfg, vocab_size, padded, sequence_parallel,
                                                    loss_chunk_tokens))))
    return seq


def run_block(block: nn.Module, h: torch.Tensor, positions: torch.Tensor, checkpoint: bool):
    """One block -> (h, its RoutingRecord or None for an unrouted block), its activations recomputed in the backward
    when `checkpoint` (non-reentrant: side outputs such as the routing aux loss keep their gradient)."""
    if checkpoint and torch.is_grad_enabled():
        out = torch.utils.checkpoint.checkpoint(block, h, positions, use_reentrant=False)
    else:
        out = block(h, positions)
    return out if isinstance(block, RoutedBlock) else (out, None)


class Head(nn.Module):
    """Final norm, vocab-parallel logits and the vocab-parallel cross entropy.

    Padded vocabulary entries get logits of -inf before the softmax, so they carry no probability and the loss is
    the same for every TP size and vocabulary size. With sequence parallelism the final norm runs on this rank's
    tokens, which are then gathered for the (column-parallel) logits. The loss (`forward`) is computed in chunks of
    tokens with the output layer fused in (`training/fused_loss.py`), `loss_chunk_tokens` at a time; `logits` gives them
    whole."""

    def __init__(self, cfg: ModelConfig, mcfg: ModelParallelConfig, vocab_size: int, padded_vocab: int,
                 sequence_parallel: bool = False, loss_chunk_tokens: int = 1024):
        super().__init__()
        self.norm = rms_norm(cfg.hidden_size, cfg.norm_eps)
        self.vocab_size = vocab_size
        self.sequence_parallel = sequence_parallel
        self.loss_chunk_tokens = loss_chunk_tokens
        self.vocab_start = vocab_start(padded_vocab, mcfg.tensor_model_parallel_size)
        self.output = None
        if not cfg.tie_embeddings:
            self.output = mtp.ColumnParallelLinear(
                cfg.hidden_size, padded_vocab, config=mcfg, init_method=normal_init(cfg.init_std), bias=False,
                gather_output=False, disable_grad_reduce=sequence_parallel)
            # the loss uses the weight outside `output`'s forward: ZeRO-3 must gather it for this module's
            deepspeed.zero.register_external_parameter(self, self.output.weight)
        if sequence_parallel:
            shard_local(*self.norm.parameters())
        self.register_buffer("padding", vocab_padding(vocab_size, padded_vocab, mcfg.tensor_model_parallel_size),
                             persistent=False)
        self.has_padding = bool(self.padding.any())  # read once here: per forward it is a host sync on GPUs

    def tp_input(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm, then the entry into the TP region of the (column-parallel) output layer."""
        h = self.norm(h)
        if self.sequence_parallel:
            return sp.gather_from_sequence(h)  # its backward sums over TP, so no linear below does
        return copy_to_tp_region(h)

    def logits(self, h: torch.Tensor, embedding_weight: torch.Tensor | None) -> torch.Tensor:
        """This TP rank's slice of the logits, padded entries at -inf (for the whole sequence)."""
        logits = F.linear(self.tp_input(h), self.output_weight(embedding_weight))
        if self.has_padding:
            logits = logits.masked_fill(self.padding, float("-inf"))
        return logits

    def output_weight(self, embedding_weight: torch.Tensor | None) -> torch.Tensor:
        return self.output.weight if self.output is not None else embedding_weight

    def forward(self, h: torch.Tensor, labels: torch.Tensor, embedding_weight: torch.Tensor | None) -> torch.Tensor:
        """Mean cross entropy of the logits of h [b, s, d] against labels [b, s], computed in chunks."""
        return head_loss(self.tp_input(h), self.output_weight(embedding_weight), labels, self.loss_chunk_tokens,
                         self.padding if self.has_padding else None, self.vocab_start)


def head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
              padding: torch.Tensor | None, vocab_start: int) -> torch.Tensor:
    """Mean cross entropy of the logits `h @ weight.T` (h [b, s, d] inside the output layer's TP region, weight this
    TP rank's vocabulary rows from `vocab_start`) against labels [b, s], `chunk_tokens` tokens at a time: `Head` and
    the pipeline's last stage."""
    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    return chunked_cross_entropy(h.flatten(0, 1), weight, labels.flatten(), chunk_tokens, padding, vocab_start, group)


class ModelOutput(NamedTuple):
    """What `GPT.forward(tokens, return_output=True)` computed: the loss to train on (LM + the routers' weighted
    auxiliary losses), its LM part (detached, for logging) and each routed layer's record of this forward."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    routing: dict


class GPT(nn.Module):
    """Embedding -> blocks -> head. `forward(tokens)` takes [b, s+1] token ids and returns the mean LM loss plus,
    when layers are routed, the routers' weighted auxiliary losses; `forward(tokens, return_output=True)` returns the
    `ModelOutput` (what the trainer uses). With `sequence_parallel` the embedding output is split into TP sequence
    shards and the head gathers them again. Every call returns what it computed (`ModelOutput`, or logits with
    `logits_and_routing`); nothing of a forward is kept in the module."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, tp: int, balance: int | None = 0,
                 checkpoint_blocks: set[int] | frozenset = frozenset(), sequence_parallel: bool = False,
                 loss_chunk_tokens: int = 1024):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.checkpoint_blocks = set(checkpoint_blocks)
        self.sequence_parallel = sequence_parallel
        seq = layer_sequence(cfg, vocab_size, tp, balance, sequence_parallel=sequence_parallel,
                             loss_chunk_tokens=loss_chunk_tokens)
        self.embedding = seq[0][1]()
        self.blocks = nn.ModuleList(build() for _, build in seq[1:-1])
        self.head = seq[-1][1]()

    def routed_layers(self) -> dict[int, RoutedBlock]:
        """Layer index -> routed block."""
        return {i: b for i, b in enumerate(self.blocks) if isinstance(b, RoutedBlock)}

    def update_routing(self, feedback: dict[int, LayerFeedback]) -> None:
        """Feed each routed layer what the step measured over the DP batch (`RoutingMeter.reduce`)."""
        for i, layer in feedback.items():
            self.blocks[i].update_after_step(layer)

    def _tied_weight(self):
        return self.embedding.output_weight() if self.cfg.tie_embeddings else None

    def hidden_states(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(the last block's output [b, s, d], with sequence parallelism this rank's tokens [b, s/tp, d];
        layer -> RoutingRecord of each routed layer)."""
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        h = self.embedding(inputs)
        if self.sequence_parallel:
            h = sp.scatter_to_sequence(h)
        routing = {}
        for i, block in enumerate(self.blocks):
            h, record = run_block(block, h, positions, i in self.checkpoint_blocks)
            if record is not None:
                routing[i] = record
        return h, routing

    def logits_and_routing(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(this TP rank's vocabulary slice of the logits for [b, s] inputs, layer -> RoutingRecord)."""
        h, routing = self.hidden_states(inputs)
        return self.head.logits(h, self._tied_weight()), routing

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """This TP rank's vocabulary slice of the logits for [b, s] inputs."""
        return self.logits_and_routing(inputs)[0]

    def forward(self, tokens: torch.Tensor, return_output: bool = False):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        h, routing = self.hidden_states(inputs)
        lm_loss = self.head(h, labels, self._tied_weight())
        loss = lm_loss
        if routing:
            loss = loss + sum(r.aux_loss for r in routing.values())  # each router weights its own
        return ModelOutput(loss, lm_loss.detach(), routing) if return_output else loss


BLOCK_TYPES = (Block, RoutedBlock, SRUppBlock)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> list[str]:
    """`train.compile`: torch.compile each block's forward in place (`nn.Module.compile`, so parameter names, hooks
    and the module tree stay as they are: checkpoints, ZeRO, the step guard and the pipeline see the same model).
    Embedding, head, loss and optimizer stay eager. A routed block stays eager where its shapes follow its decisions
    (selecting, packing and balancing the active tokens: inductor failed on those frames' symbolic sizes, torch
    2.13); its router's scoring modules and, in a transformer block, the norms and the MLP are compiled, for any
    number of rows (`dynamic=True`). Returns the compiled modules' names."""
    names, done = [], []
    for name, module in model.named_modules():
        if any(name.startswith(f"{d}.") for d in done):
            continue
        if isinstance(module, RoutedBlock):
            # the router's modules: it is called through `propose`, not its compiled `forward`
            parts = {f"router.{n}": child for n, child in module.router.named_children()}
            if isinstance(module.block, Block):
                parts.update({"block.attn_norm": module.block.attn_norm, "block.mlp_norm": module.block.mlp_norm,
                              "block.mlp": module.block.mlp})
            for part, sub in parts.items():
                sub.compile(backend=backend, dynamic=True)
                names.append(f"{name}.{part}")
            done.append(name)
        elif isinstance(module, BLOCK_TYPES):
            module.compile(backend=backend)
            names.append(name)
            done.append(name)
    return names


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm gains and biases are not decayed. A parameter built partitioned (ZeRO-3) holds an empty tensor; its
    shape is DeepSpeed's `ds_shape`."""
    return len(getattr(param, "ds_shape", param.shape)) < 2 or name.endswith(".bias")


class IncrementalDecoder:
    """Token-by-token (or chunk-by-chunk) decoding of a `GPT`: each call feeds the next tokens [b, n] and returns
    this TP rank's vocabulary slice of their logits [b, n, vocab / tp], carrying every layer's state (KV cache, SRU++
    recurrence state) between calls. Equal to `model.logits` on the whole sequence. Every block type has a
    `step(x, state) -> (x, state)`; routed blocks decide per token as in training (threshold mode)."""

    def __init__(self, model: GPT):
        if model.sequence_parallel:
            raise ValueError("IncrementalDecoder: decoding is not sequence parallel; build the GPT with "
                             "sequence_parallel=False (the same parameters load into it)")
        self.model = model
        self.states: list = [None] * len(model.blocks)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.model.embedding(tokens)
        for i, block in enumerate(self.model.blocks):
            h, self.states[i] = block.step(h, self.states[i])
        return self.model.head.logits(h, self.model._tied_weight())
