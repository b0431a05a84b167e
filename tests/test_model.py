"""The model is the same function under any tensor-parallel layout, with or without sequence parallelism."""
import pytest
import torch


def _logits_and_grads(tp: int, vocab: int, tie: bool, sequence_parallel: bool = False, bias: bool = False):
    """Logits, loss and whole gradients, plus the input/output shapes a few modules of block 0 saw."""
    from skiptron.parallel.state import init_model_parallel
    from skiptron.parallel.tensor_parallel import full_tensor, gather_tp
    from skiptron.training.config import ModelConfig
    from skiptron.training.model import GPT

    init_model_parallel(tp, 1, torch.device("cpu"))
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=96, seq_len=16,
                      make_vocab_size_divisible_by=8, tie_embeddings=tie, bias=bias)
    model = GPT(cfg, vocab, tp, sequence_parallel=sequence_parallel)
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
    ref = pool2.run(_logits_and_grads, 1, vocab, tie)[0]
    _assert_same(pool2.run(_logits_and_grads, 2, vocab, tie), ref)
    ref_logits, ref_loss = ref[:2]
    assert torch.isfinite(ref_loss) and ref_loss > 0
    assert ref_logits.shape[-1] == vocab


@pytest.mark.parametrize("vocab,tie,bias", [(50, True, False), (61, False, True)])
def test_sequence_parallel_tp2_equals_tp1(pool2, vocab, tie, bias):
    """Sequence parallelism moves tokens, not results: logits, loss and every gradient (norm gains and row-parallel
    biases included, summed over the sequence shards) equal TP=1. Between the TP regions (residual stream, norms)
    a rank holds [b, s/tp, d]; the column-parallel linears see the whole sequence."""
    ref = pool2.run(_logits_and_grads, 1, vocab, tie, False, bias)[0]
    runs = pool2.run(_logits_and_grads, 2, vocab, tie, True, bias)
    _assert_same(runs, ref)
    for *_, shapes in runs:
        assert shapes["block"] == shapes["attn_norm"] == shapes["mlp_norm"] == (3, 8, 64)
        assert shapes["qkv"] == shapes["gate_up"] == (3, 16, 64)
    assert ref[3]["block"] == (3, 16, 64)
