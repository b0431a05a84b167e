"""Learned layer skipping: routing semantics, exact DP token balancing, budgets, and that skipped tokens cost nothing."""
import pytest
import torch

from distributed import one_tensor_gather
from routed import VOCAB, routed_model
from runs import train_run


def _skewed_tokens(model, hot: bool, n=(4, 33), share=0.9):
    """Layer 0's router sees only the token's embedding, so its decision is a function of the token id: draw 90%
    of a hot rank's tokens from ids it executes and 90% of a cold rank's from ids it skips."""
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        ids = torch.arange(VOCAB)
        executes = model.blocks[0].router(model.embedding(ids[None]))[0] > 0.5
    on, off = ids[executes], ids[~executes]
    assert len(on) and len(off)
    g = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
    major, minor = (on, off) if hot else (off, on)
    pick = torch.rand(n, generator=g) < share
    return torch.where(pick, major[torch.randint(len(major), n, generator=g)],
                       minor[torch.randint(len(minor), n, generator=g)])


def _loss_and_grads(tp, balance, granularity, kv, mode="threshold"):
    """balance: the balancer's `min_tokens`, or None for off."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from skiptron.parallel.tensor_parallel import full_tensor

    model = routed_model(tp, balance, granularity=granularity, kv=kv, mode=mode)
    tokens = _skewed_tokens(model, hot=ps.get_data_parallel_rank() == 0)
    loss, _, routing = model(tokens, return_output=True)
    loss.backward()
    dp = ps.get_data_parallel_group()
    grads = {}
    for name, p in model.named_parameters():
        g = full_tensor(p, p.grad)
        dist.all_reduce(g, group=dp)
        grads[name] = g
    total = loss.detach().clone()
    dist.all_reduce(total, group=dp)
    active = [r.active_tokens for r in routing.values()]
    tp_active = [None] * ps.get_tensor_model_parallel_world_size()
    dist.all_gather_object(tp_active, active, group=ps.get_tensor_model_parallel_group())
    assert all(a == active for a in tp_active), f"routing decisions differ across TP ranks: {tp_active}"
    return total, grads, routing[0].balance


@pytest.mark.parametrize("granularity,kv", [("layer", "all"), ("layer", "active"), ("mlp", "all"),
                                            ("attention", "all")])
def test_balancing_is_exact_dp2(pool2, granularity, kv):
    off = pool2.run(_loss_and_grads, 1, None, granularity, kv)
    on = pool2.run(_loss_and_grads, 1, 0, granularity, kv)
    stats = on[0][2]
    assert stats["imbalance_before"] > 1.4, stats  # the skew is real
    assert stats["imbalance_after"] < 1.02 and stats["tokens_moved"] > 0, stats
    for (loss_off, grads_off, _), (loss_on, grads_on, _) in zip(off, on):
        torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=0)
        for name in grads_off:
            torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)


def test_balancing_is_exact_tp2_dp2(pool4):
    off = pool4.run(_loss_and_grads, 2, None, "layer", "all")
    on = pool4.run(_loss_and_grads, 2, 0, "layer", "all", "capacity")
    on_threshold = pool4.run(_loss_and_grads, 2, 0, "layer", "all")
    assert on_threshold[0][2]["tokens_moved"] > 0
    for (loss_off, grads_off, _), (loss_on, grads_on, _) in zip(off, on_threshold):
        torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=0)
        for name in grads_off:
            torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(torch.isfinite(r[0]) for r in on)


@pytest.mark.parametrize("stage", [2, 3])
def test_balancing_is_exact_under_zero(pool2, tiny_data, tmp_path, stage):
    """Whole DeepSpeed ZeRO-2/3 steps: the same losses and updated weights with the balancer on and off (ZeRO-3
    also checks that the routed block gathers the QKV weight it slices)."""
    skip = ["model.skip.enabled=true", f"zero.stage={stage}", "train.max_steps=3", "model.skip.mode=capacity",
            "model.skip.target_rate=0.4", "parallel.balance_min_tokens=0"]
    keys = ("loss", "skip/tokens_moved")
    off = pool2.run(train_run, skip + ["parallel.balance_tokens=false"], tiny_data, tmp_path / "off", keys)
    on = pool2.run(train_run, skip, tiny_data, tmp_path / "on", keys)
    assert sum(on[0][0]["skip/tokens_moved"]) > 0
    torch.testing.assert_close(torch.tensor(on[0][0]["loss"]), torch.tensor(off[0][0]["loss"]), atol=1e-5, rtol=0)
    for name, w in off[0][1].items():
        torch.testing.assert_close(on[0][1][name], w, atol=1e-5, rtol=1e-4, msg=name)


def _all_gathers_per_forward(mode):
    """all_gather calls (into one tensor) during one forward of a 2-layer routed model on skewed tokens (balancer
    on), and what moved."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model = routed_model(1, mode=mode)
    tokens = _skewed_tokens(model, hot=ps.get_data_parallel_rank() == 0)
    calls, gather = [], one_tensor_gather()
    original = getattr(dist, gather)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("group"))
        return original(*args, **kwargs)

    setattr(dist, gather, counted)
    try:
        routing = model(tokens, return_output=True).routing
    finally:
        setattr(dist, gather, original)
    return len(calls), len(routing), sum(r.balance["tokens_moved"] for r in routing.values())


