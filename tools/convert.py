"""`skiptron-convert`: checkpoints to and from Hugging Face, consolidation, and lm-eval evaluation.

    skiptron-convert to-hf --checkpoint DIR --out DIR           sharded checkpoint -> Hugging Face model directory
    skiptron-convert from-hf --hf DIR --out DIR [--tp N --pp N]  Llama / Mistral / Qwen2 -> skiptron (weights-only)
    skiptron-convert consolidate --checkpoint DIR --out DIR|FILE ZeRO/TP shards -> whole fp32 tensors (safetensors dir or .pt)
    skiptron-convert eval --hf DIR --tasks T[,T] [--include-path DIR] [--out FILE]   lm-eval on a converted model

A skiptron dense block is exactly a Llama decoder layer (pre-norm RMSNorm, rotate-half rotary incl. llama3 scaling,
SwiGLU, grouped-query attention, no biases), Mistral's (its sliding window covering the sequence) and, with Q/K/V
biases, Qwen2's, so the mapping is a renaming plus splitting the fused QKV (or [K; V]) and gate/up weights; the
padded vocabulary rows are dropped (their logits are -inf in skiptron). `from-hf` writes a layout-independent checkpoint (whole fp32 weights), which
`resume=<dir>` loads under any TP/PP/DP/ZeRO layout; `--tp/--pp` only check that the model splits that way.
Every other model (skip-routed, SRU++, biases, factorized embedding) exports as `SkiptronForCausalLM`: the modeling
code of training/hf/ is copied next to the weights, which keep skiptron's names, and `AutoModelForCausalLM.
from_pretrained(dir, trust_remote_code=True)` loads it.
`to-hf`/`from-hf`/`eval` need the `eval` extra (`pip install -e .[eval]`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from skiptron.training import checkpoint as ckpt
from skiptron.training.config import ConfigError, build_config, load_config
from skiptron.training.safetensors_io import DEFAULT_MAX_SHARD_SIZE, TensorSpec, write_set

HF_CODE = ("configuration_skiptron.py", "modeling_skiptron.py")
AUTO_MAP = {"AutoConfig": "configuration_skiptron.SkiptronConfig",
            "AutoModelForCausalLM": "modeling_skiptron.SkiptronForCausalLM"}
VOCAB_ROWS = ("embedding.tokens.weight", "embedding.codes.weight", "head.output.weight")


def _layer_map(i: int) -> dict[str, str]:
    return {f"blocks.{i}.attn_norm.weight": f"model.layers.{i}.input_layernorm.weight",
            f"blocks.{i}.attn.out.weight": f"model.layers.{i}.self_attn.o_proj.weight",
            f"blocks.{i}.mlp_norm.weight": f"model.layers.{i}.post_attention_layernorm.weight",
            f"blocks.{i}.mlp.down.weight": f"model.layers.{i}.mlp.down_proj.weight"}


def hf_tensors(name: str, t: torch.Tensor, model_cfg, vocab_size: int) -> list[tuple[str, torch.Tensor]]:
    """One whole skiptron parameter -> its Llama/Mistral/Qwen2 tensors (fused QKV / gate-up split, vocabulary
    padding dropped). Works on meta tensors too, which is how an export plans its files before reading weights."""
    if name == "embedding.tokens.weight":
        return [("model.embed_tokens.weight", t[:vocab_size])]
    if name == "head.norm.weight":
        return [("model.norm.weight", t)]
    if name == "head.output.weight":
        return [("lm_head.weight", t[:vocab_size])]
    block, i, rest = name.split(".", 2)
    if block != "blocks" or not i.isdigit():
        raise KeyError(f"{name}: not a parameter of a Llama-shaped model")
    renamed = _layer_map(int(i))
    if name in renamed:
        return [(renamed[name], t)]
    prefix = f"model.layers.{i}"
    part, kind = rest.rsplit(".", 1)
    if part == "attn.qkv":
        return [(f"{prefix}.self_attn.{n}_proj.{kind}", x) for n, x in zip("qkv", t.chunk(3, dim=0))]
    if part == "attn.q":
        return [(f"{prefix}.self_attn.q_proj.{kind}", t)]
    if part == "attn.kv":
        return [(f"{prefix}.self_attn.{n}_proj.{kind}", x) for n, x in zip("kv", t.chunk(2, dim=0))]
    if part == "mlp.gate_up":
        return [(f"{prefix}.mlp.{n}_proj.weight", x) for n, x in zip(("gate", "up"), t.chunk(2, dim=0))]
    raise KeyError(f"{name}: not a parameter of a Llama-shaped model")


def to_hf_state(weights: dict[str, torch.Tensor], model_cfg, vocab_size: int) -> dict[str, torch.Tensor]:
    """skiptron whole weights -> Llama/Mistral/Qwen2 names (`hf_tensors` of every parameter), fp32."""
    return {k: v.float().contiguous() for name, t in weights.items()
            for k, v in hf_tensors(name, t, model_cfg, vocab_size)}


def skiptron_tensors(get, model_cfg, padded_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama/Mistral/Qwen2 tensors, read one at a time through `get(hf_name)`, -> skiptron whole fp32 weights one
    parameter at a time (the inverse of `hf_tensors`), vocabulary padded with zeros."""

    def pad(t):
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])]) if t.shape[0] < padded_vocab else t

    def out(name, t):
        return name, t.float().contiguous()

    yield out("embedding.tokens.weight", pad(get("model.embed_tokens.weight")))
    yield out("head.norm.weight", get("model.norm.weight"))
    if not model_cfg.tie_embeddings:
        yield out("head.output.weight", pad(get("lm_head.weight")))
    for i in range(model_cfg.num_layers):
        for src, dst in _layer_map(i).items():
            yield out(src, get(dst))
        for kind in ("weight", "bias") if model_cfg.qkv_bias else ("weight",):
            q, k, v = (get(f"model.layers.{i}.self_attn.{n}_proj.{kind}") for n in "qkv")
            if model_cfg.kv_heads == model_cfg.num_heads:
                yield out(f"blocks.{i}.attn.qkv.{kind}", torch.cat([q, k, v]))
            else:
                yield out(f"blocks.{i}.attn.q.{kind}", q)
                yield out(f"blocks.{i}.attn.kv.{kind}", torch.cat([k, v]))
            del q, k, v  # the generator's frame would keep them alive through the next parameters
        yield out(f"blocks.{i}.mlp.gate_up.weight",
                  torch.cat([get(f"model.layers.{i}.mlp.{n}_proj.weight") for n in ("gate", "up")]))


