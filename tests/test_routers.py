"""The routers of the papers (training/routers.py): SkipLayer's straight-through Gumbel-softmax router and
Mixture-of-Depths' per-sequence top-k with its causal predictor, next to skiptron's sigmoid router."""
import pytest
import torch


def _skip(**kw):
    from skiptron.training.config import SkipConfig

    return SkipConfig(enabled=True, **kw)


def _router(kind, hidden=16, **kw):
    from skiptron.training.routers import build_router

    torch.manual_seed(0)
    return build_router(_skip(router=kind, **kw), hidden, 1e-5, 0.5)


def test_config_router_defaults_and_refusals():
    from skiptron.training.config import ConfigError, ModelConfig, load_config

    mod = _skip(router="mod")
    assert (mod.layers, mod.kv, mod.target_rate) == ("every:2", "active", 0.125)  # the paper's setting
    assert _skip(router="mod", kv="all", layers="all").kv == "all"  # explicit keys win
    assert _skip(router="gumbel").aux_loss_weight == 0.1
    assert _skip(router="gumbel", aux_loss_weight=0.5).aux_loss_weight == 0.5
    assert _skip().aux_loss_weight == 1.0 and _skip().router == "sigmoid"
    with pytest.raises(ValueError, match="model.skip.kv"):
        _skip(router="gumbel", kv="active")
    with pytest.raises(ValueError, match="model.skip.mode"):
        _skip(router="mod", mode="capacity")
    with pytest.raises(ValueError, match="model.skip.router"):
        ModelConfig(block="srupp", skip={"enabled": True, "router": "gumbel", "kv": "all"})
    with pytest.raises(ConfigError, match="model.skip.router"):
        load_config(None, ["model.skip.enabled=true", "model.skip.router=moe", "data.path=x"])


def test_gumbel_straight_through_is_hard_forward_soft_backward():
    """Forward: the gate is exactly 1 on executed and 0 on skipped tokens; backward: the gradient of the soft
    sample softmax((logits + g) / tau) with the same noise g."""
    router = _router("gumbel", gumbel_temperature=0.7)
    x = torch.randn(3, 8, 16, requires_grad=True)
    state = torch.get_rng_state()
    decision = router.decide(x)
    assert set(decision.gate.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(decision.gate.detach() == 1.0, decision.active)
    assert decision.skipped_gate is decision.gate
    assert decision.rate == decision.active.float().mean()
    weight = torch.randn(3, 8)
    (decision.gate * weight).sum().backward()
    got = x.grad.clone()

    torch.set_rng_state(state)
    x.grad = None
    from skiptron.training.routers import gumbel_noise

    soft = torch.softmax((router.logits(x) + gumbel_noise((3, 8, 2), x.device, None)) / 0.7, -1)[..., 1]
    (soft * weight).sum().backward()
    torch.testing.assert_close(got, x.grad)


def test_gumbel_capacity_loss_and_greedy_inference():
    router = _router("gumbel", target_rate=0.3)
    x = torch.randn(4, 16, 16)
    decision = router.decide(x)
    torch.testing.assert_close(decision.aux_loss, 0.1 * (decision.rate - 0.3) ** 2)
    router.eval()
    greedy = [router.decide(x) for _ in range(2)]
    logits = router.logits(x)
    assert torch.equal(greedy[0].active, logits[..., 1] > logits[..., 0])
    assert torch.equal(greedy[0].active, greedy[1].active)  # no noise
    assert torch.equal(greedy[0].gate, torch.ones(4, 16)) and greedy[0].skipped_gate is None
    active, gate = router.decide_step(x[:, :1])
    assert torch.equal(active, greedy[0].active[:, :1]) and torch.equal(gate, torch.ones(4, 1))


def test_gumbel_noise_is_standard_gumbel_and_reproducible():
    from skiptron.training.routers import gumbel_noise

    torch.manual_seed(3)
    noise = gumbel_noise((64, 64, 2), torch.device("cpu"), None)
    torch.manual_seed(3)
    assert torch.equal(noise, gumbel_noise((64, 64, 2), torch.device("cpu"), None))  # the RNG stream decides it
    assert torch.isfinite(noise).all()
    assert abs(float(noise.mean()) - 0.5772) < 0.05  # Euler-Mascheroni: the Gumbel mean
    assert abs(float(noise.var()) - torch.pi ** 2 / 6) < 0.1


def test_mod_top_k_per_sequence_is_exact_and_the_predictor_learns_stop_gradient():
    from skiptron.training.routers import sequence_capacity

    router = _router("mod", target_rate=0.25)
    x = torch.randn(3, 12, 16, requires_grad=True)
    decision = router.decide(x)
    k = sequence_capacity(0.25, 12)
    assert k == 3 and decision.active.sum(1).tolist() == [k] * 3
    weight = router.proj(router.norm(x)).squeeze(-1)
    assert torch.equal(decision.active, weight >= weight.topk(k, dim=1).values[:, -1:])  # the k highest weights
    torch.testing.assert_close(decision.gate, torch.sigmoid(weight))
    # the BCE loss reaches the predictor only: the router input is stop-gradient
    decision.aux_loss.backward()
    assert x.grad is None and router.proj.weight.grad is None and router.norm.weight.grad is None
    assert router.predictor.hidden.weight.grad.abs().sum() > 0
    router.eval()
    inference = router.decide(x)
    predicted = router.predictor(router.norm(x)) > 0
    assert torch.equal(inference.active, predicted)
    assert inference.agreement == (predicted == decision.active).float().mean()
    active, gate = router.decide_step(x[:, 4:6])
    assert torch.equal(active, predicted[:, 4:6])
    torch.testing.assert_close(gate, torch.sigmoid(weight[:, 4:6]))


def test_mod_predictor_learns_the_top_k():
    """A few hundred steps of the BCE loss alone: the predictor agrees with the top-k on most held-out tokens
    (chance: 1 - capacity of predicting 'skip' everywhere)."""
    router = _router("mod", hidden=16, target_rate=0.25)
    opt = torch.optim.Adam(router.predictor.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        opt.zero_grad()
        router.decide(torch.randn(8, 32, 16, generator=g)).aux_loss.backward()
        opt.step()
    agreement = float(router.decide(torch.randn(8, 32, 16, generator=g)).agreement)
    assert agreement > 0.85, agreement


def test_router_flops():
    from skiptron.training.config import ModelConfig
    from skiptron.training.flops import config_flops_per_token, transformer_layer_flops

    def model(**skip):
        return ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=176, seq_len=32,
                           skip={"enabled": True, "layers": [1], "kv": "all", **skip} if skip else {})

    dense = config_flops_per_token(model(), 256)
    routed = sum(f for n, f in transformer_layer_flops(64, 176, 4, 32).items() if n != "kv")
    sigmoid = config_flops_per_token(model(router="sigmoid"), 256, {1: 0.4})
    assert sigmoid == pytest.approx(dense - 3 * 0.6 * routed + 3 * 2 * 64)
    # gumbel: skipped tokens run the routed parts forward (a third of training) for the soft path
    gumbel = config_flops_per_token(model(router="gumbel"), 256, {1: 0.4})
    assert gumbel == pytest.approx(dense - 3 * 0.6 * routed + 0.6 * routed + 3 * 4 * 64)
    mod = config_flops_per_token(model(router="mod", predictor_hidden=8), 256, {1: 0.4})
    assert mod == pytest.approx(dense - 3 * 0.6 * routed + 3 * (2 * 64 + 2 * (64 * 8 + 8)))