def test_a_routed_layer_synchronizes_the_ranks_once_per_forward(pool2):
    """Each collective is a point where every rank waits for the slowest: a threshold layer gathers the ranks'
    counts once for all its balanced computations (two in `layer` granularity), a capacity layer reads them from the
    scores it gathers anyway. One all_gather per routed layer either way, with tokens moving."""
    for mode in ("threshold", "capacity"):
        for gathers, layers, moved in pool2.run(_all_gathers_per_forward, mode):
            assert layers == 2 and gathers == layers and moved > 0, (mode, gathers, layers, moved)


def _gathers_after_feedback():
    """Count gathers per forward of a threshold model (balancer at 128 tokens) across steps: even loads, then the
    feedback of that step, then skewed loads, then their feedback."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from skiptron.training.routing import RoutingMeter

    model = routed_model(1, balance=128)
    dp = ps.get_data_parallel_group()
    even = torch.randint(VOCAB, (4, 33), generator=torch.Generator().manual_seed(7 + ps.get_data_parallel_rank()))
    skewed = _skewed_tokens(model, hot=ps.get_data_parallel_rank() == 0, n=(8, 65))
    calls, gather = [], one_tensor_gather()
    original = getattr(dist, gather)
    out = []

    def step(tokens):
        calls.clear()
        routing = model(tokens, return_output=True).routing
        gathers = len(calls)
        meter = RoutingMeter()
        meter.add(routing)
        _, feedback = meter.reduce(dp)
        model.update_routing(feedback)
        out.append((gathers, {i: f.shed_tokens for i, f in feedback.items()},
                    {i: r.balance.get("shed_tokens") for i, r in routing.items()}))

    setattr(dist, gather, lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    try:
        for tokens in (even, even, skewed, skewed):
            step(tokens)
    finally:
        setattr(dist, gather, original)
    return out


def test_threshold_layers_gather_counts_only_while_loads_near_the_balancer_threshold(pool2):
    """Each count gather is a point where every rank waits for the slowest. After a step whose loads stayed below
    half the balancer's threshold, threshold layers skip it (and the exchange) in the next; a step with skewed loads
    brings it back. The shed every step feeds back equals what the balancer computes from gathered counts."""
    for steps in pool2.run(_gathers_after_feedback):
        (first, shed1, seen1), (second, _, seen2), (third, shed3, _), (fourth, _, seen4) = steps
        assert first == 2 and all(shed1[i] == seen1[i] < 64 for i in shed1), steps  # gathered, found even
        assert second == 0 and not any(seen2.values()), steps  # skipped: no gather, no balance stats
        assert third == 0 and max(shed3.values()) >= 64, steps  # skewed, not yet gathered: the feedback sees it
        assert fourth >= 1 and any(v is not None and v >= 64 for v in seen4.values()), steps


def _host_reads_per_forward(skip):
    """Reads of device values during one forward of a 2-layer routed model on skewed tokens (balancer on, exact)."""
    from megatron.core import parallel_state as ps

    from skiptron.parallel.syncs import host_reads

    model = routed_model(1, **skip)
    if skip.get("router") == "gumbel":  # no sigmoid to skew by; its noise makes the ranks' loads differ
        tokens = torch.randint(VOCAB, (4, 33), generator=torch.Generator().manual_seed(ps.get_data_parallel_rank()))
    else:
        tokens = _skewed_tokens(model, hot=ps.get_data_parallel_rank() == 0)
    with host_reads() as reads:
        routing = model(tokens, return_output=True).routing
    return reads, len(routing), sum(r.balance["tokens_moved"] for r in routing.values())


@pytest.mark.parametrize("skip", [{}, {"kv": "active"}, {"granularity": "mlp"}, {"mode": "capacity"},
                                  {"router": "gumbel"}])
def test_a_routed_layer_reads_the_device_once_per_forward(pool2, skip):
    """Each read of a device value (a count that shapes the next tensors) stalls a GPU's host until the device
    catches up: a routed layer reads its sequences' and ranks' counts in one transfer and derives its rows and
    packing from them without another (`training/selection.py`). The old code read three times per layer."""
    for reads, layers, moved in pool2.run(_host_reads_per_forward, skip):
        assert layers >= 1 and moved > 0, (skip, layers, moved)
        assert [r.op for r in reads] == ["tolist"] * layers, (skip, reads, layers)
        assert all("training/selection.py" in r.caller for r in reads), reads


def _capacity_counts(rate):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model = routed_model(1, mode="capacity", target_rate=rate)
    tokens = _skewed_tokens(model, hot=ps.get_data_parallel_rank() == 0)
    routing = model(tokens, return_output=True).routing
    counts = torch.tensor([r.active_tokens for r in routing.values()])
    local = counts.clone()
    dist.all_reduce(counts)
    return counts.tolist(), local.tolist(), tokens[:, :-1].numel() * dist.get_world_size()


def test_balancer_skips_the_exchange_below_its_threshold(pool2):
    """parallel.balance_min_tokens: the exchange runs when the most loaded rank would shed at least that many tokens;
    every rank sees the same counts, so all skip together, and skipping changes nothing but who computes."""
    off = pool2.run(_loss_and_grads, 1, None, "layer", "all")
    exact = pool2.run(_loss_and_grads, 1, 0, "layer", "all")
    shed = exact[0][2]["shed_tokens"]
    assert shed > 10, exact[0][2]  # the skew is real
    at = pool2.run(_loss_and_grads, 1, shed, "layer", "all")
    above = pool2.run(_loss_and_grads, 1, shed + 1, "layer", "all")
    assert at[0][2]["tokens_moved"] == exact[0][2]["tokens_moved"] > 0
    assert above[0][2]["tokens_moved"] == 0 and above[0][2]["imbalance_before"] > 1.4
    torch.testing.assert_close(above[0][0], off[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(at[0][0], off[0][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.9])
def test_capacity_mode_executes_exactly_the_budget(pool2, rate):
    results = pool2.run(_capacity_counts, rate)
    total_counts, _, total_tokens = results[0]
    assert total_counts == [round(rate * total_tokens)] * 2
    assert results[0][1] != results[1][1]  # per-rank counts are free to differ


def test_threshold_budget_is_met_after_training(pool2, tiny_data, tmp_path):
    """After a short run the measured execution rate sits within 0.05 of the target (it starts near 0.5; a step
    here is 128 tokens per rank, so single steps scatter around the mean)."""
    ov = ["model.skip.enabled=true", "model.skip.target_rate=0.25", "train.max_steps=40"]
    (values, _), _ = pool2.run(train_run, ov, tiny_data, tmp_path / "budget", ("skip/exec_rate",))
    assert values[0] > 0.35, values[:5]
    late = values[-20:]
    assert abs(sum(late) / len(late) - 0.25) < 0.05, str([round(v, 3) for v in values])


def _rows_seen(granularity, kv, balance):
    """Rows that reached each of the routed block's projections and its MLP, next to the active-token count."""
    import torch.distributed as dist

    model = routed_model(1, balance, granularity=granularity, kv=kv, mode="capacity", target_rate=0.25)
    block = model.blocks[0].block
    seen = {"qkv": 0, "q": 0, "kv": 0, "out": 0, "mlp": 0}
    project = block.attn.project

    def counted_project(x, parts="qkv"):
        seen[parts] += x.shape[:-1].numel()
        return project(x, parts)

    def counter(key):
        def hook(_, args):
            seen[key] += args[0].shape[:-1].numel()
        return hook

    block.attn.project = counted_project
    block.attn.out.register_forward_pre_hook(counter("out"))
    block.mlp.gate_up.register_forward_pre_hook(counter("mlp"))
    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, VOCAB, (4, 33), generator=g)
    routing = model(tokens, return_output=True).routing
    return seen, routing[0].active_tokens, tokens[:, :-1].numel()