def from_hf_state(hf: dict[str, torch.Tensor], model_cfg, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Llama/Mistral/Qwen2 names -> skiptron whole weights, from a whole HF state dict (`skiptron_tensors`)."""
    return dict(skiptron_tensors(hf.__getitem__, model_cfg, padded_vocab))


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise SystemExit(f"skiptron-convert: {module} is not installed; pip install -e '.[eval]'") from err


def _eot(tokenizer_file: Path) -> tuple[str | None, int | None]:
    from skiptron.training.tokenizer import EOT, eot_id, load_tokenizer

    if not tokenizer_file.is_file():
        return None, None
    return EOT, eot_id(load_tokenizer(tokenizer_file))


HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_family(model_cfg) -> str | None:
    """The transformers family a model is exactly ("llama", "mistral", "qwen2"), or None (exported with skiptron's
    own modeling code): dense transformer blocks, an ordinary token embedding, no biases but Q/K/V biases, which
    make it a Qwen2 (`model.hf_architecture` picks between the equivalent Llama and Mistral)."""
    m = model_cfg
    if m.block != "transformer" or m.skip.enabled or m.bias or m.embedding_rank is not None:
        return None
    return "qwen2" if m.qkv_bias else m.hf_architecture


def _rope_parameters(m) -> dict:
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling is not None:
        rope.update(m.rope_scaling.model_dump(), rope_type=m.rope_scaling.type)
        rope.pop("type")
    return rope


def _native_config(m, family: str, vocab: int, eot_id: int | None):
    import transformers

    config_class = getattr(transformers, HF_CLASSES[family].replace("ForCausalLM", "Config"))
    extra = {"llama": {"attention_bias": False, "mlp_bias": False}, "mistral": {"sliding_window": None},
             "qwen2": {"use_sliding_window": False, "sliding_window": None}}[family]
    return config_class(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim, hidden_act="silu",
        max_position_embeddings=m.max_positions, rms_norm_eps=m.norm_eps, rope_parameters=_rope_parameters(m),
        tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std, bos_token_id=eot_id,
        eos_token_id=eot_id, torch_dtype="float32", architectures=[HF_CLASSES[family]], **extra)


def _skiptron_config(m, vocab: int, eot_id: int | None):
    from skiptron.training.hf.configuration_skiptron import SkiptronConfig

    return SkiptronConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.kv_heads, intermediate_size=m.ffn_size, max_position_embeddings=m.max_positions,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        rotary_scaling=m.rope_scaling.model_dump() if m.rope_scaling else None, initializer_range=m.init_std,
        bias=m.bias, qkv_bias=m.qkv_bias, tie_embeddings=m.tie_embeddings,
        embedding_rank=m.embedding_rank, block=m.block,
        routed_layers=m.skip.routed_layers(m.num_layers), skip_granularity=m.skip.granularity, skip_kv=m.skip.kv,
        skip_router=m.skip.router, skip_predictor_hidden=m.skip.predictor_hidden,
        srupp_proj_size=m.srupp.projection(m.hidden_size), srupp_num_heads=m.srupp.num_heads,
        srupp_attention_layers=[i for i in range(m.num_layers) if m.block == "srupp" and m.srupp.has_attention(i)],
        bos_token_id=eot_id, eos_token_id=eot_id, torch_dtype="float32", architectures=["SkiptronForCausalLM"],
        auto_map=AUTO_MAP)


def skiptron_hf_tensors(name: str, t: torch.Tensor, vocab_size: int) -> list[tuple[str, torch.Tensor]]:
    """One whole skiptron parameter -> SkiptronForCausalLM's tensor (skiptron's names; a bare factor parameter
    `embedding.codes` becomes `embedding.codes.weight`), vocabulary padding dropped."""
    if name in ("embedding.codes", "embedding.decoder"):
        name += ".weight"
    return [(name, t[:vocab_size] if name in VOCAB_ROWS else t)]


def router_offset_keys(model_cfg) -> list[str]:
    """SkiptronForCausalLM's controller-offset buffers: one per routed layer, for the sigmoid router only (the one
    router with a budget controller)."""
    if model_cfg.skip.router != "sigmoid":
        return []
    return [f"blocks.{i}.router.offset" for i in model_cfg.skip.routed_layers(model_cfg.num_layers)]


def router_offsets(buffers: dict[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """The routers' controller offsets SkiptronForCausalLM holds. A routed layer without a saved offset
    (weights-only checkpoints keep no buffers) gets 0, as skiptron itself gives it when loading that checkpoint."""
    out = {}
    for key in router_offset_keys(model_cfg):
        if key not in buffers:
            print(f"skiptron-convert: warning: no {key} in the checkpoint; using 0 (as skiptron does when it loads "
                  f"this checkpoint)", file=sys.stderr)
        out[key] = buffers.get(key, torch.zeros(())).reshape(()).float()
    return out


def _check_state(path: Path, hf_cfg, specs: list[TensorSpec]) -> None:
    """The exported tensors are exactly SkiptronForCausalLM's, in name and shape (else the export would load with
    missing or freshly initialized weights)."""
    from skiptron.training.hf.modeling_skiptron import SkiptronForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SkiptronForCausalLM(hf_cfg).state_dict().items()}
    got = {spec.name: spec.shape for spec in specs}
    problems = [f"missing {k}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - expected.keys())]
    problems += [f"{k}: shape {got[k]}, expected {expected[k]}" for k in sorted(expected.keys() & got.keys())
                 if got[k] != expected[k]]
    if problems:
        raise SystemExit(f"skiptron-convert: {path}: the weights do not fit the exported model: " + "; ".join(problems))


def _whole_params(path: Path, meta: dict, trust: bool) -> tuple[Iterator[tuple[str, torch.Tensor]], dict]:
    """(the checkpoint's whole fp32 parameters as (name, tensor) pairs, its persistent buffers)."""
    weights, _, _, extras = ckpt.read_full_state(path, meta=meta, with_optimizer=False, trust=trust)

    def each():
        for name in list(weights):
            yield name, weights.pop(name)  # handed on and dropped here: the writer frees it once written

    return each(), extras.get("buffers", {})


def _export_specs(params: dict, convert) -> list[TensorSpec]:
    """The exported tensors' names, shapes and dtypes, from the checkpoint's parameter shapes (meta tensors)."""
    return [TensorSpec.of(k, v.float()) for name, entry in params.items()
            for k, v in convert(name, torch.empty(entry["shape"], device="meta"))]


def to_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, trust: bool = False,
          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """A checkpoint (any layout) -> a Hugging Face directory (safetensors, config, generation config, tokenizer):
    Llama/Mistral/Qwen2ForCausalLM when `hf_family` names one, else SkiptronForCausalLM with its modeling code
    (trust_remote_code). The weights stream into the safetensors files one parameter at a time, sharded with an
    index (as transformers writes them) when larger than `max_shard_size`."""
    _require("transformers")
    from transformers import GenerationConfig

    from skiptron.training import hf

    path, out = ckpt.resolve_checkpoint(checkpoint), Path(out)
    ckpt.verify(path)
    meta = ckpt.read_meta(path)
    cfg = load_config(path / "config.yaml")
    m = cfg.model
    vocab = meta["vocab_size"]
    if m.skip.enabled and m.skip.router == "sigmoid" and m.skip.mode == "capacity":
        raise SystemExit(
            f"skiptron-convert: {path}: model.skip.mode=capacity: a routing decision is a top-k over the whole "
            f"data-parallel batch (skiptron decides so at evaluation too), not a function of the token, so no "
            f"standalone model reproduces it; only threshold-mode routing exports")
    masked = sorted(k for k in meta["params"] if k.endswith(".mask_scores"))
    if masked:
        raise SystemExit(f"skiptron-convert: {path}: a mask-finetuning checkpoint ({masked[0]}, ...); merge the masks "
                         f"first (skiptron-finetune merge --base CKPT --task FILE --out DIR) and export DIR")
    eot, eot_id = _eot(path / "tokenizer.json")
    family = hf_family(m)
    native = family is not None
    if native:
        hf_cfg = _native_config(m, family, vocab, eot_id)

        def convert(name, t):
            return hf_tensors(name, t, m, vocab)
    else:
        hf_cfg = _skiptron_config(m, vocab, eot_id)

        def convert(name, t):
            return skiptron_hf_tensors(name, t, vocab)
    specs = _export_specs(meta["params"], convert)
    offsets = {}
    if not native:
        offsets = dict.fromkeys(router_offset_keys(m))
        specs += [TensorSpec(k, (), torch.float32) for k in offsets]
        _check_state(path, hf_cfg, specs)
    params, buffers = _whole_params(path, meta, trust)
    if offsets:
        offsets = router_offsets(buffers, m)
    tensors = ((k, v.float().contiguous()) for name, t in params for k, v in convert(name, t))
    out.mkdir(parents=True, exist_ok=True)
    write_set(out, specs, itertools.chain(tensors, offsets.items()), max_shard_size, metadata={"format": "pt"})
    hf_cfg.save_pretrained(out)
    if not native:
        for name in HF_CODE:
            shutil.copyfile(Path(hf.__file__).parent / name, out / name)
    # The Skiptron model keeps no KV cache: generation re-runs the sequence (see modeling_skiptron.py).
    GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, use_cache=native).save_pretrained(out)
    if eot is not None:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=eot, bos_token=eot,
                                      unk_token=None, model_max_length=m.seq_len)
        tok.save_pretrained(out)
    return out


