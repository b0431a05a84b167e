"""Pipeline parallelism: GPT's flat layer sequence (`model.layer_sequence`) as a DeepSpeed `PipelineModule`.

Stage layers wrap the very modules `GPT` is made of (built by the same builders, each from its own seed, so every
(TP, PP, DP) layout starts from the weights of (1, 1, 1)):

    EmbeddingStage   tokens [b, s] -> h                         (first stage)
    BlockStage       h -> h, one block (plain, routed or SRU++), optionally recomputed in the backward
    HeadStage        h -> final norm (tied), or the output layer's input and its own weight (untied)
    tied output      the embedding again, on the last stage, handing its weight to the loss (TiedLayerSpec "embed"):
                     DeepSpeed all-reduces its gradient between the first and last stage, so both copies stay equal
    PipeLoss         the output layer fused with the vocab-parallel cross entropy (`model.head_loss`: chunks of
                     tokens, the logits never held whole; padded vocabulary at -inf), on the last stage

With routed blocks the activations between stages are (h, aux): each routed block adds its weighted budget loss to
`aux`, which travels with h through the pipeline, and the loss is LM + aux, so every stage's aux loss reaches the
total loss and its gradient flows back to that stage's routers. The token balancer inside routed blocks uses
megatron-core's data-parallel group, which under PP is this stage's DP group.

DeepSpeed's topology and megatron-core's groups must place every rank alike: `check_rank_mapping` compares both
for every rank (and the TP/DP group members) at start-up and raises on any difference.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state as ps
from torch import nn

from skiptron.parallel.tensor_parallel import copy_to_tp_region

from .config import Config
from .model import head_loss, layer_sequence, run_block, vocab_padding, vocab_start
from .routing import LayerFeedback


class MappingError(RuntimeError):
    """megatron-core and DeepSpeed disagree on where a rank sits in the (pp, dp, tp) grid."""


def rank_coordinates(topology) -> dict[int, dict]:
    """For every rank: megatron-core's (pp, dp, tp) and DeepSpeed's topology coordinates. Collective."""
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out = {}
    for rank, (pp, dp, tp) in enumerate(everyone):
        c = topology.get_coord(rank)
        out[rank] = {"megatron": (pp, dp, tp), "deepspeed": (c.pipe, c.data, c.model)}
    return out


def check_rank_mapping(topology, device: torch.device) -> dict[int, dict]:
    """Raise MappingError unless both libraries give every rank the same (pp, dp, tp) and this rank's TP and DP
    groups the same members. Collective (on `device`, the world group's: NCCL takes CUDA tensors only); returns the
    coordinates."""
    coords = rank_coordinates(topology)
    bad = [f"rank {r}: megatron (pp, dp, tp) = {c['megatron']}, deepspeed = {c['deepspeed']}"
           for r, c in coords.items() if c["megatron"] != c["deepspeed"]]
    rank = dist.get_rank()
    for axis, group in (("model", ps.get_tensor_model_parallel_group()), ("data", ps.get_data_parallel_group())):
        ds_ranks = sorted(next(g for g in topology.get_axis_comm_lists(axis) if rank in g)) \
            if topology.get_dim(axis) > 1 else [rank]
        mg_ranks = sorted(dist.get_process_group_ranks(group))
        if ds_ranks != mg_ranks:
            bad.append(f"rank {rank}: {axis}-parallel group megatron {mg_ranks}, deepspeed {ds_ranks}")
    flag = torch.tensor([len(bad)], device=device)
    dist.all_reduce(flag)
    if flag.item():
        raise MappingError("rank mapping differs between megatron-core parallel_state and DeepSpeed's topology: "
                           + ("; ".join(bad) if bad else "(on another rank)"))
    return coords


def _unpack(x):
    return (x[0], x[1]) if isinstance(x, tuple) else (x, None)


def _pack(h, aux):
    return h if aux is None else (h, aux)


class _Stage(nn.Module):
    """One entry of GPT's layer sequence: `layer` is the module GPT has under the name `gpt_name`."""

    def __init__(self, gpt_name: str, build):
        super().__init__()
        self.gpt_name = gpt_name
        self.layer = build()


class EmbeddingStage(_Stage):
    def __init__(self, gpt_name: str, build, carry_aux: bool):
        super().__init__(gpt_name, build)
        self.carry_aux = carry_aux

    def forward(self, tokens: torch.Tensor):
        h = self.layer(tokens)
        if not self.carry_aux:
            return h
        # a leaf that takes a gradient, so DeepSpeed can run backward from it even if no block on this stage routes
        return h, torch.zeros(1, device=h.device, requires_grad=torch.is_grad_enabled())


class BlockStage(_Stage):
    """One block. A routed block's aux loss joins the carried `aux`; its record goes to the step's collector when
    the trainer set one (`GPTPipe.collecting`), since DeepSpeed's engine passes only activations between layers."""

    def __init__(self, gpt_name: str, build, index: int, checkpoint: bool):
        super().__init__(gpt_name, build)
        self.index, self.checkpoint = index, checkpoint
        self.collector: StepCollector | None = None

    def forward(self, inputs):
        h, aux = _unpack(inputs)
        positions = torch.arange(h.shape[1], device=h.device)
        h, record = run_block(self.layer, h, positions, self.checkpoint)
        if record is not None:
            if self.collector is not None and self.training and torch.is_grad_enabled():
                self.collector.routing.setdefault(self.index, []).append(record)
            aux = aux + record.aux_loss  # weighted by its router
        return _pack(h, aux)


class HeadStage(_Stage):
    """Final norm; when the head has its own output weight, also the entry into its TP region and that weight, for
    the loss: (h, weight[, aux])."""

    def __init__(self, gpt_name: str, build, tied: bool):
        super().__init__(gpt_name, build)
        self.tied = tied

    def forward(self, inputs):
        h, aux = _unpack(inputs)
        if self.tied:
            return _pack(self.layer.norm(h), aux)
        return _loss_inputs(self.layer.tp_input(h), self.layer.output_weight(None), aux)


def tied_output(embedding: EmbeddingStage, inputs):
    """The output layer's input in its TP region and the embedding's weight (this TP rank's vocabulary slice)."""
    h, aux = _unpack(inputs)
    return _loss_inputs(copy_to_tp_region(h), embedding.layer.tokens.weight, aux)


def _loss_inputs(h, weight, aux):
    return (h, weight) if aux is None else (h, weight, aux)


@dataclass
class StepCollector:
    """What one `train_batch` / `eval_batch` computed besides the loss DeepSpeed aggregates, collected while the
    trainer holds `GPTPipe.collecting()`: the LM losses of the last stage's micro-batches and, per routed layer of
    this stage, one RoutingRecord per training micro-batch."""

    lm_losses: list = field(default_factory=list)
    routing: dict = field(default_factory=dict)

    def routing_per_micro_batch(self) -> list[dict]:
        """{layer: record} per micro-batch."""
        return [dict(zip(self.routing, recs)) for recs in zip(*self.routing.values())]


class PipeLoss:
    """The output layer and vocab-parallel cross entropy on the last stage (`model.head_loss`), padded vocabulary
    entries at -inf; + the carried aux loss. The LM part of each micro-batch's loss goes to the step's collector (for
    logging)."""

    __name__ = "PipeLoss"

    def __init__(self, padding: torch.Tensor, vocab_start: int, chunk_tokens: int):
        self.padding = padding if bool(padding.any()) else None  # read once here (a host sync on GPUs)
        self.vocab_start, self.chunk_tokens = vocab_start, chunk_tokens
        self.collector: StepCollector | None = None

    def __call__(self, outputs, labels):
        h, weight, *aux = outputs
        if self.padding is not None and self.padding.device != h.device:
            self.padding = self.padding.to(h.device)  # moved once: the loss is no module, DeepSpeed does not move it
        lm = head_loss(h, weight, labels, self.chunk_tokens, self.padding, self.vocab_start)
        if self.collector is not None:
            self.collector.lm_losses.append(lm.detach())
        return lm + aux[0].sum() if aux else lm


def _meta_param_count(spec: LayerSpec) -> int:
    """Parameters of a layer spec, built on the meta device (no memory, no initialization cost); a real build if
    some layer cannot be built there."""
    try:
        with torch.device("meta"):
            module = spec.build()
    except Exception:  # pragma: no cover - a layer that insists on real tensors
        with torch.random.fork_rng(devices=[]):
            module = spec.build()
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class GPTPipe(PipelineModule):
    """GPT as a DeepSpeed pipeline: one stage's layers on each pipeline rank, the rest never built."""

    def __init__(self, cfg: Config, vocab_size: int, device: torch.device, balance: int | None = 0):
        """`device`: this rank's device (the layout's), where the start-up collectives' tensors live."""
        mc, par = cfg.model, cfg.parallel
        tp, pp = par.tp, par.pp
        dp = dist.get_world_size() // (tp * pp)
        routed = mc.skip.routed_layers(mc.num_layers)
        carry = bool(routed)
        checkpointed = par.checkpointed_blocks(mc.num_layers)
        seq = layer_sequence(mc, vocab_size, tp, balance)
        (emb_name, emb_build), blocks, (head_name, head_build) = seq[0], seq[1:-1], seq[-1]
        tied = mc.tie_embeddings
        attr = "layer.tokens.weight"
        specs = [TiedLayerSpec("embed", EmbeddingStage, emb_name, emb_build, carry, tied_weight_attr=attr) if tied
                 else LayerSpec(EmbeddingStage, emb_name, emb_build, carry)]
        specs += [LayerSpec(BlockStage, name, build, i, i in checkpointed)
                  for i, (name, build) in enumerate(blocks)]
        specs.append(LayerSpec(HeadStage, head_name, head_build, tied))
        if tied:
            specs.append(TiedLayerSpec("embed", EmbeddingStage, emb_name, emb_build, carry, forward_fn=tied_output,
                                       tied_weight_attr=attr))
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False)
        topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        coords = check_rank_mapping(topology, device)
        padded = mc.padded_vocab_size(vocab_size)
        loss = PipeLoss(vocab_padding(vocab_size, padded, tp), vocab_start(padded, tp), cfg.train.loss_chunk_tokens)
        method = "type:^BlockStage$" if par.partition == "uniform" else "parameters"
        super().__init__(layers=specs, topology=topology, loss_fn=loss, partition_method=method)
        self.rank_coordinates = coords
        self.carry_aux = carry
        self.partition_name = par.partition

    # -- partitioning --------------------------------------------------------------------------------------------
    def _count_layer_params(self):
        return [_meta_param_count(s) if isinstance(s, LayerSpec) else 0 for s in self._layer_specs]

    def describe_partition(self) -> list[str]:
        """One line per stage: its layers (GPT names) and parameter count."""
        counts = self._count_layer_params()
        lines = []
        for stage in range(self.num_stages):
            lo, hi = self.parts[stage], self.parts[stage + 1]
            names = []
            for spec in self._layer_specs[lo:hi]:
                name = spec.module_args[0]
                names.append(f"{name} (tied)" if isinstance(spec, TiedLayerSpec) and spec.forward_fn else name)
            lines.append(f"stage {stage}: {', '.join(names)} | {sum(counts[lo:hi]) / 1e6:.3f}M params")
        return lines

    # -- names ---------------------------------------------------------------------------------------------------
    def layer_names(self) -> list[str | None]:
        """GPT's module name for every layer index of the whole pipeline; None for the tied output layer, which
        owns no state (DeepSpeed writes one checkpoint file per other layer and TP rank)."""
        return [None if isinstance(s, TiedLayerSpec) and s.forward_fn else s.module_args[0]
                for s in self._layer_specs]

    def gpt_name(self, name: str) -> str:
        return gpt_name(name, self.layer_names())

    # -- routing -------------------------------------------------------------------------------------------------
    def _routed(self) -> dict[int, BlockStage]:
        return {m.index: m for m in self.modules() if isinstance(m, BlockStage) and hasattr(m.layer, "router")}

    @contextlib.contextmanager
    def collecting(self):
        """Collect the LM losses and routing records of the batch run inside: `with module.collecting() as c:
        engine.train_batch(...)`; yields a `StepCollector`."""
        collector = StepCollector()
        targets = [m for m in self.modules() if isinstance(m, BlockStage)] + [self.loss_fn]
        for target in targets:
            target.collector = collector
        try:
            yield collector
        finally:
            for target in targets:
                target.collector = None

    def routed_layers(self) -> dict[int, nn.Module]:
        """Layer index -> routed block, of this stage's layers."""
        return {i: stage.layer for i, stage in self._routed().items()}

    def update_routing(self, feedback: dict[int, LayerFeedback]) -> None:
        stages = self._routed()
        for i, layer in feedback.items():
            if i in stages:
                stages[i].layer.update_after_step(layer)

    def tied_embedding(self) -> torch.Tensor | None:
        """This stage's copy of the tied embedding weight (first and last stage), else None."""
        if "embed" in self.tied_modules:
            return self.tied_modules["embed"].layer.tokens.weight
        return None


def gpt_name(name: str, layer_names: list[str | None]) -> str:
    """GPT's name for a pipeline parameter or buffer (`3.layer.attn.qkv.weight` -> `blocks.2.attn.qkv.weight`),
    given the pipeline's `layer_names` (also recorded in checkpoints, so files can be read without a model)."""
    m = re.match(r"tied_modules\.(\w+)\.layer\.(.*)", name)
    if m:
        return f"embedding.{m.group(2)}"
    idx, rest = name.split(".", 1)
    if not rest.startswith("layer.") or layer_names[int(idx)] is None:
        raise KeyError(f"{name} is not a parameter or buffer of a pipeline stage layer")
    return f"{layer_names[int(idx)]}.{rest[len('layer.'):]}"


def full_gpt_state(module: GPTPipe) -> dict[str, torch.Tensor]:
    """Whole TP=1 weights under GPT's names, from every pipeline stage (collective over the world). The tied
    embedding comes from the first stage."""
    from skiptron.parallel.tensor_parallel import full_tensor

    with torch.no_grad():
        mine = {module.gpt_name(n): full_tensor(p).float().cpu() for n, p in module.named_parameters()}
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    out = {}
    for part in reversed(stages):
        out.update(part)
    return dict(sorted(out.items()))
