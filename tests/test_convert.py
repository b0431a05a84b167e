"""skiptron-convert with the real `transformers` and `lm-eval`: logits parity, lossless round trip, evaluation."""
import json
import math
from pathlib import Path

import pytest
import torch

from runs import BASE

transformers = pytest.importorskip("transformers")

DOCS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n", "class A:\n    pass\n"]


def _train_and_score(data, run_dir, tokens, docs, overrides=()):
    """Train TP=2 briefly and save; return skiptron's logits on `tokens`, its routed layers' execution rates on them
    and its summed NLL of each doc (after EOT)."""
    import torch.nn.functional as F

    from skiptron.parallel.tensor_parallel import gather_tp
    from skiptron.training.config import load_config
    from skiptron.training.tokenizer import eot_id, load_tokenizer
    from skiptron.training.trainer import Trainer

    cfg = load_config(None, BASE + [f"data.path={data}", f"run.dir={run_dir}", "parallel.tp=2",
                                    "train.max_steps=6", "checkpoint.save_at_end=true"] + list(overrides))
    trainer = Trainer.setup(cfg)
    trainer.run()
    model, vocab = trainer.engine.module.eval(), trainer.vocab_size  # inference decisions (gumbel: greedy)
    tok = load_tokenizer(Path(data) / "tokenizer.json")
    with torch.no_grad():
        logits, routing = model.logits_and_routing(tokens)
        logits = gather_tp(logits, dim=-1)[..., :vocab]
        rates = {i: r.exec_rate for i, r in routing.items()}
        nll = []
        for doc in docs:
            ids = [eot_id(tok)] + tok.encode(doc).ids
            out = gather_tp(model.logits(torch.tensor([ids[:-1]])), dim=-1)[0, :, :vocab]
            nll.append(F.cross_entropy(out, torch.tensor(ids[1:]), reduction="sum").item())
    return logits, rates, nll


