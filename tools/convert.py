"""`skiptron-convert`: checkpoints to and from Hugging Face, consolidation, and lm-eval evaluation.

    skiptron-convert to-hf --checkpoint DIR --out DIR           sharded checkpoint -> Hugging Face model directory
    skiptron-convert from-hf --hf DIR --out DIR [--tp N --pp N]  Llama directory -> skiptron (weights-only) checkpoint
    skiptron-convert consolidate --checkpoint DIR --out FILE     ZeRO/TP shards -> one fp32 state dict (torch.save)
    skiptron-convert eval --hf DIR --tasks T[,T] [--include-path DIR] [--out FILE]   lm-eval on a converted model

A skiptron dense block is exactly a Llama decoder layer (pre-norm RMSNorm, rotate-half rotary, SwiGLU, no biases),
so the mapping is a renaming plus splitting the fused QKV and gate/up weights; the padded vocabulary rows are dropped
(their logits are -inf in skiptron). `from-hf` writes a layout-independent checkpoint (whole fp32 weights), which
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


def to_hf_state(weights: dict[str, torch.Tensor], model_cfg, vocab_size: int) -> dict[str, torch.Tensor]:
    """skiptron whole weights -> Llama names; fused QKV / gate-up split, vocabulary padding dropped."""
    out = {"model.embed_tokens.weight": weights["embedding.tokens.weight"][:vocab_size],
           "model.norm.weight": weights["head.norm.weight"]}
    if not model_cfg.tie_embeddings:
        out["lm_head.weight"] = weights["head.output.weight"][:vocab_size]
    for i in range(model_cfg.num_layers):
        for src, dst in _layer_map(i).items():
            out[dst] = weights[src]
        q, k, v = weights[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)
        out.update({f"model.layers.{i}.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))})
        gate, up = weights[f"blocks.{i}.mlp.gate_up.weight"].chunk(2, dim=0)
        out[f"model.layers.{i}.mlp.gate_proj.weight"], out[f"model.layers.{i}.mlp.up_proj.weight"] = gate, up
    return {k: v.float().contiguous() for k, v in out.items()}


def from_hf_state(hf: dict[str, torch.Tensor], model_cfg, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Llama names -> skiptron whole weights (the inverse of `to_hf_state`), vocabulary padded with zeros."""

    def pad(t):
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])]) if t.shape[0] < padded_vocab else t

    out = {"embedding.tokens.weight": pad(hf["model.embed_tokens.weight"]), "head.norm.weight": hf["model.norm.weight"]}
    if not model_cfg.tie_embeddings:
        out["head.output.weight"] = pad(hf["lm_head.weight"])
    for i in range(model_cfg.num_layers):
        for src, dst in _layer_map(i).items():
            out[src] = hf[dst]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [hf[f"model.layers.{i}.self_attn.{n}_proj.weight"] for n in "qkv"])
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


def is_llama(model_cfg) -> bool:
    """Whether a model is exactly a Llama: dense transformer blocks, no biases, an ordinary token embedding."""
    m = model_cfg
    return m.block == "transformer" and not m.skip.enabled and not m.bias and m.embedding_rank is None


def _llama_config(m, vocab: int, eot_id: int | None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads, hidden_act="silu",
        max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, initializer_range=m.init_std,
        bos_token_id=eot_id, eos_token_id=eot_id, torch_dtype="float32", architectures=["LlamaForCausalLM"])


def _skiptron_config(m, vocab: int, eot_id: int | None):
    from skiptron.training.hf.configuration_skiptron import SkiptronConfig

    return SkiptronConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        intermediate_size=m.ffn_size, max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, initializer_range=m.init_std, bias=m.bias, tie_embeddings=m.tie_embeddings,
        embedding_rank=m.embedding_rank, block=m.block,
        routed_layers=m.skip.routed_layers(m.num_layers), skip_granularity=m.skip.granularity, skip_kv=m.skip.kv,
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
    for i in model_cfg.skip.routed_layers(model_cfg.num_layers):
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
    LlamaForCausalLM when `is_llama`, else SkiptronForCausalLM with its modeling code (trust_remote_code)."""
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
    if m.skip.enabled and m.skip.mode == "capacity":
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
    llama = is_llama(m)
    if llama:
        hf_cfg, state = _llama_config(m, vocab, eot_id), to_hf_state(weights, m, vocab)
    else:
        hf_cfg = _skiptron_config(m, vocab, eot_id)
        state = skiptron_hf_state(weights, extras.get("buffers", {}), m, vocab)
        _check_state(path, hf_cfg, state)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(out)
    if not llama:
        for name in HF_CODE:
            shutil.copyfile(Path(hf.__file__).parent / name, out / name)
    # The Skiptron model keeps no KV cache: generation re-runs the sequence (see modeling_skiptron.py).
    GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, use_cache=llama).save_pretrained(out)
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


def from_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int = 1, pp: int = 1,
            vocab_multiple: int = 128) -> Path:
    """A Llama-architecture HF directory -> a skiptron weights-only checkpoint (loads under any layout)."""
    hf_dir = Path(hf_dir)
    c, state = _read_hf(hf_dir)
    problems = []
    if c.get("model_type") != "llama":
        problems.append(f"model_type is {c.get('model_type')!r}, not 'llama'")
    if c.get("num_key_value_heads", c["num_attention_heads"]) != c["num_attention_heads"]:
        problems.append("grouped-query attention (num_key_value_heads != num_attention_heads) is not supported")
    if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias"):
        problems.append("only silu activations without biases are supported")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r} is not supported")
    if problems:
        raise SystemExit(f"skiptron-convert: {hf_dir / 'config.json'}: " + "; ".join(problems))
    vocab = c["vocab_size"]
    tied = c.get("tie_word_embeddings", False) or "lm_head.weight" not in state
    try:
        cfg = build_config({
            "model": {"num_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
                      "num_heads": c["num_attention_heads"], "ffn_hidden_size": c["intermediate_size"],
                      "seq_len": c.get("max_position_embeddings", 2048), "vocab_size": vocab,
                      "make_vocab_size_divisible_by": vocab_multiple, "tie_embeddings": tied,
                      "norm_eps": c.get("rms_norm_eps", 1e-5),
                      "rope_theta": rope.get("rope_theta", c.get("rope_theta", 10000.0))},
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
    b = sub.add_parser("from-hf", help="Hugging Face Llama directory -> skiptron checkpoint")
    b.add_argument("--hf", required=True, help="a Hugging Face model directory (config.json + weights)")
    b.add_argument("--out", required=True, help="the weights-only skiptron checkpoint directory to write")
    b.add_argument("--tp", type=int, default=1, help="check that the model splits over this TP size")
    b.add_argument("--pp", type=int, default=1, help="check that the model splits over this PP size")
    b.add_argument("--vocab-multiple", type=int, default=128, help="model.make_vocab_size_divisible_by")
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
            print(from_hf(args.hf, args.out, args.tp, args.pp, args.vocab_multiple))
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
