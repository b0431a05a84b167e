"""Grouped-query attention (model.num_kv_heads): the same function under every TP layout (KV heads split over TP
ranks, or replicated on them when there are fewer KV heads than ranks), dense and routed, with sequence and pipeline
parallelism; exact resume, resharding and cached decoding."""
import pytest
import torch

from runs import train_run

VOCAB = 50
VARIANTS = {  # name -> (ModelConfig overrides, sequence parallel)
    "dense": ({}, False),
    "dense-sp": ({}, True),
    "routed-layer-kv-all": ({"skip": {"enabled": True}}, False),
    "routed-attention-kv-active": ({"skip": {"enabled": True, "granularity": "attention", "kv": "active"}}, False),
    "routed-mlp-qkv-bias": ({"skip": {"enabled": True, "granularity": "mlp"}, "qkv_bias": True}, False),
}


def _model(tp, kv_heads, overrides, sequence_parallel=False):
    from skiptron.parallel.state import init_model_parallel
    from skiptron.training.config import ModelConfig
    from skiptron.training.model import GPT

    init_model_parallel(tp, 1, torch.device("cpu"))
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=kv_heads, ffn_hidden_size=96,
                      seq_len=16, make_vocab_size_divisible_by=8, **overrides)
    return GPT(cfg, VOCAB, tp, balance=None, sequence_parallel=sequence_parallel)


def _logits_and_grads(tp, kv_heads):
    """Per variant: whole logits, loss and whole gradients; and whether the replicated K/V weights (and their
    gradients) are identical on the TP ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from skiptron.parallel.tensor_parallel import full_tensor, gather_tp

    out = {}
    for name, (overrides, sequence_parallel) in VARIANTS.items():
        model = _model(tp, kv_heads, overrides, sequence_parallel and tp > 1)
        tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
        logits = gather_tp(model.logits(tokens[:, :-1]).detach(), dim=-1)[..., :VOCAB]
        loss = model(tokens)
        loss.backward()
        grads = {n: full_tensor(p, p.grad) for n, p in model.named_parameters()}
        replicas = []
        for block in model.blocks:
            attn = getattr(block, "block", block).attn
            if attn.kv.replicated:
                for t in (attn.kv.weight.detach(), attn.kv.weight.grad):
                    parts = [torch.empty_like(t) for _ in range(tp)]
                    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
                    replicas.append(all(torch.equal(p, parts[0]) for p in parts))
        out[name] = (logits, loss.detach(), grads, replicas)
    return out


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa-replicated-at-tp2", "gqa-split-at-tp2"])
def test_gqa_tp2_equals_tp1(pool2, kv_heads):
    ref = pool2.run(_logits_and_grads, 1, kv_heads)[0]
    for rank_out in pool2.run(_logits_and_grads, 2, kv_heads):
        for name, (logits, loss, grads, replicas) in rank_out.items():
            ref_logits, ref_loss, ref_grads, _ = ref[name]
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0, msg=name)
            assert grads.keys() == ref_grads.keys()
            assert f"blocks.0{'.block' if 'routed' in name else ''}.attn.kv.weight" in grads
            for n, g in grads.items():
                torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-4, msg=f"{name}: {n}")
            # kv_heads=1 < tp=2: every rank holds the one KV head, weights and summed gradients identical
            assert replicas == ([True] * 4 if kv_heads == 1 else []), (name, replicas)
    shapes = {n: tuple(g.shape) for n, g in ref["dense"][2].items()}
    assert shapes["blocks.0.attn.q.weight"] == (64, 64)
    assert shapes["blocks.0.attn.kv.weight"] == (2 * kv_heads * 16, 64)


def _decode_vs_full(kv_heads, overrides):
    from skiptron.parallel.tensor_parallel import gather_tp
    from skiptron.training.model import IncrementalDecoder

    model = _model(2, kv_heads, overrides)
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = gather_tp(model.logits(tokens), dim=-1)
        decoder = IncrementalDecoder(model)
        parts = [decoder(tokens[:, :5])] + [decoder(tokens[:, i:i + 1]) for i in range(5, 24)]
        cache = decoder.states[0]
    return full[..., :VOCAB], gather_tp(torch.cat(parts, dim=1), dim=-1)[..., :VOCAB], tuple(cache.k.shape)


@pytest.mark.parametrize("kv_heads,routed", [(1, False), (2, True)], ids=["mqa-dense", "gqa-routed-kv-active"])
def test_gqa_decoding_matches_the_full_forward(pool2, kv_heads, routed):
    """Cached decoding (TP=2) past model.seq_len (24 tokens, seq_len 16) equals the whole-sequence forward; the
    cache holds only this rank's KV heads."""
    overrides = {"skip": {"enabled": True, "kv": "active"}} if routed else {}
    for full, decoded, cache_shape in pool2.run(_decode_vs_full, kv_heads, overrides):
        torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
        assert cache_shape == (3, max(kv_heads // 2, 1), 24, 16)


GQA = ["model.num_kv_heads=1", "train.max_steps=4", "train.micro_batch_size=1", "model.skip.enabled=true",
       "parallel.balance_tokens=false"]


def test_gqa_pipeline_and_zero_train_like_one_process(pools, tiny_data, tmp_path):
    """Routed, one KV head: TP=2 x PP=2 (the head replicated on both TP ranks of each stage) and TP=2 under ZeRO 0,
    2 and 3 (ZeRO-1: the resume test below) follow one process (the same micro-batches everywhere, so the routers'
    budget controllers see the same quantiles)."""
    ref, _ = pools(1).run(train_run, GQA, tiny_data, tmp_path / "ref")[0]
    runs = {"pp2": pools(4).run(train_run, GQA + ["parallel.tp=2", "parallel.pp=2"], tiny_data, tmp_path / "pp")[0]}
    for stage in (0, 2, 3):
        runs[f"zero{stage}"] = pools(2).run(train_run, GQA + ["parallel.tp=2", f"zero.stage={stage}"], tiny_data,
                                            tmp_path / f"z{stage}")[0]
    for name, (losses, _) in runs.items():
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), atol=1e-4, rtol=0, msg=name)