@pytest.fixture(scope="module")
def trained(pools, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    tokens = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    (logits, _, nll), _ = pools(2).run(_train_and_score, tiny_data, run, tokens, DOCS)
    from skiptron.training import checkpoint as ckpt

    return {"checkpoint": ckpt.find_resumable(run / "checkpoints", log=None), "tokens": tokens, "logits": logits,
            "nll": nll}


def test_to_hf_logits_match(trained, tmp_path):
    from skiptron.tools.convert import main

    out = tmp_path / "hf"
    assert main(["to-hf", "--checkpoint", str(trained["checkpoint"]), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        hf_logits = model(trained["tokens"]).logits
    torch.testing.assert_close(hf_logits, trained["logits"], atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok(DOCS[0])["input_ids"]) == DOCS[0]


SKIP = ["model.skip.enabled=true", "model.skip.target_rate=0.5"]
CUSTOM = {  # one tiny model per code path of modeling_skiptron.py
    "layer-kv-all": SKIP,
    "mlp-bias-untied": SKIP + ["model.skip.granularity=mlp", "model.bias=true", "model.tie_embeddings=false"],
    "layer-kv-active": SKIP + ["model.skip.kv=active"],
    "attention-kv-active-first-layer": SKIP + ["model.skip.granularity=attention", "model.skip.kv=active",
                                               "model.skip.layers=[0]"],
    "srupp-attention-every-2": ["model.block=srupp", "model.srupp.attention_every=2", "model.num_layers=3"],
    "srupp-routed": SKIP + ["model.block=srupp", "model.srupp.attention_every=2", "model.num_layers=3",
                            "model.skip.kv=active", "model.skip.layers=[1,2]"],
    "factorized-embedding-tied": ["model.embedding_rank=8"],
    "gqa-mqa-llama3-rope-routed": SKIP + ["model.skip.kv=active", "model.num_kv_heads=1", "model.rope_theta=500000",
                                          "model.rope_scaling.original_max_position_embeddings=16"],
    "router-gumbel": SKIP + ["model.skip.router=gumbel"],  # greedy decisions
    "router-mod": SKIP + ["model.skip.router=mod", "model.skip.layers=all"],  # the predictor's decisions, kv active
}


@pytest.mark.parametrize("case", list(CUSTOM))
def test_to_hf_custom_code_logits_match(pools, tiny_data, tmp_path, case):
    """Routed, SRU++, biased and factorized-embedding models export with their modeling code; transformers loads it
    (trust_remote_code) and its logits are skiptron's. Routing is live: each routed layer executes some tokens and
    skips others, exactly as many as in skiptron."""
    from skiptron.tools.convert import main
    from skiptron.training import checkpoint as ckpt

    run, out = tmp_path / "run", tmp_path / "hf"
    tokens = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    (logits, rates, _), _ = pools(2).run(_train_and_score, tiny_data, run, tokens, [], CUSTOM[case])
    assert main(["to-hf", "--checkpoint", str(ckpt.find_resumable(run / "checkpoints", log=None)),
                 "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "modeling_skiptron.py",
            "configuration_skiptron.py"} <= {p.name for p in out.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(model).__name__ == "SkiptronForCausalLM"
    decisions = {}
    for i, block in enumerate(model.blocks):
        if hasattr(block, "router"):
            block.router.register_forward_hook(lambda m, args, out, i=i: decisions.__setitem__(i, out[0]))
    with torch.no_grad():
        hf_logits = model(tokens).logits
    torch.testing.assert_close(hf_logits, logits, atol=1e-4, rtol=0)
    assert decisions.keys() == rates.keys()
    for i, active in decisions.items():
        assert 0 < active.float().mean() < 1, f"layer {i}: routing is not mixed on these tokens"
        assert active.float().mean().item() == pytest.approx(rates[i], abs=1e-6)
    greedy = model.generate(tokens[:1, :6], max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        steps = model(greedy).logits[0, 5:-1].argmax(-1)
    assert torch.equal(greedy[0, 6:], steps)


def test_to_hf_refuses_capacity_routing(tmp_path):
    from skiptron.tools.convert import main
    from skiptron.training import checkpoint as ckpt
    from skiptron.training.config import load_config

    cfg = load_config(None, BASE + SKIP + ["model.skip.mode=capacity"])
    ckpt.write_weights_checkpoint(tmp_path / "ckpt", cfg, {}, 257)
    with pytest.raises(SystemExit, match="model.skip.mode=capacity"):
        main(["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])


def _lm_eval_bits_per_byte(hf: Path, tmp_path: Path) -> float:
    """`skiptron-convert eval` of `hf` on a local loglikelihood_rolling task over DOCS."""
    from skiptron.tools.convert import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(f"""task: skiptron_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""")
    out = tmp_path / "results.json"
    assert main(["eval", "--hf", str(hf), "--tasks", "skiptron_local", "--include-path", str(tasks),
                 "--out", str(out)]) == 0
    return json.loads(out.read_text())["skiptron_local"]["bits_per_byte,none"]


def _bits_per_byte(nll: list[float]) -> float:
    return sum(nll) / sum(len(d.encode()) for d in DOCS) / math.log(2)


def test_lm_eval_reports_the_models_own_numbers(trained, tmp_path):
    """lm-eval on a local loglikelihood_rolling task: bits per byte == skiptron's NLL of the same text."""
    from skiptron.tools.convert import main

    hf = tmp_path / "hf"
    main(["to-hf", "--checkpoint", str(trained["checkpoint"]), "--out", str(hf)])
    assert _lm_eval_bits_per_byte(hf, tmp_path) == pytest.approx(_bits_per_byte(trained["nll"]), rel=1e-4)


def test_lm_eval_runs_custom_code(pools, tiny_data, tmp_path):
    """lm-eval loads a routed export with its modeling code and reports skiptron's own NLL."""
    from skiptron.tools.convert import main
    from skiptron.training import checkpoint as ckpt

    run, hf = tmp_path / "run", tmp_path / "hf"
    tokens = torch.zeros(1, 4, dtype=torch.long)
    (_, _, nll), _ = pools(2).run(_train_and_score, tiny_data, run, tokens, DOCS, CUSTOM["layer-kv-active"])
    main(["to-hf", "--checkpoint", str(ckpt.find_resumable(run / "checkpoints", log=None)), "--out", str(hf)])
    assert _lm_eval_bits_per_byte(hf, tmp_path) == pytest.approx(_bits_per_byte(nll), rel=1e-4)


def test_consolidate_cli(trained, tmp_path):
    from skiptron.tools.convert import main

    out = tmp_path / "model.pt"
    assert main(["consolidate", "--checkpoint", str(trained["checkpoint"]), "--out", str(out)]) == 0
    weights = torch.load(out)
    assert weights["blocks.0.attn.qkv.weight"].shape == (192, 64)  # whole TP=1 tensor from two TP shards


def _logits_from_resumed(data, ckpt_dir, tokens, overrides):
    from skiptron.parallel.tensor_parallel import gather_tp
    from skiptron.training.config import load_config
    from skiptron.training.trainer import Trainer

    import tempfile

    run_dir = tempfile.mkdtemp(prefix="resumed-")  # a run directory of its own: each setup holds its run.lock
    cfg = load_config(None, BASE + [f"data.path={data}", f"resume={ckpt_dir}", f"run.dir={run_dir}"] + overrides)
    trainer = Trainer.setup(cfg)
    with torch.no_grad():
        return gather_tp(trainer.engine.module.logits(tokens), dim=-1)[..., :trainer.vocab_size]


def test_from_hf_round_trip_and_any_layout(pools, tiny_data, tmp_path):
    """HF -> skiptron -> HF is lossless, and the skiptron checkpoint loads under TP=2 with the HF logits."""
    from safetensors.torch import load_file

    from skiptron.tools.convert import main

    hf_cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    src = tmp_path / "src"
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.save_pretrained(src)
    sk, back = tmp_path / "skiptron", tmp_path / "back"
    assert main(["from-hf", "--hf", str(src), "--out", str(sk), "--tp", "2", "--vocab-multiple", "64"]) == 0
    assert main(["to-hf", "--checkpoint", str(sk), "--out", str(back)]) == 0
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens).logits
    got = pools(2).run(_logits_from_resumed, tiny_data, sk, tokens,
                       ["parallel.tp=2", "model.tie_embeddings=false", "zero.stage=2"])
    torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=0)


def test_sharded_streaming_import_and_export(tmp_path):
    """from-hf reads a sharded HF model one tensor at a time (safe_open; never its whole state dict), to-hf and
    consolidate with a small --max-shard-size write several shards plus the index transformers writes, and
    transformers loads the export with the source model's logits exactly."""
    from safetensors.torch import load_file

    from skiptron.tools.convert import HFWeights, main, skiptron_tensors
    from skiptron.training.config import load_config
    from skiptron.training.memory import AllocationMeter

    hf_cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.save_pretrained(tmp_path / "src", max_shard_size="30KB")
    sk, back, whole = tmp_path / "skiptron", tmp_path / "back", tmp_path / "whole"
    largest = 2 * 192 * 64 * 4  # the fused gate_up weight, skiptron's largest parameter
    with AllocationMeter() as meter:  # the whole import: read, convert, write the weights checkpoint
        assert main(["from-hf", "--hf", str(tmp_path / "src"), "--out", str(sk), "--vocab-multiple", "64"]) == 0
    # a fused parameter and its parts, nothing more (the model is 6 x that)
    assert meter.peak <= 2 * largest, (meter.peak, largest)
    cfg = load_config(sk / "config.yaml")
    whole_model = sum(t.numel() * 4 for _, t in skiptron_tensors(HFWeights(tmp_path / "src").meta, cfg.model,
                                                                  cfg.model.padded_vocab_size(257)))
    assert whole_model > 5 * largest

    assert main(["to-hf", "--checkpoint", str(sk), "--out", str(back), "--max-shard-size", "40KB"]) == 0
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((back / s).is_file() for s in shards) and not (back / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)

    assert main(["consolidate", "--checkpoint", str(sk), "--out", str(whole), "--max-shard-size", "40KB"]) == 0
    consolidated = {}
    for name in json.loads((whole / "model.safetensors.index.json").read_text())["weight_map"].values():
        consolidated.update(load_file(str(whole / name)))
    assert torch.equal(consolidated["blocks.0.attn.q.weight"], model.model.layers[0].self_attn.q_proj.weight)
