"""Continued pretraining of the Llama family with the real `transformers`: Llama (GQA, llama3 rope scaling),
Mistral (multi-query, a sliding window covering the sequence) and Qwen2 (Q/K/V biases) built at random, saved,
imported, checked against transformers' logits at TP=1 and TP=2, trained 3 steps under TP=2 x DP=2, exported and
loaded back by transformers as the same class with skiptron's logits."""
import pytest
import torch

from runs import BASE

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILIES = {
    "llama-gqa-llama3-rope-untied": ("LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral-mqa-window-tied": ("MistralForCausalLM", dict(num_key_value_heads=1, head_dim=16, sliding_window=4096,
                                                            tie_word_embeddings=True)),
    "qwen2-gqa-qkv-bias-tied": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}
TOKENS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))


def _save_random(cls_name: str, kwargs: dict, path):
    cls = getattr(transformers, cls_name)
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**COMMON, **kwargs)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # transformers starts biases at 0: make them count
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    with torch.no_grad():
        return model(TOKENS).logits


def _tp1_logits(ckpt_dir, tokens):
    """TP=1: the whole imported weights loaded straight into a GPT."""
    from skiptron.parallel.state import init_model_parallel
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import load_config
    from skiptron.training.model import GPT

    init_model_parallel(1, 1, torch.device("cpu"))
    cfg = load_config(ckpt_dir / "config.yaml")
    weights, *_ = ckpt.read_full_state(ckpt_dir, with_optimizer=False)
    model = GPT(cfg.model, cfg.model.vocab_size, 1)
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model.logits(tokens)[..., :cfg.model.vocab_size]


def _continue_pretraining(data, ckpt_dir, run_dir, tokens):
    """Resume the imported checkpoint under TP=2 x DP=2: logits at the start, 3 training steps, a save, logits."""
    from skiptron.parallel.tensor_parallel import gather_tp
    from skiptron.training.config import load_config
    from skiptron.training.trainer import Trainer

    train = [o for o in BASE if o.startswith(("train.", "optimizer.", "eval.", "logging.", "data."))]
    cfg = load_config(ckpt_dir / "config.yaml", train + [
        f"data.path={data}", f"run.dir={run_dir}", f"resume={ckpt_dir}", "parallel.tp=2", "model.seq_len=32",
        "train.max_steps=3", "train.micro_batch_size=1", "checkpoint.save_at_end=true"])
    trainer = Trainer.setup(cfg)
    module, vocab = trainer.engine.module, trainer.vocab_size
    with torch.no_grad():
        before = gather_tp(module.logits(tokens), dim=-1)[..., :vocab]
    trainer.run()
    with torch.no_grad():
        after = gather_tp(module.logits(tokens), dim=-1)[..., :vocab]
    return before, after


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_train_export(pools, tiny_data, tmp_path, family):
    from skiptron.tools.convert import main
    from skiptron.training import checkpoint as ckpt

    cls_name, kwargs = FAMILIES[family]
    src, sk, run, back = (tmp_path / n for n in ("src", "skiptron", "run", "back"))
    ref = _save_random(cls_name, kwargs, src)
    assert main(["from-hf", "--hf", str(src), "--out", str(sk), "--tp", "2", "--vocab-multiple", "64"]) == 0
    torch.testing.assert_close(pools(2).run(_tp1_logits, sk, TOKENS)[0], ref, atol=1e-4, rtol=0)
    before, after = pools(4).run(_continue_pretraining, tiny_data, sk, run, TOKENS)[0]
    torch.testing.assert_close(before, ref, atol=1e-4, rtol=0)  # TP=2
    assert (after - before).abs().max() > 1e-3  # the 3 steps trained it
    assert main(["to-hf", "--checkpoint", str(ckpt.find_resumable(run / "checkpoints", log=None)),
                 "--out", str(back)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    assert type(model).__name__ == cls_name
    assert model.config.num_key_value_heads == kwargs["num_key_value_heads"]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, after, atol=1e-4, rtol=0)


def test_refused_fields_name_themselves(tmp_path, capsys):
    from skiptron.tools.convert import main

    cases = {
        "window": ("MistralForCausalLM", dict(sliding_window=16, head_dim=16), "sliding_window 16 < model.seq_len 64"),
        "yarn": ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
                 "rope_type 'yarn'"),
        "attention-bias": ("LlamaForCausalLM", dict(attention_bias=True), "attention_bias true"),
        "head-dim": ("MistralForCausalLM", dict(head_dim=32), "head_dim 32 differs"),
    }
    for name, (cls_name, kwargs, message) in cases.items():
        config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**COMMON, num_key_value_heads=2,
                                                                                **kwargs)
        getattr(transformers, cls_name)(config).save_pretrained(tmp_path / name)
        with pytest.raises(SystemExit, match=message):
            main(["from-hf", "--hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}-out")])
    # the same window with a short enough training sequence is the same model: imported, with a note
    assert main(["from-hf", "--hf", str(tmp_path / "window"), "--out", str(tmp_path / "ok"), "--seq-len", "16"]) == 0
    assert "sliding_window 16 >= model.seq_len 16" in capsys.readouterr().err