def test_gqa_exact_resume_and_resharding_tp2_to_tp1(pool2, tiny_data, tmp_path):
    """TP=2 with one (replicated) KV head: 20 steps == 10 + resume + 10 bitwise; the TP=2 checkpoint resumed at
    TP=1 x DP=2 (split layout) continues the same trajectory."""
    from test_checkpoint import _same_weights, _train

    layout = ["model.num_kv_heads=1", "parallel.tp=2", "zero.stage=1"]
    full = pool2.run(_train, layout, tiny_data, tmp_path / "full")
    pool2.run(_train, layout, tiny_data, tmp_path / "cut", stop_at=10)
    resumed = pool2.run(_train, layout, tiny_data, tmp_path / "cut")
    assert resumed[0]["start"] == 10 and resumed[0]["losses"] == full[0]["losses"]
    _same_weights(resumed[0]["weights"], full[0]["weights"])
    pool2.run(_train, layout, tiny_data, tmp_path / "reshard", stop_at=10)
    tp1 = pool2.run(_train, ["model.num_kv_heads=1", "parallel.tp=1", "zero.stage=1"], tiny_data,
                    tmp_path / "reshard")
    assert tp1[0]["start"] == 10
    ref, got = full[0]["losses"], tp1[0]["losses"]
    torch.testing.assert_close(torch.tensor([got[s] for s in range(11, 21)]),
                               torch.tensor([ref[s] for s in range(11, 21)]), atol=1e-4, rtol=0)
    _same_weights(tp1[0]["weights"], full[0]["weights"], atol=1e-4)


def test_gqa_config_errors():
    from skiptron.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.num_kv_heads: 4 query heads"):
        load_config(None, ["model.num_heads=4", "model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match="model.num_kv_heads: 2 key/value heads"):
        load_config(None, ["model.num_heads=12", "model.hidden_size=192", "model.num_kv_heads=2", "parallel.tp=3"])
    assert load_config(None, ["model.num_kv_heads=1", "parallel.tp=2"]).model.kv_heads == 1


def test_gqa_flops_count_the_smaller_kv_projection():
    from skiptron.training.config import ModelConfig
    from skiptron.training.flops import config_flops_per_token

    mha = config_flops_per_token(ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=96), 64)
    mqa = config_flops_per_token(ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1,
                                             ffn_hidden_size=96), 64)
    # per layer and token the K and V projections shrink from 2*2*64*64 to 2*2*64*16 FLOPs (forward), x3 for training
    assert mha - mqa == 3 * 2 * (2 * 2 * 64 * 64 - 2 * 2 * 64 * 16)
