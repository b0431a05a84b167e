"""The chunked, fused output layer + cross entropy gives the loss and gradients of whole logits and torch's cross
entropy: for any chunk size, with padded vocabulary entries, in bf16, and split over TP ranks."""
import pytest
import torch
import torch.nn.functional as F

from skiptron.training.fused_loss import chunked_cross_entropy


def _reference(h, weight, labels, padding=None):
    logits = F.linear(h, weight).float()
    if padding is not None:
        logits = logits.masked_fill(padding, float("-inf"))
    return F.cross_entropy(logits, labels)


def _inputs(n=23, d=16, vocab=40, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype)
    weight = torch.randn(vocab, d, generator=gen).to(dtype)
    labels = torch.randint(0, vocab - 3, (n,), generator=gen)  # the last 3 entries are padding below
    return h, weight, labels


def _loss_and_grads(fn, h, weight, scale=1.0):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, weight)
    (loss * scale).backward()
    return loss.detach(), h.grad, weight.grad


@pytest.mark.parametrize("rows", [1, 5, 23, 64])
def test_chunked_cross_entropy_equals_whole_logits(rows):
    h, weight, labels = _inputs()
    padding = torch.arange(weight.shape[0]) >= weight.shape[0] - 3
    for pad in (None, padding):
        want = _loss_and_grads(lambda a, b: _reference(a, b, labels, pad), h, weight, scale=3.0)
        got = _loss_and_grads(lambda a, b: chunked_cross_entropy(a, b, labels, rows, pad), h, weight, scale=3.0)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert got[2][-3:].abs().max() == 0  # padded rows get no gradient


def test_chunked_cross_entropy_without_gradients_and_in_bf16():
    h, weight, labels = _inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h, weight, labels, 4), _reference(h, weight, labels))
    want = _loss_and_grads(lambda a, b: _reference(a, b, labels), h, weight)
    got = _loss_and_grads(lambda a, b: chunked_cross_entropy(a, b, labels, 4), h, weight)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for x, y in zip(got, want):
        torch.testing.assert_close(x.float(), y.float(), atol=2e-2, rtol=2e-2)
    only_h = h.clone().requires_grad_()
    chunked_cross_entropy(only_h, weight, labels, 4).backward()  # a weight without grad (frozen)
    torch.testing.assert_close(only_h.grad, got[1], atol=0, rtol=0)  # the same input gradient


def test_a_label_outside_the_vocabulary_is_never_a_finite_loss():
    h, weight, labels = _inputs()
    padding = torch.arange(weight.shape[0]) >= weight.shape[0] - 3
    for bad, want in ((weight.shape[0], "nan"), (-1, "nan"), (weight.shape[0] - 1, "inf")):  # the last: padding
        wrong = labels.clone()
        wrong[7] = bad
        loss = chunked_cross_entropy(h, weight, wrong, 5, padding)
        assert (torch.isnan(loss) if want == "nan" else torch.isinf(loss)), (bad, loss)


def test_a_mismatched_label_count_is_named():
    h, weight, labels = _inputs()
    with pytest.raises(ValueError, match="23 hidden rows but 22 labels"):
        chunked_cross_entropy(h, weight, labels[:-1], 4)


def _tp_loss_and_grads(vocab: int, rows: int):
    """Each of 2 ranks holds half of the vocabulary rows; the input gradient is summed over them (what the TP
    region's backward does in the model)."""
    import torch.distributed as dist

    h, weight, labels = _inputs(vocab=vocab)
    padding = torch.arange(vocab) >= vocab - 3
    rank, per_rank = dist.get_rank(), vocab // 2
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    h = h.clone().requires_grad_()
    weight_slice = weight[part].clone().requires_grad_()
    loss = chunked_cross_entropy(h, weight_slice, labels, rows, padding[part], rank * per_rank, dist.group.WORLD)
    loss.backward()
    dist.all_reduce(h.grad)
    whole = [torch.empty_like(weight_slice.grad) for _ in range(2)]
    dist.all_gather(whole, weight_slice.grad)
    return loss.detach(), h.grad, torch.cat(whole)


@pytest.mark.parametrize("rows", [4, 64])
def test_vocab_parallel_chunked_cross_entropy_equals_whole_logits(pool2, rows):
    vocab = 40
    h, weight, labels = _inputs(vocab=vocab)
    padding = torch.arange(vocab) >= vocab - 3
    want = _loss_and_grads(lambda a, b: _reference(a, b, labels, padding), h, weight)
    for got in pool2.run(_tp_loss_and_grads, vocab, rows):
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_fp16_gradients_are_scaled_before_the_cast():
    """With fp16 the upstream gradient (DeepSpeed's loss scale) multiplies the fp32 gradients before they become fp16,
    as with whole logits: the softmax of a many-token batch is below fp16's range until scaled."""
    h, weight, labels = _inputs(n=4096, vocab=40, dtype=torch.float16)
    scale = 2.0**16
    want = _loss_and_grads(lambda a, b: _reference(a.float(), b.float(), labels), h, weight, scale=scale)
    got = _loss_and_grads(lambda a, b: chunked_cross_entropy(a, b, labels, 1024), h, weight, scale=scale)
    assert got[1].dtype == got[2].dtype == torch.float16
    for x, y in zip(got[1:], want[1:]):
        x = x.float() / scale
        assert (x != 0).float().mean() > 0.99  # not flushed
        torch.testing.assert_close(x, y.float() / scale, atol=1e-3 * float(y.float().abs().max() / scale), rtol=1e-2)
