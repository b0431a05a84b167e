"""Mask finetuning (training/masking.py): exact thresholded masks, straight-through gradients, the task file, TP."""
import pytest
import torch
import torch.nn.functional as F

from runs import BASE, train_run

MASK = ["launch.health_check=false", "finetune.method=mask", "finetune.keep=0.9", "finetune.init_scale=0.01", "optimizer.weight_decay=0.0"]


def _cfg(overrides=(), tp=1):
    from skiptron.training.config import load_config

    return load_config(None, BASE + [f"parallel.tp={tp}"] + list(overrides))


def _masked_model(overrides=()):
    """A TP=1 model in mask mode (inside a pool rank: groups exist)."""
    from skiptron.parallel import state
    from skiptron.training.masking import prepare_model
    from skiptron.training.model import GPT

    state.init_model_parallel(1, 1, torch.device("cpu"))
    cfg = _cfg(MASK + list(overrides))
    torch.manual_seed(0)
    model = GPT(cfg.model, 256, 1)
    prepare_model(model, cfg)
    return cfg, model


def _forward_and_grads():
    from skiptron.training.masking import is_masked

    cfg, model = _masked_model()
    layers = {n: m for n, m in model.named_modules() if is_masked(m)}
    assert sorted(layers) == sorted(f"blocks.{i}.{m}" for i in range(2)
                                    for m in ("attn.qkv", "attn.out", "mlp.gate_up", "mlp.down"))
    kept = torch.cat([m.mask().flatten() for m in layers.values()]).float().mean().item()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith("mask_scores") for n in trainable) and len(trainable) == len(layers)
    # the forward uses exactly W * (S >= threshold), for a column- and a row-parallel layer
    x = torch.randn(2, 5, 64)
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.down"):
        layer = layers[name]
        with torch.no_grad():
            layer.mask_scores.uniform_(-1, 1)
        inp = x if name.endswith("qkv") else torch.randn(2, 5, layer.weight.shape[1])
        out, _ = layer(inp)
        ref = F.linear(inp, layer.weight * (layer.mask_scores >= 0).float())
        assert torch.equal(out, ref), name
    # straight-through: dL/dS = dL/dW_eff * W; the frozen weights get no gradient
    tokens = torch.randint(0, 256, (2, 17))
    model(tokens).backward()
    layer = layers["blocks.0.mlp.gate_up"]
    w_eff = (layer.weight * layer.mask().float()).requires_grad_(True)
    ref_model_grad = layer.mask_scores.grad.clone()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith("mask_scores"))
    assert all(m.mask_scores.grad is not None and m.mask_scores.grad.abs().sum() > 0 for m in layers.values())
    # recompute dL/dW_eff with W_eff as a leaf: run the layer through a plain weight swap
    with torch.no_grad():
        layer.mask_scores.copy_((layer.mask().float() * 2 - 1))
    orig_cls = type(layer).__mro__[2]
    layer.__class__ = orig_cls
    weight = layer._parameters["weight"]
    layer._parameters["weight"] = w_eff
    model.zero_grad(set_to_none=True)
    model(tokens).backward()
    layer._parameters["weight"] = weight
    torch.testing.assert_close(ref_model_grad, w_eff.grad * weight, rtol=1e-5, atol=1e-7)
    return kept


def test_forward_uses_thresholded_mask_and_straight_through_grads(pools):
    kept, = pools(1).run(_forward_and_grads)
    assert abs(kept - 0.9) < 0.01


def _finetune_and_reload(data, run_dir, base_dir):
    """Base checkpoint -> mask finetuning (3 steps) -> task file; then base + task file in a fresh model (and merged
    into plain weights) give the finetuned logits exactly."""
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.masking import (Finetuning, load_task_file, merge_task, prepare_model, read_task_file,
                                           save_task_file)
    from skiptron.training.model import GPT
    from skiptron.training.trainer import Trainer, seed_everything
    from skiptron.tools.finetune import build_model
    from skiptron.training.weights import full_state_dict

    from skiptron.training.loader import read_manifest

    V = read_manifest(data)["vocab_size"]
    cfg0 = _cfg([f"data.path={data}", f"run.dir={run_dir}"])
    seed_everything(7)
    base = GPT(cfg0.model, V, 1)
    base_weights = full_state_dict(base)
    ckpt.write_weights_checkpoint(base_dir, cfg0, base_weights, V)
    cfg = _cfg(MASK + [f"data.path={data}", f"run.dir={run_dir}", f"finetune.base={base_dir}", "train.max_steps=3",
                       "finetune.train_head=true", "optimizer.lr=1e-2"])
    trainer = Trainer.setup(cfg, extension=Finetuning())
    trainer.run()
    model = trainer.engine.module
    path = save_task_file(model, run_dir / "task.safetensors", cfg)
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        finetuned = model.eval().logits(tokens)
    now = full_state_dict(model)
    frozen_unchanged = all(torch.equal(now[n], base_weights[n]) for n in base_weights if not n.startswith("head."))
    head_changed = not torch.equal(now["head.norm.weight"], base_weights["head.norm.weight"])
    task, meta = read_task_file(path)
    flips = sum(int((m != (base_weights[f"{n}.weight"] != 0)).sum()) for n, m in task["masks"].items())
    # fresh mask-mode model from the base checkpoint + task file
    fresh = GPT(cfg.model, V, 1)
    prepare_model(fresh, cfg)
    load_task_file(fresh, path)
    with torch.no_grad():
        reloaded = fresh.eval().logits(tokens)
        merged = build_model(cfg.model, V, merge_task(base_weights, task)).logits(tokens)
    size = path.stat().st_size
    n_params = sum(v.numel() for v in base_weights.values())
    return (torch.equal(finetuned, reloaded), torch.equal(finetuned, merged), frozen_unchanged, head_changed,
            flips, size, n_params)


