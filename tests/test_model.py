"""The model is the same function under any tensor-parallel layout, with or without sequence parallelism."""
import pytest
import torch


def _logits_and_grads(tp: int, vocab: int, tie: bool, sequence_parallel: bool = False, bias: bool = False,
                      embedding_rank: int | None = None, loss_chunk_tokens: int = 1024):
    """Logits, loss and whole gradients, plus the input/output shapes a few modules of block 0 saw."""
    from skiptron.parallel.state import init_model_parallel
    from skiptron.parallel.tensor_parallel import full_tensor, gather_tp
    from skiptron.training.config import ModelConfig
    from skiptron.training.model import GPT

    init_model_parallel(tp, 1, torch.device("cpu"))
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=96, seq_len=16,
                      make_vocab_size_divisible_by=8, tie_embeddings=tie, bias=bias, embedding_rank=embedding_rank)
    model = GPT(cfg, vocab, tp, sequence_parallel=sequence_parallel, loss_chunk_tokens=loss_chunk_tokens)
    shapes = {}
    block = model.blocks[0]
    for name, module in [("block", block), ("attn_norm", block.attn_norm), ("mlp_norm", block.mlp_norm),
                         ("qkv", block.attn.qkv), ("gate_up", block.mlp.gate_up)]:
        module.register_forward_pre_hook(lambda m, args, name=name: shapes.update({name: tuple(args[0].shape)}))
    tokens = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    logits = gather_tp(model.logits(tokens[:, :-1]).detach(), dim=-1)[..., :vocab]
    loss = model(tokens)
    loss.backward()
    grads = {n: full_tensor(p, p.grad) for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads, shapes


def _assert_same(runs, ref):
    ref_logits, ref_loss, ref_grads, _ = ref
    for logits, loss, grads, _ in runs:
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("vocab,tie", [(50, True), (61, False)])
def test_tp2_equals_tp1(pool2, vocab, tie):
    """At TP=2 the loss runs in chunks of 4 tokens (of 48): the vocab-parallel normalizer per chunk."""
    ref = pool2.run(_logits_and_grads, 1, vocab, tie)[0]
    _assert_same(pool2.run(_logits_and_grads, 2, vocab, tie, loss_chunk_tokens=4), ref)
    ref_logits, ref_loss = ref[:2]
    assert torch.isfinite(ref_loss) and ref_loss > 0
    assert ref_logits.shape[-1] == vocab


@pytest.mark.parametrize("vocab,tie,bias,rank", [(50, True, False, None), (61, False, True, None), (50, True, False, 16)],
                         ids=["tied", "untied-bias", "factorized-tied"])
def test_sequence_parallel_tp2_equals_tp1(pool2, vocab, tie, bias, rank):
    """Sequence parallelism moves tokens, not results: logits, loss and every gradient (norm gains and row-parallel
    biases included, summed over the sequence shards) equal TP=1. Between the TP regions (residual stream, norms)
    a rank holds [b, s/tp, d]; the column-parallel linears see the whole sequence."""
    ref = pool2.run(_logits_and_grads, 1, vocab, tie, False, bias, rank)[0]
    runs = pool2.run(_logits_and_grads, 2, vocab, tie, True, bias, rank)
    _assert_same(runs, ref)
    for *_, shapes in runs:
        assert shapes["block"] == shapes["attn_norm"] == shapes["mlp_norm"] == (3, 8, 64)
        assert shapes["qkv"] == shapes["gate_up"] == (3, 16, 64)
    assert ref[3]["block"] == (3, 16, 64)


def _sequence_collectives(native: bool):
    """Forward and input gradient of each sequence-parallel region on a [2, 4, 3] shard (TP=2), with the NCCL code
    path (single-tensor collectives) or gloo's emulation."""
    import torch.distributed as dist

    from skiptron.parallel import sequence_parallel as sp
    from skiptron.parallel.state import init_model_parallel

    init_model_parallel(2, 1, torch.device("cpu"))
    rank = dist.get_rank()
    out = {}
    emulated = sp._native
    sp._native = lambda group: native
    try:
        regions = [("gather", sp.gather_from_sequence, 4), ("reduce_scatter", sp.reduce_scatter_to_sequence, 8),
                   ("scatter", sp.scatter_to_sequence, 8)]
        for name, fn, width in regions:
            x = torch.arange(2 * width * 3, dtype=torch.float32).reshape(2, width, 3).mul(rank + 1).requires_grad_()
            y = fn(x)
            y.backward(torch.ones_like(y).cumsum(1) * (rank + 1))
            out[name] = (y.detach(), x.grad)
    finally:
        sp._native = emulated
    return out


@pytest.mark.skipif(not hasattr(torch.distributed, "all_gather_single"),
                    reason="an older gloo may lack the NCCL path's collectives")
def test_sequence_parallel_collectives(pool2):
    """gloo's emulation and the NCCL code path agree (run here on gloo, whose recent builds have the single-tensor
    collectives too); the gather concatenates the ranks' shards along the sequence."""
    emulated = pool2.run(_sequence_collectives, False)
    native = pool2.run(_sequence_collectives, True)
    for a, b in zip(emulated, native):
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    shards = [torch.arange(24, dtype=torch.float32).reshape(2, 4, 3) * (r + 1) for r in range(2)]
    torch.testing.assert_close(emulated[0]["gather"][0], torch.cat(shards, dim=1))
    assert emulated[1]["reduce_scatter"][0].shape == (2, 4, 3)


def test_kv_cache_appends_in_place_and_a_branch_from_an_older_state_copies():
    """Decoding's KV cache writes each new token into its buffers (no copy of the cache per step), grows past its
    capacity keeping its contents, and a state extended twice (a branch) leaves the other extension unchanged."""
    from skiptron.training.layers import KVCache

    def tokens(n, value):
        k = torch.full((1, 2, n, 4), float(value))
        return k, -k, torch.ones(1, n, dtype=torch.bool)

    a = KVCache.extended(None, *tokens(3, 1))
    b = KVCache.extended(a, *tokens(1, 2))
    assert b.k_buf is a.k_buf and a.length == 3 and b.length == 4
    c = KVCache.extended(a, *tokens(1, 3))  # from the older state: new buffers
    assert c.k_buf is not a.k_buf
    assert b.k[0, 0, :, 0].tolist() == [1, 1, 1, 2] and c.k[0, 0, :, 0].tolist() == [1, 1, 1, 3]
    assert torch.equal(c.v, -c.k) and a.k.shape == (1, 2, 3, 4)
    d = b
    for i in range(100):
        d = KVCache.extended(d, *tokens(1, i))
    assert d.length == 104 and d.k_buf.shape[2] >= 104
    assert d.k[0, 1, :5, 3].tolist() == [1, 1, 1, 2, 0] and d.k[0, 0, -1, 0] == 99 and bool(d.present.all())
    assert b.k[0, 0, :, 0].tolist() == [1, 1, 1, 2]


@pytest.mark.parametrize("positions", ["shared", "per_sequence"])
def test_fused_projection_backwards_equal_autograd_of_the_split_ops(positions):
    """`swiglu` and `heads_rotated` write the fused projection's gradient in one buffer instead of letting autograd
    concatenate the pieces' gradients: their values and gradients are those of the split-then-compute ops (float64
    gradcheck; fp32 to rounding), for grouped-query widths, parts left out of the loss and per-sequence positions."""
    import torch.nn.functional as F

    from skiptron.training.fused_projections import heads_rotated, swiglu
    from skiptron.training.layers import Rotary

    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2, 5, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate_up,))
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(gate_up), F.silu(gate) * up, atol=0, rtol=0)

    rotary, head_dim, widths = Rotary(8, 10000.0), 8, (4 * 8, 2 * 8, 2 * 8)
    pos = torch.arange(5) if positions == "shared" else torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 9, 11]])
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        t = torch.randn(2, 5, sum(widths), dtype=dtype, generator=gen, requires_grad=True)
        cos, sin = rotary.angles(pos, dtype)
        if dtype == torch.float64:
            assert torch.autograd.gradcheck(lambda x: heads_rotated(x, cos, sin, widths, (True, True, False), 8), (t,))
        fused = heads_rotated(t, cos, sin, widths, (True, True, False), head_dim)
        split = [piece.view(2, 5, -1, head_dim).transpose(1, 2) for piece in t.split(widths, dim=-1)]
        split = [rotary.rotate(split[0], cos, sin), rotary.rotate(split[1], cos, sin), split[2]]
        for a, b in zip(fused, split):
            torch.testing.assert_close(a, b, atol=tol, rtol=0)
        weights = [torch.randn(a.shape, dtype=dtype, generator=gen) for a in fused]
        for used in ((0, 1, 2), (0,), (1, 2)):  # a piece the loss does not use gets a zero gradient
            got, = torch.autograd.grad(sum((fused[i] * weights[i]).sum() for i in used), t, retain_graph=True)
            want, = torch.autograd.grad(sum((split[i] * weights[i]).sum() for i in used), t, retain_graph=True)
            torch.testing.assert_close(got, want, atol=tol, rtol=0)
    # a routed layer none of whose tokens execute projects 0 rows
    empty = torch.zeros(2, 0, sum(widths), requires_grad=True)
    cos, sin = rotary.angles(torch.zeros(2, 0, dtype=torch.long), empty.dtype)
    pieces = heads_rotated(empty, cos, sin, widths, (True, True, False), head_dim)
    assert [tuple(p.shape) for p in pieces] == [(2, 4, 0, 8), (2, 2, 0, 8), (2, 2, 0, 8)]
    sum(p.sum() for p in pieces).backward()
    assert empty.grad.shape == empty.shape