class HFWeights:
    """The tensors of a Hugging Face model directory, each read on its own when asked for: safetensors files
    (sharded with an index or not) through `safe_open`, which reads only that tensor's bytes, or a
    `pytorch_model.bin` memory-mapped. Never the whole state dict at once."""

    def __init__(self, hf_dir: Path):
        from skiptron.training.safetensors_io import safetensors_files

        self.hf_dir = hf_dir
        self._where = safetensors_files(hf_dir)
        self._bin = None
        if not self._where:
            binary = hf_dir / "pytorch_model.bin"
            if not binary.is_file():
                raise SystemExit(f"skiptron-convert: no *.safetensors or pytorch_model.bin in {hf_dir}")
            self._bin = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)

    def keys(self) -> set[str]:
        return set(self._bin) if self._bin is not None else set(self._where)

    def __call__(self, name: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[name]
        with self._file(name) as f:
            return f.get_tensor(name)

    def meta(self, name: str) -> torch.Tensor:
        """The tensor's shape as a meta tensor, from the file's header (nothing read)."""
        if self._bin is not None:
            return torch.empty(self._bin[name].shape, device="meta")
        with self._file(name) as f:
            return torch.empty(f.get_slice(name).get_shape(), device="meta")

    def _file(self, name: str):
        """The tensor's file, opened for one read: closing unmaps it, so the pages read do not stay resident."""
        from safetensors import safe_open

        if name not in self._where:
            raise SystemExit(f"skiptron-convert: {self.hf_dir}: no tensor {name}")
        return safe_open(str(self._where[name]), framework="pt")


def _hf_rope(c: dict, problems: list[str]) -> dict:
    """skiptron's rope_theta / rope_scaling from a config's `rope_parameters` (transformers 5) or `rope_scaling` +
    `rope_theta` (older files)."""
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": rope.get("rope_theta", c.get("rope_theta", 10000.0))}
    if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor {rope.get('partial_rotary_factor', c.get('partial_rotary_factor'))}: "
                        f"only full rotary embeddings are supported")
    if kind == "llama3":
        out["rope_scaling"] = {"type": "llama3", **{k: rope[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in rope}}
    elif kind != "default":
        problems.append(f"rope_type {kind!r}: only the default and 'llama3' rotary embeddings are supported")
    return out


def _hf_sliding_window(c: dict, seq_len: int, problems: list[str], log) -> None:
    """Sliding-window attention is not implemented: a window that covers the whole sequence is the same model."""
    window = c.get("sliding_window")
    used = c.get("use_sliding_window", True) if c.get("model_type") == "qwen2" else True
    if window is None or not used:
        return
    if window < seq_len:
        problems.append(f"sliding_window {window} < model.seq_len {seq_len}: sliding-window attention is not "
                        f"supported (pass --seq-len {window} or less to continue with windows covering the sequence)")
    else:
        log(f"skiptron-convert: note: sliding_window {window} >= model.seq_len {seq_len}: every window covers the "
            f"whole sequence, so it is ignored")


def from_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int = 1, pp: int = 1,
            vocab_multiple: int = 128, seq_len: int | None = None, log=None) -> Path:
    """A Llama / Mistral / Qwen2 HF directory -> a skiptron weights-only checkpoint (loads under any layout).
    Everything skiptron cannot represent is refused, each field by name; `seq_len` (default: the model's
    max_position_embeddings) is the training sequence length of the written config."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    hf_dir = Path(hf_dir)
    c = json.loads((hf_dir / "config.json").read_text())
    hf = HFWeights(hf_dir)
    family = c.get("model_type")
    problems = []
    if family not in HF_CLASSES:
        problems.append(f"model_type {family!r} is not one of {', '.join(map(repr, HF_CLASSES))}")
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    if c.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim {c['head_dim']} differs from hidden_size / num_attention_heads = {hidden // heads}")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c.get('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
    if c.get("attention_bias"):
        problems.append("attention_bias true (biases on q, k, v and o projections): only Q/K/V biases (Qwen2) are "
                        "supported")
    if c.get("mlp_bias"):
        problems.append("mlp_bias true: MLP biases are not supported")
    positions = c.get("max_position_embeddings", 2048)
    seq_len = seq_len or positions
    rope = _hf_rope(c, problems)
    _hf_sliding_window(c, seq_len, problems, log)
    if problems:
        raise SystemExit(f"skiptron-convert: {hf_dir / 'config.json'}: " + "; ".join(problems))
    vocab = c["vocab_size"]
    tied = c.get("tie_word_embeddings", False) or "lm_head.weight" not in hf.keys()
    try:
        cfg = build_config({
            "model": {"num_layers": c["num_hidden_layers"], "hidden_size": hidden, "num_heads": heads,
                      "num_kv_heads": c.get("num_key_value_heads") or heads, "ffn_hidden_size": c["intermediate_size"],
                      "seq_len": seq_len, "max_position_embeddings": positions, "vocab_size": vocab,
                      "make_vocab_size_divisible_by": vocab_multiple, "tie_embeddings": tied,
                      "qkv_bias": family == "qwen2", "hf_architecture": family,
                      "norm_eps": c.get("rms_norm_eps", 1e-5), **rope},
            "parallel": {"tp": tp, "pp": pp}})
    except ConfigError as err:
        raise SystemExit(f"skiptron-convert: {hf_dir} cannot be used with --tp {tp} --pp {pp}: {err}") from err
    padded = cfg.model.padded_vocab_size(vocab)
    shapes = {name: tuple(t.shape) for name, t in skiptron_tensors(hf.meta, cfg.model, padded)}  # reads no data
    weights = ckpt.WeightStream(shapes, skiptron_tensors(hf, cfg.model, padded))
    tokenizer = hf_dir / "tokenizer.json"
    return ckpt.write_weights_checkpoint(out, cfg, weights, vocab, tokenizer if tokenizer.is_file() else None)


TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def consolidate(checkpoint: str | os.PathLike, out: str | os.PathLike, trust: bool = False,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """ZeRO and TP shards -> whole fp32 tensors under skiptron's names (like DeepSpeed's zero_to_fp32): `out` a
    directory: safetensors files streamed one parameter at a time (sharded with an index past `max_shard_size`);
    `out` a .pt/.pth/.bin file: one torch.save state dict (which holds the whole model in memory to write it)."""
    checkpoint = ckpt.resolve_checkpoint(checkpoint)
    ckpt.verify(checkpoint)
    meta = ckpt.read_meta(checkpoint)
    out = Path(out)
    params, _ = _whole_params(checkpoint, meta, trust)
    if out.suffix in TORCH_SUFFIXES:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(params), out)
        return out
    write_set(out, _export_specs(meta["params"], lambda name, t: [(name, t)]),
              ((name, t.float().contiguous()) for name, t in params), max_shard_size, metadata={"format": "pt"})
    return out


def evaluate(hf_dir: str | os.PathLike, tasks: list[str], include_path: str | None = None, batch_size: int = 1,
             limit: int | None = None) -> dict:
    """lm-eval (offline) on a converted model directory; tasks may be defined by YAML files under `include_path`.
    A SkiptronForCausalLM export runs its own modeling code (trust_remote_code)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _require("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={hf_dir},dtype=float32"
    if json.loads((Path(hf_dir) / "config.json").read_text()).get("model_type") == "skiptron":
        model_args += ",trust_remote_code=True"
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, batch_size=batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu", limit=limit,
        task_manager=TaskManager(include_path=include_path) if include_path else None)
    return {"results": results["results"], "configs": {k: str(v) for k, v in results.get("configs", {}).items()}}


