"""skiptron-convert with the real `transformers` and `lm-eval`: logits parity, lossless round trip, evaluation."""
import json
import math
from pathlib import Path

import pytest
import torch

from runs import BASE

transformers = pytest.importorskip("transformers")

DOCS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n", "class A:\n    pass\n"]


def _train_and_score(data, run_dir, tokens, docs):
    """Train TP=2 briefly and save; return skiptron's logits on `tokens` and its summed NLL of each doc (after EOT)."""
    import torch.nn.functional as F

    from skiptron.parallel.tensor_parallel import gather_tp
    from skiptron.training.config import load_config
    from skiptron.training.tokenizer import eot_id, load_tokenizer
    from skiptron.training.trainer import Trainer

    cfg = load_config(None, BASE + [f"data.path={data}", f"run.dir={run_dir}", "parallel.tp=2",
                                    "train.max_steps=6", "checkpoint.save_at_end=true"])
    trainer = Trainer.setup(cfg)
    trainer.run()
    model, vocab = trainer.engine.module, trainer.vocab_size
    tok = load_tokenizer(Path(data) / "tokenizer.json")
    with torch.no_grad():
        logits = gather_tp(model.logits(tokens), dim=-1)[..., :vocab]
        nll = []
        for doc in docs:
            ids = [eot_id(tok)] + tok.encode(doc).ids
            out = gather_tp(model.logits(torch.tensor([ids[:-1]])), dim=-1)[0, :, :vocab]
            nll.append(F.cross_entropy(out, torch.tensor(ids[1:]), reduction="sum").item())
    return logits, nll


@pytest.fixture(scope="module")
def trained(pools, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    tokens = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    (logits, nll), _ = pools(2).run(_train_and_score, tiny_data, run, tokens, DOCS)
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


def test_lm_eval_reports_the_models_own_numbers(trained, tmp_path):
    """lm-eval on a local loglikelihood_rolling task: bits per byte == skiptron's NLL of the same text."""
    from skiptron.tools.convert import main

    hf = tmp_path / "hf"
    main(["to-hf", "--checkpoint", str(trained["checkpoint"]), "--out", str(hf)])
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
    reported = json.loads(out.read_text())["skiptron_local"]["bits_per_byte,none"]
    expected = sum(trained["nll"]) / sum(len(d.encode()) for d in DOCS) / math.log(2)
    assert reported == pytest.approx(expected, rel=1e-4)


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

    cfg = load_config(None, BASE + [f"data.path={data}", f"resume={ckpt_dir}"] + overrides)
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


def test_from_hf_refuses_gqa(tmp_path):
    from skiptron.tools.convert import main

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "gqa")
    with pytest.raises(SystemExit, match="grouped-query attention"):
        main(["from-hf", "--hf", str(tmp_path / "gqa"), "--out", str(tmp_path / "x")])
