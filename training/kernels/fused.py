"""One autograd Function for every fused backend. A backend provides

    forward(u, x, v, bias, c0) -> (h, c)                         c: every state [B, S, D], saved for the backward
    backward(u, x, v, bias, c0, c, dh, dc_last) -> (du, dx, dv, dbias, dc0)

on contiguous tensors in the layout of `reference.check_shapes`. Saving the states costs one [B, S, D] tensor and
spares the backward a second pass over time; the gates are recomputed from them."""
from __future__ import annotations

import torch


class Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, u, x, v, bias, c0):
        u, x, v, bias, c0 = (t.contiguous() for t in (u, x, v, bias, c0))
        h, c = backend.forward(u, x, v, bias, c0)
        ctx.backend = backend
        ctx.save_for_backward(u, x, v, bias, c0, c)
        return h, c[:, -1].clone()

    @staticmethod
    def backward(ctx, dh, dc_last):
        u, x, v, bias, c0, c = ctx.saved_tensors
        du, dx, dv, dbias, dc0 = ctx.backend.backward(u, x, v, bias, c0, c, dh.contiguous(),
                                                      dc_last.to(c.dtype).contiguous())
        return None, du, dx, dv, dbias, dc0
