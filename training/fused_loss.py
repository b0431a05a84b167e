"""The output layer and its cross entropy in one pass over chunks of tokens, never holding the whole logits.

The logits [tokens, vocab] are the largest activation of most models: 64 MiB at 2048 tokens and an 8k vocabulary, 4
GiB at 8k tokens and Llama 3's 128k, plus their gradient and, in bf16, their fp32 copy. Here the forward takes the
tokens a chunk at a time: the chunk's logits, its loss and at once its gradient (softmax minus one-hot), which the two
GEMMs of the input and weight gradients consume straight away. The logits are never stored; the backward only scales
the stored gradients (fp32) by the upstream gradient (a scalar: with fp16 the loss scale) over the number of tokens,
then casts them. Same numbers as logits followed by torch's cross entropy, to fp32 rounding.

Vocabulary-parallel (TP > 1): each rank holds a slice of the vocabulary. Per chunk one all_gather over TP of each
row's (max, sum of exponentials, target logit) gives every rank the full normalizer, as megatron's
`vocab_parallel_cross_entropy` does with three all-reduces over the whole logits. The input gradient is this rank's
part; the TP region the caller entered (copy_to_tp_region, or the sequence-parallel gather) sums it over TP.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _normalizer(stats: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-sum-exp, target logit, this slice's max, how many slices hold the label) per row, from this rank's [4, n]
    (max, sum of exp(logit - max), target logit or 0, 1 if its slice holds the label), combined over the TP group."""
    local_max = stats[0]
    if group is None or dist.get_world_size(group) == 1:
        return local_max + stats[1].log(), stats[2], local_max, stats[3]
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats, group=group)
    every = torch.stack(parts)  # [tp, 4, n]
    top = every[:, 0].amax(0)
    total = (every[:, 1] * (every[:, 0] - top).exp()).sum(0)
    return top + total.log(), every[:, 2].sum(0), local_max, every[:, 3].sum(0)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, padding, vocab_start, rows, group):
        n = h.shape[0]
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # gradients of the summed loss (softmax - one-hot, not yet / n) kept in fp32 until the backward scales them by
        # grad_loss / n: in fp16 the loss scale must multiply before the cast, or small entries would flush to zero
        grad_h = torch.empty_like(h, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        vocab_slice = weight.shape[0]
        for start in range(0, n, rows):
            h_c = h[start:start + rows]
            local = labels[start:start + rows] - vocab_start
            mine = (local >= 0) & (local < vocab_slice)
            local = local.clamp(0, vocab_slice - 1)[:, None]
            logits = (h_c @ weight.t()).float()
            if padding is not None:
                logits.masked_fill_(padding, float("-inf"))
            row_max = logits.amax(1)
            row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # a slice of padding only
            target = torch.where(mine, logits.gather(1, local).squeeze(1), 0.0)
            probs = logits.sub_(row_max[:, None]).exp_()  # in place: the chunk's exp(logit - max)
            lse, target, row_max, holders = _normalizer(
                torch.stack([row_max, probs.sum(1), target, mine.to(row_max.dtype)]), group)
            # a label outside the vocabulary makes the loss NaN (the step guard stops on it), never a finite guess
            losses[start:start + rows] = torch.where(holders == 1, lse - target, float("nan"))
            if not grads:
                continue
            probs.mul_((row_max - lse).exp()[:, None])  # softmax over the whole vocabulary
            probs.scatter_add_(1, local, torch.where(mine, -1.0, 0.0)[:, None])
            g = probs.to(h.dtype)
            fp32 = g.dtype == torch.float32
            if grad_h is not None:
                if fp32:
                    torch.mm(g, weight, out=grad_h[start:start + rows])
                else:
                    grad_h[start:start + rows] = g @ weight
            if grad_w is not None:
                if fp32:
                    grad_w.addmm_(g.t(), h_c)
                else:  # bf16 / fp16: each chunk's product accumulated in fp32
                    grad_w += g.t() @ h_c
        ctx.n, ctx.dtypes = n, (h.dtype, weight.dtype)
        ctx.grads = (grad_h, grad_w)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grads
        del ctx.grads  # the buffers are scaled in place and handed over: a second backward has nothing to use
        scale = grad_loss.float() / ctx.n
        return (None if grad_h is None else grad_h.mul_(scale).to(ctx.dtypes[0]),
                None if grad_w is None else grad_w.mul_(scale).to(ctx.dtypes[1]),
                None, None, None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int,
                          padding: torch.Tensor | None = None, vocab_start: int = 0, group=None) -> torch.Tensor:
    """Mean cross entropy of the logits `h @ weight.T` against `labels`, computed `rows` tokens at a time.

    h [n, d]; weight [V_slice, d], this rank's vocabulary rows from `vocab_start`; labels [n] ids in the whole
    vocabulary; padding [V_slice] bool, entries that get a logit of -inf; group: the TP group the vocabulary is split
    over (None: not split). A label outside the vocabulary gives a NaN loss (checked without a host sync); one on a
    padded entry an infinite one."""
    if h.shape[0] != labels.shape[0]:
        raise ValueError(f"chunked_cross_entropy: {h.shape[0]} hidden rows but {labels.shape[0]} labels")
    return _ChunkedCrossEntropy.apply(h, weight, labels, padding, vocab_start, rows, group)
