"""The model is the same function under any tensor-parallel layout."""
import pytest
import torch


def _logits_and_grads(tp: int, vocab: int, tie: bool):
    from skiptron.parallel.state import init_model_parallel
    from skiptron.parallel.tensor_parallel import full_tensor, gather_tp
    from skiptron.training.config import ModelConfig
    from skiptron.training.model import GPT

    init_model_parallel(tp, 1, torch.device("cpu"))
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=96, seq_len=16,
                      make_vocab_size_divisible_by=8, tie_embeddings=tie)
    model = GPT(cfg, vocab, tp)
    tokens = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    logits = gather_tp(model.logits(tokens[:, :-1]).detach(), dim=-1)[..., :vocab]
    loss = model(tokens)
    loss.backward()
    grads = {n: full_tensor(p, p.grad) for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("vocab,tie", [(50, True), (61, False)])
def test_tp2_equals_tp1(pool2, vocab, tie):
    ref_logits, ref_loss, ref_grads = pool2.run(_logits_and_grads, 1, vocab, tie)[0]
    for logits, loss, grads in pool2.run(_logits_and_grads, 2, vocab, tie):
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert torch.isfinite(ref_loss) and ref_loss > 0
    assert ref_logits.shape[-1] == vocab