@pytest.mark.parametrize("granularity,kv", [("layer", "all"), ("layer", "active"), ("mlp", "all"),
                                            ("attention", "active"), ("attention", "all")])
def test_skipped_tokens_are_not_computed(pool2, granularity, kv):
    routed_attention = granularity != "mlp"
    for seen, active, total in pool2.run(_rows_seen, granularity, kv, None):
        assert 0 < active < total
        assert seen["mlp"] == (total if granularity == "attention" else active)
        assert seen["out"] == (active if routed_attention else total)
        assert seen["qkv"] == (active if routed_attention and kv == "active" else 0 if routed_attention else total)
        assert seen["q"] == (active if routed_attention and kv == "all" else 0)
        assert seen["kv"] == (total if routed_attention and kv == "all" else 0)
    # balanced: every position-wise computation of the active tokens is evened out over the two ranks
    balanced = pool2.run(_rows_seen, granularity, kv, 1.0)
    position_wise = ["mlp"] * (granularity != "attention") + (["out", "q" if kv == "all" else "qkv"]
                                                              if routed_attention else [])
    total_active = sum(active for _, active, _ in balanced)
    assert len({active for _, active, _ in balanced}) == 2  # the ranks' own loads differ
    for key in position_wise:
        rows = [seen[key] for seen, _, _ in balanced]
        assert sum(rows) == total_active and max(rows) - min(rows) <= 1, (key, rows)


