"""`skiptron-convert`: checkpoints to and from Hugging Face, consolidation, and lm-eval evaluation.

    skiptron-convert to-hf --checkpoint DIR --out DIR           sharded checkpoint -> Hugging Face model directory
    skiptron-convert from-hf --hf DIR --out DIR [--tp N --pp N]  Llama / Mistral / Qwen2 -> skiptron (weights-only)
    skiptron-convert consolidate --checkpoint DIR --out FILE     ZeRO/TP shards -> one fp32 state dict (torch.save)
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
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from skiptron.training import checkpoint as ckpt
from skiptron.training.config import ConfigError, build_config, load_config

SAFETENSORS = "model.safetensors"
HF_CODE = ("configuration_skiptron.py", "modeling_skiptron.py")
AUTO_MAP = {"AutoConfig": "configuration_skiptron.SkiptronConfig",
            "AutoModelForCausalLM": "modeling_skiptron.SkiptronForCausalLM"}
VOCAB_ROWS = ("embedding.tokens.weight", "embedding.codes.weight", "head.output.weight")


def _layer_map(i: int) -> dict[str, str]:
    return {f"blocks.{i}.attn_norm.weight": f"model.layers.{i}.input_layernorm.weight",
            f"blocks.{i}.attn.out.weight": f"model.layers.{i}.self_attn.o_proj.weight",
            f"blocks.{i}.mlp_norm.weight": f"model.layers.{i}.post_attention_layernorm.weight",
            f"blocks.{i}.mlp.down.weight": f"model.layers.{i}.mlp.down_proj.weight"}


def _qkv(weights: dict[str, torch.Tensor], model_cfg, i: int, kind: str) -> tuple[torch.Tensor, ...]:
    """Block i's whole q, k and v weights (kind "weight") or biases ("bias"), from the fused `qkv` (multi-head) or
    the `q` and `kv` projections (grouped-query)."""
    if model_cfg.kv_heads == model_cfg.num_heads:
        return weights[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)
    return (weights[f"blocks.{i}.attn.q.{kind}"], *weights[f"blocks.{i}.attn.kv.{kind}"].chunk(2, dim=0))


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model_cfg, i: int, kind: str) -> dict:
    """The inverse of `_qkv`."""
    if model_cfg.kv_heads == model_cfg.num_heads:
        return {f"blocks.{i}.attn.qkv.{kind}": torch.cat([q, k, v])}
    return {f"blocks.{i}.attn.q.{kind}": q, f"blocks.{i}.attn.kv.{kind}": torch.cat([k, v])}


def to_hf_state(weights: dict[str, torch.Tensor], model_cfg, vocab_size: int) -> dict[str, torch.Tensor]:
    """skiptron whole weights -> Llama/Mistral/Qwen2 names; fused QKV / gate-up split, vocabulary padding dropped."""
    out = {"model.embed_tokens.weight": weights["embedding.tokens.weight"][:vocab_size],
           "model.norm.weight": weights["head.norm.weight"]}
    if not model_cfg.tie_embeddings:
        out["lm_head.weight"] = weights["head.output.weight"][:vocab_size]
    for i in range(model_cfg.num_layers):
        for src, dst in _layer_map(i).items():
            out[dst] = weights[src]
        kinds = ("weight", "bias") if model_cfg.qkv_bias else ("weight",)
        for kind in kinds:
            out.update({f"model.layers.{i}.self_attn.{n}_proj.{kind}": t
                        for n, t in zip("qkv", _qkv(weights, model_cfg, i, kind))})
        gate, up = weights[f"blocks.{i}.mlp.gate_up.weight"].chunk(2, dim=0)
        out[f"model.layers.{i}.mlp.gate_proj.weight"], out[f"model.layers.{i}.mlp.up_proj.weight"] = gate, up
    return {k: v.float().contiguous() for k, v in out.items()}


def from_hf_state(hf: dict[str, torch.Tensor], model_cfg, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Llama/Mistral/Qwen2 names -> skiptron whole weights (the inverse of `to_hf_state`), vocabulary padded with
    zeros."""

    def pad(t):
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])]) if t.shape[0] < padded_vocab else t

    out = {"embedding.tokens.weight": pad(hf["model.embed_tokens.weight"]), "head.norm.weight": hf["model.norm.weight"]}
    if not model_cfg.tie_embeddings:
        out["head.output.weight"] = pad(hf["lm_head.weight"])
    for i in range(model_cfg.num_layers):
        for src, dst in _layer_map(i).items():
            out[src] = hf[dst]
        for kind in ("weight", "bias") if model_cfg.qkv_bias else ("weight",):
            out.update(_fused_qkv(*(hf[f"model.layers.{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"), model_cfg, i,
                                  kind))
        out[f"blocks.{i}.mlp.gate_up.weight"] = torch.cat(
            [hf[f"model.layers.{i}.mlp.{n}_proj.weight"] for n in ("gate", "up")])
    return {k: v.float().contiguous() for k, v in out.items()}


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


def skiptron_hf_state(weights: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], model_cfg,
                      vocab_size: int) -> dict[str, torch.Tensor]:
    """skiptron whole weights plus the routers' controller offsets -> SkiptronForCausalLM's state dict (skiptron's
    names; a bare factor parameter `embedding.codes` becomes `embedding.codes.weight`), vocabulary padding dropped.
    A routed layer without a saved offset (weights-only checkpoints keep no buffers) gets 0, as skiptron itself
    gives it when loading that checkpoint."""
    out = {}
    for name, t in weights.items():
        if name in ("embedding.codes", "embedding.decoder"):
            name += ".weight"
        out[name] = t[:vocab_size] if name in VOCAB_ROWS else t
    sigmoid = model_cfg.skip.router == "sigmoid"  # the one router with a controller offset
    for i in model_cfg.skip.routed_layers(model_cfg.num_layers) if sigmoid else ():
        key = f"blocks.{i}.router.offset"
        if key not in buffers:
            print(f"skiptron-convert: warning: no {key} in the checkpoint; using 0 (as skiptron does when it loads "
                  f"this checkpoint)", file=sys.stderr)
        out[key] = buffers.get(key, torch.zeros(())).reshape(())
    return {k: v.float().contiguous() for k, v in out.items()}


