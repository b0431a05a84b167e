"""SRU++ blocks: the fused recurrence against the reference loop, tensor-parallel invariance, training through the real
trainer, and incremental decoding."""
import pytest
import torch

from runs import train_run

from skiptron.training.config import ConfigError, load_config
from skiptron.training.kernels import cpu, reference_recurrence, sru_recurrence, triton_sru


def _inputs(b, s, d, dtype=torch.float32, seed=0):
    """Random recurrence inputs, including a random initial state; scaled like a trained layer's (v ~ 1/2)."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()
    return make(b, s, 3, d), make(b, s, d), make(2, d, scale=0.5), make(2, d), make(b, d)


def _outputs_and_grads(fn, inputs, seed=1):
    """h, the last state, and the gradients of a random linear function of both w.r.t. every input."""
    h, c = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (h * torch.randn(h.shape, generator=g)).sum() + (c * torch.randn(c.shape, generator=g)).sum()
    return (h, c, *torch.autograd.grad(loss, inputs))


IMPLS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_sru.supports(torch.empty(0)), reason="needs triton with CUDA or TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(3, 37, 300), (1, 1, 5), (2, 64, 128)])
def test_fused_recurrence_matches_reference(impl, shape):
    inputs = _inputs(*shape)
    names = ["h", "c_last", "du", "dx", "dv", "dbias", "dc0"]
    fused = _outputs_and_grads(lambda *a: sru_recurrence(*a, impl=impl), inputs)
    ref = _outputs_and_grads(reference_recurrence, inputs)
    for name, a, b in zip(names, fused, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_cpu_kernel_gradcheck_fp64():
    inputs = _inputs(2, 6, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: sru_recurrence(*a, impl="cpu"), inputs)


def test_cpu_kernel_computes_bf16_in_fp32():
    inputs = [t.detach().bfloat16() for t in _inputs(2, 8, 16)]
    h, c = sru_recurrence(*inputs, impl="cpu")
    h_ref, c_ref = reference_recurrence(*(t.float() for t in inputs))
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), h_ref, atol=2e-2, rtol=2e-2)


def test_falls_back_to_reference_without_compiler(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built.*reference loop"):
        assert cpu.extension.__wrapped__() is None
    monkeypatch.setattr(cpu, "cpu_kernel", lambda: None)
    inputs = _inputs(2, 5, 7)
    torch.testing.assert_close(sru_recurrence(*inputs)[0], reference_recurrence(*inputs)[0])
    with pytest.raises(RuntimeError, match="could not be built"):
        sru_recurrence(*inputs, impl="cpu")


def test_a_build_lock_left_by_a_killed_build_is_cleared_and_a_live_one_waited_for(monkeypatch, tmp_path):
    """torch's lock file outlives a killed build (and then blocks every later load forever): under skiptron's flock
    it is stale and removed; while another process holds the flock (building), the load waits for it."""
    import subprocess
    import sys
    import time

    from skiptron.parallel.extensions import build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with build_lock("demo") as directory:
        pass
    (directory / "lock").touch()  # what a process killed inside torch's build leaves
    with pytest.warns(RuntimeWarning, match="left by a process that died"), build_lock("demo"):
        assert not (directory / "lock").exists()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); "
        "time.sleep(1.5)"), str(directory.parent / "demo.skiptron-lock")], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()  # it holds the lock now
    start = time.monotonic()
    with build_lock("demo"):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 1.0, waited


def test_recurrence_shape_errors_name_the_tensor():
    u, x, v, bias, c0 = _inputs(2, 5, 7)
    with pytest.raises(ValueError, match="c0 must have shape"):
        sru_recurrence(u, x, v, bias, c0[:, :3])


def test_config_keys_and_errors():
    cfg = load_config(None, ["model.block=srupp", "model.srupp.attention_every=2", "model.hidden_size=64"])
    assert [cfg.model.srupp.has_attention(i) for i in range(4)] == [False, True, False, True]
    assert cfg.model.srupp.projection(64) == 16
    with pytest.raises(ConfigError, match="model.srupp.num_heads"):
        load_config(None, ["model.block=srupp", "model.hidden_size=64", "model.srupp.num_heads=3"])
    routed = ["model.block=srupp", "model.skip.enabled=true"]
    assert load_config(None, routed + ["model.skip.kv=active"]).model.skip.routed_layers(4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="model.skip.kv: .*set model.skip.kv=active"):
        load_config(None, routed)
    for granularity in ("mlp", "attention"):
        with pytest.raises(ConfigError, match=f"model.skip.granularity: '{granularity}'.*use granularity=layer"):
            load_config(None, routed + ["model.skip.kv=active", f"model.skip.granularity={granularity}"])
    with pytest.raises(ConfigError, match="model.hidden_size.*parallel.tp=3"):
        load_config(None, ["model.block=srupp", "model.hidden_size=64", "parallel.tp=3"])


# -- the model under tensor parallelism ------------------------------------------------------------------------------

def _srupp_model(tp: int, vocab: int = 50, routed: bool = False):
    """Three SRU++ layers (layer 1 with attention); `routed`: layers 1 and 2 behind routers whose logits are spread
    wide (x50), so decisions are mixed and far from the 0.5 threshold."""
    from skiptron.parallel.state import init_model_parallel
    from skiptron.training.config import ModelConfig
    from skiptron.training.model import GPT

    init_model_parallel(tp, 1, torch.device("cpu"))
    torch.manual_seed(0)
    skip = {"enabled": True, "kv": "active", "layers": [1, 2]} if routed else {}
    cfg = ModelConfig(block="srupp", num_layers=3, hidden_size=64, num_heads=4, seq_len=16,
                      make_vocab_size_divisible_by=8, srupp={"attention_every": 2, "num_heads": 2}, skip=skip)
    model = GPT(cfg, vocab, tp)
    if routed:
        with torch.no_grad():
            for i in (1, 2):
                model.blocks[i].router.proj.weight.mul_(50)
    return model


def _layer(block):
    return getattr(block, "block", block)


def _logits_and_grads(tp: int):
    from skiptron.parallel.tensor_parallel import full_tensor, gather_tp

    vocab = 50
    model = _srupp_model(tp, vocab)
    with torch.no_grad():  # alpha starts at 0; make the attention path matter for the gradients too
        for block in model.blocks:
            if block.has_attention:
                block.alpha.fill_(0.5)
    tokens = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    logits = gather_tp(model.logits(tokens[:, :-1]).detach(), dim=-1)[..., :vocab]
    loss = model(tokens)
    loss.backward()
    grads = {n: full_tensor(p, p.grad) for n, p in model.named_parameters()}
    return logits, loss.detach(), grads


def test_srupp_tp2_equals_tp1(pool2):
    ref_logits, ref_loss, ref_grads = pool2.run(_logits_and_grads, 1)[0]
    assert [n for n in ref_grads if "attention" in n], "no attention layer was built"
    for logits, loss, grads in pool2.run(_logits_and_grads, 2):
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(g.abs().sum() > 0 for g in ref_grads.values()), [n for n, g in ref_grads.items() if g.abs().sum() == 0]


def _decode_matches_full(tp: int, routed: bool = False):
    from skiptron.parallel.tensor_parallel import gather_tp
    from skiptron.training.model import IncrementalDecoder

    model = _srupp_model(tp, routed=routed).eval()
    with torch.no_grad():
        for block in model.blocks:
            if _layer(block).has_attention:
                _layer(block).alpha.fill_(0.7)
        tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(3))
        full, routing = model.logits_and_routing(tokens)
        rates = [r.exec_rate for r in routing.values()]
        decoder = IncrementalDecoder(model)
        chunks = [decoder(tokens[:, :5])] + [decoder(tokens[:, i:i + 1]) for i in range(5, 12)]  # prefill, then 1 by 1
        stepped = torch.cat(chunks, dim=1)
    return gather_tp(full, dim=-1)[..., :50], gather_tp(stepped, dim=-1)[..., :50], rates


@pytest.mark.parametrize("routed", [False, True], ids=["dense", "routed"])
def test_incremental_decoding_equals_full_forward(pool2, routed):
    for full, stepped, rates in pool2.run(_decode_matches_full, 2, routed):
        torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
        assert len(rates) == (2 if routed else 0) and all(0.2 < r < 0.8 for r in rates), rates


def _routed_vs_reference(tp: int):
    """The routed layers' outputs in the model's forward, and the reference: each sequence's active tokens run alone
    through the SRU++ layer (in order), x + p (F(x) - x) for them, x for the others; plus the whole logits."""
    from skiptron.parallel.tensor_parallel import gather_tp

    model = _srupp_model(tp, routed=True)
    seen = {}
    for i in (1, 2):
        model.blocks[i].register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out[0])))
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for block in model.blocks:
            if _layer(block).has_attention:
                _layer(block).alpha.fill_(0.5)
        logits = gather_tp(model.logits(tokens), dim=-1)[..., :50]
        pairs, rates = [], []
        for i, (x, out) in seen.items():
            routed = model.blocks[i]
            p = routed.router(x)
            active = p > 0.5
            ref = x.clone()
            for s in range(x.shape[0]):
                a = active[s]
                y = routed.block(x[s:s + 1, a])[0]
                ref[s, a] = x[s, a] + p[s, a, None] * (y - x[s, a])
            pairs.append((out, ref))
            rates.append(active.float().mean().item())
    return pairs, rates, logits


def test_routed_srupp_equals_the_per_sequence_reference(pool2):
    """A routed SRU++ layer runs over each sequence's active tokens only (packed, order kept): TP=2 matches the
    per-sequence reference and TP=1's logits."""
    _, _, ref_logits = pool2.run(_routed_vs_reference, 1)[0]
    for pairs, rates, logits in pool2.run(_routed_vs_reference, 2):
        assert all(0.2 < r < 0.8 for r in rates), rates
        for out, ref in pairs:
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_routed_srupp_trains_to_its_budget(pool2, tiny_data, tmp_path):
    """Routed SRU++ through the trainer (DP=2, balancer on: not used by SRU++ layers): the loss falls and the
    measured execution rate settles at the target."""
    ov = ["model.block=srupp", "model.srupp.attention_every=2", "model.skip.enabled=true", "model.skip.kv=active",
          "model.skip.target_rate=0.3", "train.max_steps=30"]
    (values, _), _ = pool2.run(train_run, ov, tiny_data, tmp_path / "routed", ("loss", "skip/exec_rate"))
    rates, losses = values["skip/exec_rate"], values["loss"]
    assert rates[0] > 0.4, rates[:5]
    late = rates[-20:]  # single steps (128 tokens per rank) scatter around the mean
    assert abs(sum(late) / len(late) - 0.3) < 0.06, [round(r, 3) for r in rates]
    assert losses[-1] < losses[0] - 0.3, losses


def test_srupp_trains_through_the_trainer_tp2_like_tp1(pool2, tiny_data, tmp_path):
    """`model.block=srupp` through the real trainer: the loss falls, and TP=2 with ZeRO-3 follows TP=1 (DP=2)."""
    overrides = ["model.block=srupp", "model.srupp.attention_every=2", "train.max_steps=6"]
    tp1 = pool2.run(train_run, overrides + ["parallel.tp=1", "zero.stage=1"], tiny_data, tmp_path / "tp1")
    tp2 = pool2.run(train_run, overrides + ["parallel.tp=2", "zero.stage=3"], tiny_data, tmp_path / "tp2")
    losses, weights = tp1[0]
    assert any(".weight_c" in name for name in weights)
    assert losses[-1] < losses[0] - 0.3, losses
    torch.testing.assert_close(torch.tensor(tp2[0][0]), torch.tensor(losses), atol=1e-5, rtol=0)
    for name, weight in tp2[0][1].items():
        torch.testing.assert_close(weight, weights[name], atol=1e-4, rtol=1e-4, msg=name)  # Adam: noise on tiny grads