def _selected_vs_dense():
    from skiptron.training.selection import chosen_tokens, pack_positions

    model = routed_model(1)
    attn = model.blocks[0].block.attn
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(1))
    dense = attn(x, torch.arange(16))
    active = torch.rand(3, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_positions(chosen_tokens(active))
    picked = attn.project_out(attn.forward_selected(x, packed, keys_values=attn.keys_values(x)))
    everything = attn.project_out(
        attn.forward_selected(x, pack_positions(chosen_tokens(torch.ones(3, 16, dtype=torch.bool)))))
    return dense.detach(), active, picked.detach(), everything.detach()


def test_selected_attention_matches_dense(pool2):
    dense, active, picked, everything = pool2.run(_selected_vs_dense)[0]
    torch.testing.assert_close(picked, dense[active], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(everything, dense.flatten(0, 1), atol=1e-6, rtol=1e-5)


def test_skip_config_layers():
    from skiptron.training.config import ConfigError, SkipConfig

    assert SkipConfig(enabled=True, layers="inner").routed_layers(6) == [1, 2, 3, 4]
    assert SkipConfig(enabled=True, layers="every:2").routed_layers(6) == [1, 3, 5]
    assert SkipConfig(enabled=True, layers=[0, 5]).routed_layers(6) == [0, 5]
    assert SkipConfig(enabled=False).routed_layers(6) == []
    with pytest.raises(ConfigError, match="model.skip.layers"):
        SkipConfig(enabled=True, layers=[7]).routed_layers(6)
    with pytest.raises(ConfigError, match="model.skip.layers"):
        SkipConfig(enabled=True, layers="some").routed_layers(6)


def test_rate_heatmap(tmp_path):
    import json

    from skiptron.tools.plot import plot_rate_heatmap

    lines = [{"step": s, "loss": 1.0, "skip/rate/L1": 0.5, "skip/rate/L3": s / 10} for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = plot_rate_heatmap(tmp_path, tmp_path / "rates.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="model.skip.enabled"):
        plot_rate_heatmap(tmp_path / "dense", tmp_path / "x.png")


def _decode_vs_full(granularity, kv, enabled=True):
    from skiptron.parallel.tensor_parallel import gather_tp
    from skiptron.training.model import IncrementalDecoder

    model = routed_model(2, granularity=granularity, kv=kv) if enabled else routed_model(2, layers=[0], enabled=False)
    tokens = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, routing = model.logits_and_routing(tokens)
        full = gather_tp(logits, dim=-1)
        rates = [r.exec_rate for r in routing.values()]
        decoder = IncrementalDecoder(model)
        parts = [decoder(tokens[:, :5])] + [decoder(tokens[:, i:i + 1]) for i in range(5, 14)]
        single = IncrementalDecoder(model)  # batch 1: a step whose one token skips a layer takes the skipped path
        alone = [single(tokens[:1, :5])] + [single(tokens[:1, i:i + 1]) for i in range(5, 14)]
    return (full[..., :VOCAB], gather_tp(torch.cat(parts, dim=1), dim=-1)[..., :VOCAB], rates,
            gather_tp(torch.cat(alone, dim=1), dim=-1)[..., :VOCAB])


@pytest.mark.parametrize("granularity,kv,enabled", [("layer", "all", True), ("layer", "active", True),
                                                    ("mlp", "all", True), ("attention", "active", True),
                                                    ("layer", "all", False)])
def test_kv_cache_decoding_matches_the_full_forward(pool2, granularity, kv, enabled):
    """Generation with a KV cache through skipped layers (TP=2): a prompt chunk then one token at a time gives the
    logits of the whole-sequence forward, with the same per-token decisions."""
    for full, decoded, rates, alone in pool2.run(_decode_vs_full, granularity, kv, enabled):
        torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone, full[:1], atol=1e-5, rtol=1e-5)
        assert all(0 < r < 1 for r in rates), rates  # some tokens executed, some skipped


def _routed_kernels():
    """Every SDPA call of routed attention (kv: all with each kernel, kv: active) with its keyword arguments, and
    the contexts of the three paths next to their references (the dense layer at the selected rows; for kv: active,
    the dense layer run on each sequence's active tokens alone, at their positions)."""
    import torch.nn.functional as F

    from skiptron.training import attention
    from skiptron.training.selection import chosen_tokens, pack_positions

    attn = routed_model(1).blocks[0].block.attn
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(1))
    active = torch.rand(3, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_positions(chosen_tokens(active))
    calls, sdpa = [], F.scaled_dot_product_attention

    def recorded(q, k, v, **kwargs):
        calls.append((tuple(q.shape), kwargs))
        return sdpa(q, k, v, **kwargs)

    F.scaled_dot_product_attention = recorded
    try:
        with torch.no_grad():
            dense = attn(x, torch.arange(16))
            calls.clear()
            out = {}
            for kernel in ("sdpa", "flex"):  # the mask-free ones
                attn.kv_all_kernel = kernel
                out[kernel] = attn.project_out(attn.forward_selected(x, packed, keys_values=attn.keys_values(x)))
            out["active"] = attn.project_out(attn.forward_selected(x, packed))
            kernel_calls = list(calls)
            attn.kv_all_kernel = "mask"
            out["mask"] = attn.project_out(attn.forward_selected(x, packed, keys_values=attn.keys_values(x)))
            ref_active = torch.cat([attn(x[i, active[i]][None], active[i].nonzero()[:, 0])[0] for i in range(3)])
    finally:
        F.scaled_dot_product_attention = sdpa
    return kernel_calls, out, dense[active], ref_active, int(packed.valid.shape[1]), attention.attention_backend_report()


def test_routed_attention_builds_no_sequence_mask(pool2):
    """The mask-free routed kernels never hand SDPA a mask: `kv: all` runs the causal kernel over the queries
    scattered to their positions (kernel sdpa) or flex_attention with a block mask (kernel flex, no SDPA call at
    all), `kv: active` the causal kernel over the packed [b, n] rows; they, and the [b, n, s]-masked kernel `auto`
    picks on CPU, equal their dense references."""
    calls, out, ref_all, ref_active, n, report = pool2.run(_routed_kernels)[0]
    assert [shape for shape, _ in calls] == [(3, 4, 16, 16), (3, 4, n, 16)]  # sdpa kernel, then kv: active
    assert n < 16
    for _, kwargs in calls:
        assert kwargs.get("attn_mask") is None and kwargs["is_causal"] is True, kwargs
    torch.testing.assert_close(out["sdpa"], ref_all, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["flex"], ref_all, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["mask"], ref_all, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["active"], ref_active, atol=1e-6, rtol=1e-5)
    assert set(report) == {"dense", "routed_kv_active", "routed_kv_all[auto]", "routed_kv_all[sdpa]",
                           "routed_kv_all[mask]", "routed_kv_all[flex]", "decode_step"}
    assert all("none" not in v and "unavailable" not in v for v in report.values()), report
    assert report["routed_kv_all[auto]"] == "mask"  # CPU: its fused kernel takes the mask and is fastest with it