CHECKPOINT_HELP = "a checkpoint, run or checkpoints directory, or a `latest` file (its newest complete checkpoint)"


def build_parser() -> argparse.ArgumentParser:
    from skiptron.tools.train import add_trust_argument
    from skiptron.training import verbosity

    p = argparse.ArgumentParser(prog="skiptron-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="checkpoint -> Hugging Face directory (Llama, or skiptron's modeling code)")
    a.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    a.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    a.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest safetensors file before the weights are split into shards with an index, e.g. "
                        "5GB or 500MB (default: %(default)s, as transformers)")
    add_trust_argument(a)
    b = sub.add_parser("from-hf", help="Hugging Face Llama / Mistral / Qwen2 directory -> skiptron checkpoint")
    b.add_argument("--hf", required=True, help="a Hugging Face model directory (config.json + weights)")
    b.add_argument("--out", required=True, help="the weights-only skiptron checkpoint directory to write")
    b.add_argument("--tp", type=int, default=1, help="check that the model splits over this TP size")
    b.add_argument("--pp", type=int, default=1, help="check that the model splits over this PP size")
    b.add_argument("--vocab-multiple", type=int, default=128, help="model.make_vocab_size_divisible_by")
    b.add_argument("--seq-len", type=int, help="model.seq_len of the written config (default: max_position_embeddings)")
    c = sub.add_parser("consolidate", help="checkpoint -> whole fp32 tensors (safetensors directory or one file)")
    c.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    c.add_argument("--out", required=True, help="a directory (safetensors, streamed one tensor at a time) or a "
                                                ".pt/.pth/.bin file (torch.save of the whole state dict)")
    c.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest safetensors file of a directory output before it is sharded (default: %(default)s)")
    add_trust_argument(c)
    e = sub.add_parser("eval", help="run lm-eval on a converted (to-hf) model directory")
    e.add_argument("--hf", required=True, help="a model directory written by to-hf")
    e.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    e.add_argument("--include-path", help="a directory of task YAML files (tasks on local data)")
    e.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default: %(default)s)")
    e.add_argument("--limit", type=int, help="evaluate at most this many documents per task")
    e.add_argument("--out", help="write the results as JSON here")
    for parser in (a, b, c, e):
        verbosity.add_argument(parser)
    return p


def main(argv=None) -> int:
    from skiptron.training import verbosity

    args = build_parser().parse_args(argv)
    verbosity.configure(args.verbose or None)
    try:
        if args.cmd == "to-hf":
            print(to_hf(args.checkpoint, args.out, args.trust_checkpoint, args.max_shard_size))
        elif args.cmd == "from-hf":
            print(from_hf(args.hf, args.out, args.tp, args.pp, args.vocab_multiple, args.seq_len))
        elif args.cmd == "consolidate":
            print(consolidate(args.checkpoint, args.out, args.trust_checkpoint, args.max_shard_size))
        else:
            res = evaluate(args.hf, args.tasks.split(","), args.include_path, args.batch_size, args.limit)
            text = json.dumps(res["results"], indent=1, default=str)
            if args.out:
                Path(args.out).write_text(text)
            print(text)
    except ckpt.CheckpointError as err:
        print(f"skiptron-convert: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
