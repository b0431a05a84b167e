"""Elementwise steps after a fused projection, with backwards that write the projection's gradient in one buffer.

Splitting a fused output (`gate_up.chunk(2)`, `qkv.split(...)`) makes autograd concatenate the pieces' gradients
in the backward: a full copy of the projection's output gradient per layer, which separate projections (as in
transformers' Llama) never pay. These functions take the fused output whole and write each piece's gradient
straight into its slice of one buffer (`out=` into strided views). The rotary form also avoids the forward's
rotate-half concatenation. Plain torch ops: they run on any device and dtype and trace under torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate_up, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate_up, activated = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused [..., 2 x ffn] output [gate | up] of a gate+up projection."""
    return _SwiGLU.apply(gate_up)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """out = x * cos + sign * rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] and the angles' halves equal
    (cos = [c, c], sin = [s, s], as `Rotary.angles` builds them): sign -1 is the inverse rotation, the backward."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s, value=sign)


class _HeadsRotated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, widths: tuple[int, ...],
                rotated: tuple[bool, ...], head_dim: int):
        ctx.save_for_backward(cos, sin)
        ctx.widths, ctx.rotated, ctx.head_dim = widths, rotated, head_dim
        b, s, _ = projected.shape
        outputs = []
        for piece, width, rotate in zip(projected.split(widths, dim=-1), widths, rotated):
            heads = piece.view(b, s, width // head_dim, head_dim).transpose(1, 2)  # s may be 0: no -1
            if rotate:
                out = torch.empty_like(heads)
                _rotate_into(out, heads, cos, sin, 1.0)
                heads = out
            outputs.append(heads)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        cos, sin = ctx.saved_tensors
        b, _, s, _ = next(g for g in grads if g is not None).shape
        grad_projected = grads[0].new_empty(b, s, sum(ctx.widths))
        for slot, width, grad, rotate in zip(grad_projected.split(ctx.widths, dim=-1), ctx.widths, grads, ctx.rotated):
            slot_heads = slot.view(b, s, width // ctx.head_dim, ctx.head_dim).transpose(1, 2)
            if grad is None:
                slot_heads.zero_()
            elif rotate:
                _rotate_into(slot_heads, grad, cos, sin, -1.0)
            else:
                slot_heads.copy_(grad)
        return grad_projected, None, None, None, None, None


def heads_rotated(projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, widths: tuple[int, ...],
                  rotated: tuple[bool, ...], head_dim: int) -> tuple[torch.Tensor, ...]:
    """The pieces of a fused projection [b, s, sum(widths)] as [b, heads, s, head_dim] each, the ones marked in
    `rotated` turned by the rotary angles (`Rotary.angles`: [s, hd] or [b, 1, s, hd])."""
    return _HeadsRotated.apply(projected, cos, sin, widths, rotated, head_dim)