def _check_state(path: Path, hf_cfg, state: dict[str, torch.Tensor]) -> None:
    """The exported tensors are exactly SkiptronForCausalLM's, in name and shape (else the export would load with
    missing or freshly initialized weights)."""
    from skiptron.training.hf.modeling_skiptron import SkiptronForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SkiptronForCausalLM(hf_cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - expected.keys())]
    problems += [f"{k}: shape {got[k]}, expected {expected[k]}" for k in sorted(expected.keys() & got.keys())
                 if got[k] != expected[k]]
    if problems:
        raise SystemExit(f"skiptron-convert: {path}: the weights do not fit the exported model: " + "; ".join(problems))


def to_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, trust: bool = False) -> Path:
    """A checkpoint (any layout) -> a Hugging Face directory (safetensors, config, generation config, tokenizer):
    Llama/Mistral/Qwen2ForCausalLM when `hf_family` names one, else SkiptronForCausalLM with its modeling code (trust_remote_code)."""
    _require("transformers")
    from safetensors.torch import save_file
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
    weights, _, _, extras = ckpt.read_full_state(path, meta=meta, with_optimizer=False, trust=trust)
    masked = sorted(k for k in weights if k.endswith(".mask_scores"))
    if masked:
        raise SystemExit(f"skiptron-convert: {path}: a mask-finetuning checkpoint ({masked[0]}, ...); merge the masks "
                         f"first (skiptron-finetune merge --base CKPT --task FILE --out DIR) and export DIR")
    eot, eot_id = _eot(path / "tokenizer.json")
    family = hf_family(m)
    native = family is not None
    if native:
        hf_cfg, state = _native_config(m, family, vocab, eot_id), to_hf_state(weights, m, vocab)
    else:
        hf_cfg = _skiptron_config(m, vocab, eot_id)
        state = skiptron_hf_state(weights, extras.get("buffers", {}), m, vocab)
        _check_state(path, hf_cfg, state)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(out)
    if not native:
        for name in HF_CODE:
            shutil.copyfile(Path(hf.__file__).parent / name, out / name)
    # The Skiptron model keeps no KV cache: generation re-runs the sequence (see modeling_skiptron.py).
    GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, use_cache=native).save_pretrained(out)
    save_file(state, str(out / SAFETENSORS), metadata={"format": "pt"})
    if eot is not None:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=eot, bos_token=eot,
                                      unk_token=None, model_max_length=m.seq_len)
        tok.save_pretrained(out)
    return out


def _read_hf(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((hf_dir / "config.json").read_text())
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state = {k: v for f in files for k, v in load_file(str(f)).items()}
    elif (hf_dir / "pytorch_model.bin").is_file():
        state = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise SystemExit(f"skiptron-convert: no *.safetensors or pytorch_model.bin in {hf_dir}")
    return config, state


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
    c, state = _read_hf(hf_dir)
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
    tied = c.get("tie_word_embeddings", False) or "lm_head.weight" not in state
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
    weights = from_hf_state(state, cfg.model, cfg.model.padded_vocab_size(vocab))
    tokenizer = hf_dir / "tokenizer.json"
    return ckpt.write_weights_checkpoint(out, cfg, weights, vocab, tokenizer if tokenizer.is_file() else None)


def consolidate(checkpoint: str | os.PathLike, out: str | os.PathLike, trust: bool = False) -> Path:
    """ZeRO and TP shards -> one fp32 state dict of whole tensors, skiptron names (like DeepSpeed's zero_to_fp32)."""
    checkpoint = ckpt.resolve_checkpoint(checkpoint)
    ckpt.verify(checkpoint)
    weights, _, _, _ = ckpt.read_full_state(checkpoint, with_optimizer=False, trust=trust)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out)
    return Path(out)


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
    add_trust_argument(a)
    b = sub.add_parser("from-hf", help="Hugging Face Llama / Mistral / Qwen2 directory -> skiptron checkpoint")
    b.add_argument("--hf", required=True, help="a Hugging Face model directory (config.json + weights)")
    b.add_argument("--out", required=True, help="the weights-only skiptron checkpoint directory to write")
    b.add_argument("--tp", type=int, default=1, help="check that the model splits over this TP size")
    b.add_argument("--pp", type=int, default=1, help="check that the model splits over this PP size")
    b.add_argument("--vocab-multiple", type=int, default=128, help="model.make_vocab_size_divisible_by")
    b.add_argument("--seq-len", type=int, help="model.seq_len of the written config (default: max_position_embeddings)")
    c = sub.add_parser("consolidate", help="checkpoint -> one fp32 state dict file")
    c.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    c.add_argument("--out", required=True, help="the state dict file to write (torch.save of whole tensors)")
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
            print(to_hf(args.checkpoint, args.out, args.trust_checkpoint))
        elif args.cmd == "from-hf":
            print(from_hf(args.hf, args.out, args.tp, args.pp, args.vocab_multiple, args.seq_len))
        elif args.cmd == "consolidate":
            print(consolidate(args.checkpoint, args.out, args.trust_checkpoint))
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
