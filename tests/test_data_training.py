"""Training on blended and imported data: per-source metrics and checkpoint counts, exact resume, corrupt shards
visible in the run's metrics."""
import shutil

import torch

from runs import BASE


def _train(overrides, run_dir):
    """Train BASE + overrides (resume=auto) on this rank; rank 0 returns metrics, every rank its weights and
    the progress it ended with."""
    import torch.distributed as dist

    from skiptron.training.config import load_config
    from skiptron.training.metrics import read_metrics
    from skiptron.training.trainer import Trainer
    from skiptron.training.weights import full_state_dict

    cfg = load_config(None, BASE + [f"run.dir={run_dir}", "checkpoint.save_at_end=true"] + list(overrides))
    trainer = Trainer.setup(cfg)
    start = trainer.progress.step
    trainer.run()
    weights = full_state_dict(trainer.engine.module)
    dist.barrier()
    records = read_metrics(run_dir) if dist.get_rank() == 0 else None
    return {"records": records, "weights": weights, "start": start,
            "by_source": dict(trainer.progress.consumed_by_source)}


def _megatron_dir(tmp_path, tiny_data):
    """tiny_data's train tokens written as a Megatron .bin/.idx (the test writer of test_data.py), imported."""
    from test_data import write_megatron

    from skiptron.training.loader import TokenLoader, num_samples
    from skiptron.training.megatron_data import import_megatron

    n = num_samples(tiny_data, "train")
    rows = next(iter(TokenLoader(tiny_data, "train", n, shuffle=False))).numpy()
    docs = [list(row[::-1]) for row in rows]  # reversed text: a different source with the same tokenizer
    write_megatron(tmp_path / "rev_text_document", docs)
    out = tmp_path / "rev"
    import_megatron(tmp_path / "rev_text_document", out, tiny_data / "tokenizer.json", seq_len=32,
                    samples_per_shard=16, val_fraction=0.05)
    return out


def test_blend_with_megatron_source_trains_and_resumes_exactly(pool2, tiny_data, tmp_path):
    """A blend of a prepared dir (one of its shards truncated) and an imported Megatron .bin/.idx: per-source
    consumed counts in the metrics and the checkpoint, val loss per source and of the mixture, the skipped shard
    counted in metrics.jsonl; resuming the step-3 checkpoint gives steps 4-6 bitwise; other weights are refused."""
    import json

    rev = _megatron_dir(tmp_path, tiny_data)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][-1]["name"]
    (data / victim).write_bytes((data / victim).read_bytes()[:1000])
    ov = [f"data.blend=[[0.75, {data}], [0.25, {rev}]]", "eval.interval=3", "train.max_steps=6",
          "checkpoint.interval=3", "checkpoint.keep=0", "launch.health_check=false"]
    full = pool2.run(_train, ov, tmp_path / "full")
    step3 = tmp_path / "full/checkpoints/step00000003"
    resumed = pool2.run(_train, ov + [f"resume={step3}"], tmp_path / "resumed")
    assert resumed[0]["start"] == 3
    records = full[0]["records"]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [(r["data/consumed/data"], r["data/consumed/rev"]) for r in records] == [(3 * s, s) for s in range(1, 7)]
    assert full[0]["by_source"] == {"data": 18, "rev": 6}
    assert json.loads((step3 / "trainer.json").read_text())["consumed_by_source"] == {"data": 9, "rev": 3}
    for r in (records[2], records[5]):
        assert {"val_loss", "val_loss/data", "val_loss/rev"} <= r.keys()
        assert r["val_loss/data"] != r["val_loss/rev"]
    assert [r["data/corrupt_shards"] for r in records] == [1] * 6
    assert [r["loss"] for r in resumed[0]["records"]] == [r["loss"] for r in records[3:]]
    assert resumed[0]["records"][-1]["val_loss"] == records[-1]["val_loss"]
    for rank in range(2):
        for name, value in full[rank]["weights"].items():
            assert torch.equal(resumed[rank]["weights"][name], value), name
    other = [f"data.blend=[[0.5, {data}], [0.5, {rev}]]"] + ov[1:] + [f"resume={step3}"]
    try:
        pool2.run(_train, other, tmp_path / "other")
    except AssertionError as err:
        assert "data.blend: the checkpoint consumed" in str(err)
    else:
        raise AssertionError("a resume with other blend weights was accepted")
