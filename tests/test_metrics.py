"""FLOPs accounting, MetricsLogger outputs and skiptron-plot."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from skiptron.tools.plot import main as plot_main
from skiptron.tools.plot import plot_runs
from skiptron.training.config import ModelConfig
from skiptron.training.flops import config_flops_per_token, model_flops_per_token, peak_flops
from skiptron.training.metrics import MetricsLogger, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- flops


def test_flops_tiny_config_by_hand():
    # h=4, f=8, 2 heads, 1 kv head (kv width 2), vocab 10, seq 3, 2 layers.
    qkvo = 2 * 4 * 4 + 2 * 2 * 4 * 2 + 2 * 4 * 4  # q, k+v, out = 96
    attention = 2 * 2 * 3 * 4  # 48
    mlp = 2 * 3 * 4 * 8  # 192
    head = 2 * 4 * 10  # 80
    expected = 3 * (2 * (qkvo + attention + mlp) + head)
    got = model_flops_per_token(2, 4, 8, 2, 10, 3, num_kv_heads=1)
    assert got == pytest.approx(expected)


def test_flops_exec_rate_scales_only_the_blocks():
    args = (2, 4, 8, 2, 10, 3)
    head = 3 * 2 * 4 * 10
    full = model_flops_per_token(*args)
    half = model_flops_per_token(*args, exec_rate=0.5)
    assert half - head == pytest.approx(0.5 * (full - head))
    assert model_flops_per_token(*args, exec_rate=0.0) == pytest.approx(head)


def test_flops_without_swiglu_has_two_mlp_matrices():
    diff = model_flops_per_token(1, 4, 8, 2, 10, 3) - model_flops_per_token(
        1, 4, 8, 2, 10, 3, swiglu=False
    )
    assert diff == pytest.approx(3 * 2 * 4 * 8)


def test_flops_close_to_6n_for_125m_model():
    # At this small width the attention term 12*L*h*s is not negligible: at
    # seq 512 it adds ~9% on top of 6N (at seq 2048 it would be ~35%).
    layers, h, f, heads, vocab, seq = 12, 768, 2048, 12, 32000, 512
    # Matmul parameters: attention 4h^2 + SwiGLU 3hf per layer, plus the LM head.
    n = layers * (4 * h * h + 3 * h * f) + h * vocab
    flops = model_flops_per_token(layers, h, f, heads, vocab, seq)
    assert flops == pytest.approx(6 * n + 12 * layers * h * seq)  # Chinchilla form
    assert flops == pytest.approx(6 * n, rel=0.1)  # rule of thumb


def test_config_flops_dense_matches_the_formula():
    m = ModelConfig(num_layers=3, hidden_size=64, num_heads=4, ffn_hidden_size=176, seq_len=32)
    assert config_flops_per_token(m, 512) == pytest.approx(model_flops_per_token(3, 64, 176, 4, 512, 32))


def test_config_flops_srupp_by_hand():
    # d=64, d'=16, seq 32, 4 layers with attention in layers 1 and 3 (attention_every=2), vocab 128.
    m = ModelConfig(block="srupp", num_layers=4, hidden_size=64, num_heads=4, seq_len=32,
                    srupp={"attention_every": 2, "proj_size": 16})
    plain = 2 * 64 * 16 + 2 * 16 * 3 * 64  # query d -> d', gates d' -> 3d
    attention = 2 * 16 * 32 + 2 * 2 * 32 * 16  # keys/values d' -> 2d', scores + values over 32 positions
    expected = 3 * (4 * plain + 2 * attention + 2 * 64 * 128)
    assert config_flops_per_token(m, 128) == pytest.approx(expected)


@pytest.mark.parametrize("granularity,kv,routed", [("layer", "active", {"q", "kv", "scores", "out", "mlp"}),
                                                   ("layer", "all", {"q", "scores", "out", "mlp"}),
                                                   ("mlp", "all", {"mlp"}),
                                                   ("attention", "all", {"q", "scores", "out"})])
def test_config_flops_routed_layers_count_their_routed_parts_at_their_rate(granularity, kv, routed):
    from skiptron.training.flops import transformer_layer_flops

    skip = {"enabled": True, "granularity": granularity, "kv": kv, "layers": [1]}
    m = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=176, seq_len=32, skip=skip)
    parts = transformer_layer_flops(64, 176, 4, 32)
    saved = 3 * 0.7 * sum(f for name, f in parts.items() if name in routed)  # layer 1 at rate 0.3
    saved -= 3 * 2 * 64  # its router, w . x for every token
    dense = config_flops_per_token(ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=176, seq_len=32), 256)
    assert config_flops_per_token(m, 256, {1: 0.3}) == pytest.approx(dense - saved)
    assert config_flops_per_token(m, 256, {0: 0.3}) == pytest.approx(
        config_flops_per_token(m, 256, {1: m.skip.target_rate}))  # layer 0 is not routed: its rate is ignored


def test_peak_flops_cpu():
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.bfloat16, None) is None
    assert peak_flops(cpu, torch.bfloat16, 1.5e12) == 1.5e12


def test_peak_flops_cuda_table(monkeypatch):
    cuda = torch.device("cuda", 0)
    names = {
        "NVIDIA A100-SXM4-80GB": (torch.bfloat16, 312e12),
        "NVIDIA H100 80GB HBM3": (torch.bfloat16, 989e12),
        "NVIDIA H100 PCIe": (torch.float16, 756e12),
        "NVIDIA A10G": (torch.bfloat16, 70e12),
        "NVIDIA L4": (torch.bfloat16, 121e12),
        "Tesla V100-SXM2-32GB": (torch.float16, 125e12),
        "Some Future GPU": (torch.bfloat16, None),
    }
    for name, (dtype, expected) in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d, n=name: n)
        assert peak_flops(cuda, dtype, None) == expected, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d: "NVIDIA A100-PCIE-40GB")
    assert peak_flops(cuda, torch.float32, None) == 156e12  # TF32
    assert peak_flops(cuda, torch.float32, None, tf32=False) is None  # no plain-fp32 peaks in the table
    assert peak_flops(cuda, torch.float64, None) is None


def test_mfu_peak_follows_the_precision(monkeypatch):
    """fp16 runs are measured against the fp16 peak, not the fp32 (TF32) one."""
    from skiptron.training.engine import PRECISION_DTYPES

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d: "Tesla V100-SXM2-32GB")
    cuda = torch.device("cuda", 0)
    assert peak_flops(cuda, PRECISION_DTYPES["fp16"], None) == 125e12
    assert peak_flops(cuda, PRECISION_DTYPES["fp32"], None) == 15.7e12


# ---------------------------------------------------------------- MetricsLogger


def _log_run(run_dir, steps=20, **kwargs):
    logger = MetricsLogger(run_dir, is_writer=True, total_steps=steps, **kwargs)
    for step in range(1, steps + 1):
        metrics = {
            "loss": 4.0 - step * 0.1,
            "lr": 3e-4,
            "tokens_per_s": 15200.0,
            "mfu": 0.031,
            "skip/exec_rate": 0.75,
        }
        logger.log(step, metrics)
        if step % 5 == 0:
            logger.log(step, {"val_loss": 4.0 - step * 0.05})
    return logger


def test_logger_writes_valid_jsonl_with_null_for_nan(tmp_path):
    logger = MetricsLogger(tmp_path, is_writer=True, total_steps=3, tensorboard=False)
    logger.log(1, {"loss": 2.5, "lr": torch.tensor(1e-3)})
    logger.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no NaN tokens
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert records[0] == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3)}
    assert records[1] == {"step": 2, "loss": None, "grad_norm": None}
    assert read_metrics(tmp_path) == records
    assert math.isnan(logger.summary()["final_loss"])


def test_logger_tensorboard_scalars(tmp_path):
    _log_run(tmp_path).close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("loss", "lr", "tokens_per_s", "mfu", "skip/exec_rate", "val_loss"):
        assert tag in scalars
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 21))
    assert loss[-1].value == pytest.approx(2.0)
    assert [e.step for e in acc.Scalars("val_loss")] == [5, 10, 15, 20]


def test_logger_plain_lines_and_summary(tmp_path, capsys):
    logger = _log_run(tmp_path, print_every=10, tensorboard=False)
    logger.log_text("hello [not markup]")
    logger.close()
    out = capsys.readouterr().out
    assert "step 10/20 | loss 3.000 | lr 3.0e-4 | 15.2k tok/s | mfu 3.1%" in out
    assert "step 20/20" in out and "step 5/20" not in out
    assert "hello [not markup]" in out
    assert "done: 20 steps" in out and "best val loss 3.000" in out
    summary = logger.summary()
    assert summary["steps"] == 20
    assert summary["final_loss"] == pytest.approx(2.0)
    assert summary["best_val_loss"] == pytest.approx(3.0)
    assert summary["mean_tokens_per_s"] == pytest.approx(15200.0)
    assert summary["mean_mfu"] == pytest.approx(0.031)
    assert summary["wall_time_s"] >= 0


def test_logger_appends_on_resume(tmp_path):
    _log_run(tmp_path, steps=5, tensorboard=False).close()
    logger = MetricsLogger(tmp_path, is_writer=True, total_steps=10, start_step=5, tensorboard=False)
    logger.log(6, {"loss": 1.0})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)][-2:] == [5, 6]


def test_resume_from_an_earlier_checkpoint_keeps_one_history(tmp_path):
    """A run logged steps 1-60, its checkpoint is from step 40: the resumed run's steps 41-60 replace the first
    attempt's in metrics.jsonl (which move to metrics-superseded.jsonl) and in TensorBoard."""
    first = MetricsLogger(tmp_path, is_writer=True, total_steps=60)
    for step in range(1, 61):
        first.log(step, {"loss": 1.0})
    first.close()
    resumed = MetricsLogger(tmp_path, is_writer=True, total_steps=60, start_step=40)
    for step in range(41, 61):
        resumed.log(step, {"loss": 2.0})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 61))
    assert [r["loss"] for r in lines] == [1.0] * 40 + [2.0] * 20
    superseded = [json.loads(line) for line in (tmp_path / "metrics-superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded] == list(range(41, 61)) and {r["loss"] for r in superseded} == {1.0}
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == list(range(1, 61))
    assert [e.value for e in events] == [1.0] * 40 + [2.0] * 20


def test_read_metrics_keeps_the_last_timeline_of_an_old_file(tmp_path):
    """A metrics.jsonl written before resumes truncated it (steps 41-60 twice) reads as one history."""
    rows = [{"step": s, "loss": 1.0} for s in range(1, 61)] + [{"step": s, "loss": 2.0} for s in range(41, 61)]
    rows.insert(5, {"step": 5, "val_loss": 3.0})  # two rows of one step are not a restart
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 6)) + [5] + list(range(6, 61))
    assert [r["loss"] for r in records if r["step"] > 40] == [2.0] * 20


def test_non_writer_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, is_writer=False, total_steps=10)
    logger.log(10, {"loss": 1.0})
    logger.log_text("rank 1 says hi")
    logger.close()
    assert not run_dir.exists()
    assert capsys.readouterr().out == ""


def test_read_metrics_ignores_truncated_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


# ---------------------------------------------------------------- plot


def test_plot_one_and_two_runs(tmp_path):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    _log_run(a, tensorboard=False).close()
    _log_run(b, steps=10, tensorboard=False).close()
    one = plot_runs([a], a / "curves.png", ["loss", "val_loss", "absent"])
    assert one.read_bytes().startswith(PNG_MAGIC)
    plot_main([str(a), str(b), "--metrics", "loss,val_loss,lr,tokens_per_s,mfu"])
    assert (a / "curves.png").read_bytes().startswith(PNG_MAGIC)
    out = tmp_path / "cmp" / "both.png"
    plot_main([str(a), str(b), "--out", str(out)])
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_plot_missing_metrics_file(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path], tmp_path / "x.png", ["loss"])
    with pytest.raises(SystemExit):
        plot_main([str(tmp_path)])
    assert "metrics.jsonl" in capsys.readouterr().err