def test_rms_norm_equals_torchs_and_its_gradients():
    """`norms.RMSNorm` (the CPU fp32 path: its own backward) gives torch's `F.rms_norm` values and gradients: float64
    gradcheck of the function, fp32 to rounding through the module, and rows of 0 tokens (a routed layer whose
    tokens all skip)."""
    import torch.nn.functional as F

    from skiptron.training.norms import RMSNorm, _RMSNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = (torch.rand(16, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-5), (x, w))

    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=gen) + 0.5)
    for shape in ((3, 4, 16), (2, 0, 16)):
        a = (torch.randn(shape, generator=gen) * 3).requires_grad_()
        b = a.detach().clone().requires_grad_()
        weight = norm.weight.detach().clone().requires_grad_()
        out, want = norm(a), F.rms_norm(b, (16,), weight, 1e-5)
        torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-6)
        grad = torch.randn(shape, generator=gen)
        out.backward(grad)
        want.backward(grad)
        torch.testing.assert_close(a.grad, b.grad, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(norm.weight.grad, weight.grad, atol=1e-5, rtol=1e-5)
        norm.weight.grad = None
    assert set(norm.state_dict()) == {"weight"}  # checkpoints keep torch's key


def test_score_linear_equals_a_one_output_linear():
    """`ScoreLinear` (the routers' w . x + b as a matrix-vector product) gives nn.Linear(d, 1)'s values and
    gradients, keeps its parameter names and initialization, and takes rows of 0 tokens and bf16."""
    import torch.nn.functional as F

    from skiptron.training.layers import NormalLinear, ScoreLinear

    torch.manual_seed(0)
    score = ScoreLinear(16, bias=True, std=0.5)
    torch.manual_seed(0)
    reference = NormalLinear(16, 1, bias=True, std=0.5)
    assert score.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(score.weight, reference.weight, atol=0, rtol=0)
    with torch.no_grad():
        score.bias.fill_(0.25)
    gen = torch.Generator().manual_seed(1)
    for shape in ((3, 5, 16), (2, 0, 16), (7, 16)):
        x = torch.randn(shape, generator=gen, requires_grad=True)
        y = x.detach().clone().requires_grad_()
        w, b = score.weight.detach().clone().requires_grad_(), score.bias.detach().clone().requires_grad_()
        out, want = score(x), F.linear(y, w, b)
        assert out.shape == want.shape
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
        grad = torch.randn(want.shape, generator=gen)
        out.backward(grad)
        want.backward(grad)
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(score.weight.grad, w.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(score.bias.grad, b.grad, atol=1e-5, rtol=1e-5)
        score.zero_grad()
    half = ScoreLinear(16, bias=True, std=0.5).to(torch.bfloat16)
    x = torch.randn(4, 16, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(half(x), F.linear(x, half.weight, half.bias), atol=2e-2, rtol=2e-2)