def test_task_file_round_trip_is_exact(pools, tiny_data, tmp_path):
    same_reload, same_merged, frozen, head_changed, flips, size, n_params = pools(1).run(
        _finetune_and_reload, tiny_data, tmp_path / "ft", tmp_path / "base")[0]
    assert same_reload and same_merged
    assert frozen and head_changed
    assert flips > 0  # the masks moved from their initial 90%
    assert size < n_params * 4 / 10  # 1 bit per masked weight + the head, vs 32 bits per weight


def test_mask_tp2_equals_tp1_and_zero3(pool2, tiny_data, tmp_path):
    """Mask finetuning with TP=2 follows DP=2 (TP=1, ZeRO-3) step for step: same losses, same scores."""
    ov = MASK + ["train.max_steps=4", "optimizer.lr=1e-2"]
    tp1 = pool2.run(train_run, ov + ["parallel.tp=1", "zero.stage=3"], tiny_data, tmp_path / "tp1", finetune=True)
    tp2 = pool2.run(train_run, ov + ["parallel.tp=2", "zero.stage=1"], tiny_data, tmp_path / "tp2", finetune=True)
    torch.testing.assert_close(torch.tensor(tp2[0][0]), torch.tensor(tp1[0][0]), atol=1e-5, rtol=0)
    a, b = tp1[0][1], tp2[0][1]
    assert a.keys() == b.keys() and any(k.endswith("mask_scores") for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
    assert tp1[0][0][-1] < tp1[0][0][0]


# -- from a Hugging Face model ----------------------------------------------------------------------------------
def _mask_finetune_tp2(data, run_dir, base, tokens):
    """Mask finetuning (TP=2, 8 steps) from the converted checkpoint; rank 0 gets the per-step losses, the task
    file and the finetuned logits on `tokens`."""
    import torch.distributed as dist

    from skiptron.parallel.tensor_parallel import gather_tp
    from skiptron.training.masking import Finetuning, save_task_file
    from skiptron.training.metrics import read_metrics
    from skiptron.training.trainer import Trainer

    cfg = _cfg(MASK + [f"data.path={data}", f"run.dir={run_dir}", f"finetune.base={base}", "model.tie_embeddings=false",
                       "train.max_steps=8", "finetune.train_head=true", "optimizer.lr=1e-2"], tp=2)
    trainer = Trainer.setup(cfg, extension=Finetuning())
    trainer.run()
    model = trainer.engine.module
    path = save_task_file(model, run_dir / "task.safetensors", cfg, is_writer=dist.get_rank() == 0)
    with torch.no_grad():
        logits = gather_tp(model.eval().logits(tokens), dim=-1)[..., :trainer.vocab_size]
    dist.barrier()
    losses = [m["loss"] for m in read_metrics(run_dir)] if dist.get_rank() == 0 else None
    return losses, path, logits


def test_mask_finetuning_from_a_hugging_face_llama(pools, tiny_data, tmp_path):
    """LlamaForCausalLM (transformers, random init) -> skiptron-convert from-hf -> mask finetuning under TP=2 ->
    skiptron-finetune merge -> skiptron-convert to-hf: the loss falls; the exported Llama reproduces the finetuned
    logits; every block matrix is the original HF weight, zeroed where its mask dropped it; the embedding and the
    block norms are untouched (the head, final norm and output matrix, is trained: finetune.train_head)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from skiptron.tools.convert import main as convert
    from skiptron.tools.finetune import main as finetune

    hf_cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    base, merged, back = tmp_path / "base", tmp_path / "merged", tmp_path / "back"
    assert convert(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(base), "--vocab-multiple", "64"]) == 0
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    losses, task, finetuned = pools(2).run(_mask_finetune_tp2, tiny_data, tmp_path / "ft", base, tokens)[0]
    assert losses[-1] < losses[0] - 0.1, losses
    assert finetune(["merge", "--base", str(base), "--task", str(task), "--out", str(merged)]) == 0
    assert convert(["to-hf", "--checkpoint", str(merged), "--out", str(back)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, finetuned, atol=1e-5, rtol=0)
    before, after = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert before.keys() == after.keys()
    dropped = 0
    for name, w in before.items():
        if name in ("model.norm.weight", "lm_head.weight"):
            assert not torch.equal(after[name], w)  # finetune.train_head: the final norm and the untied output
        elif name.endswith("proj.weight"):
            kept = after[name] != 0
            assert torch.equal(after[name][kept], w[kept]), name
            dropped += int((~kept & (w != 0)).sum())
        else:
            assert torch.equal(after[name], w), name
    total = sum(w.numel() for n, w in before.items() if n.endswith("proj.weight"))
    assert 0.1 < dropped / total < 0.9, dropped / total  # the masks started at 90% kept and moved from there
