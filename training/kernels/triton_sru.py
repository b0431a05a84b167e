"""The fused recurrence for GPUs, in Triton: one program per (batch row, block of hidden units) walks the sequence,
keeping the state in registers and computing in fp32 whatever the input dtype (bf16 models keep fp32 states). The
backward walks the sequence in reverse and recomputes the gates from the saved states instead of storing them.

Importing this module needs `triton`; `triton_kernel()` returns None when it is missing. With TRITON_INTERPRET=1 the
same kernels run on CPU tensors, which is how tests/test_srupp.py checks them on machines without a GPU.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK = 128

if triton is not None:

    @triton.jit
    def _forward(u_ptr, x_ptr, v_ptr, bias_ptr, c0_ptr, h_ptr, c_ptr, S, D, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = j < D
        v_f = tl.load(v_ptr + j, mask=mask, other=0.0).to(tl.float32)
        v_r = tl.load(v_ptr + D + j, mask=mask, other=0.0).to(tl.float32)
        b_f = tl.load(bias_ptr + j, mask=mask, other=0.0).to(tl.float32)
        b_r = tl.load(bias_ptr + D + j, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c0_ptr + b * D + j, mask=mask, other=0.0).to(tl.float32)
        for t in range(S):
            row = b * S + t
            u_c = tl.load(u_ptr + row * 3 * D + j, mask=mask, other=0.0).to(tl.float32)
            u_f = tl.load(u_ptr + row * 3 * D + D + j, mask=mask, other=0.0).to(tl.float32)
            u_r = tl.load(u_ptr + row * 3 * D + 2 * D + j, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + row * D + j, mask=mask, other=0.0).to(tl.float32)
            f = tl.sigmoid(u_f + v_f * c + b_f)
            r = tl.sigmoid(u_r + v_r * c + b_r)
            c = f * c + (1.0 - f) * u_c
            h = r * c + (1.0 - r) * x
            tl.store(c_ptr + row * D + j, c, mask=mask)
            tl.store(h_ptr + row * D + j, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_step(u_ptr, x_ptr, dh_ptr, du_ptr, dx_ptr, row, D, j, mask, prev, cur, grad_c,
                       v_f, v_r, b_f, b_r):
        """One reverse time step: stores du and dx of `row`, returns dL/dc_{t-1} and the forget and reset
        pre-activation gradients (for the v and bias sums). prev = c_{t-1}, cur = c_t, grad_c = dL/dc_t from later
        steps."""
        u_c = tl.load(u_ptr + row * 3 * D + j, mask=mask, other=0.0).to(tl.float32)
        u_f = tl.load(u_ptr + row * 3 * D + D + j, mask=mask, other=0.0).to(tl.float32)
        u_r = tl.load(u_ptr + row * 3 * D + 2 * D + j, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * D + j, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * D + j, mask=mask, other=0.0).to(tl.float32)
        f = tl.sigmoid(u_f + v_f * prev + b_f)
        r = tl.sigmoid(u_r + v_r * prev + b_r)
        g = grad_c + dh * r
        dr = dh * (cur - x) * r * (1.0 - r)
        df = g * (prev - u_c) * f * (1.0 - f)
        tl.store(du_ptr + row * 3 * D + j, (g * (1.0 - f)).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + row * 3 * D + D + j, df.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + row * 3 * D + 2 * D + j, dr.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + row * D + j, (dh * (1.0 - r)).to(dx_ptr.dtype.element_ty), mask=mask)
        return g * f + df * v_f + dr * v_r, df, dr

    @triton.jit
    def _backward(u_ptr, x_ptr, v_ptr, bias_ptr, c0_ptr, c_ptr, dh_ptr, dc_last_ptr,
                  du_ptr, dx_ptr, dparam_ptr, dc0_ptr, S, D, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = j < D
        v_f = tl.load(v_ptr + j, mask=mask, other=0.0).to(tl.float32)
        v_r = tl.load(v_ptr + D + j, mask=mask, other=0.0).to(tl.float32)
        b_f = tl.load(bias_ptr + j, mask=mask, other=0.0).to(tl.float32)
        b_r = tl.load(bias_ptr + D + j, mask=mask, other=0.0).to(tl.float32)
        grad_c = tl.load(dc_last_ptr + b * D + j, mask=mask, other=0.0).to(tl.float32)
        acc_vf = tl.zeros([BLOCK], dtype=tl.float32)
        acc_vr = tl.zeros([BLOCK], dtype=tl.float32)
        acc_bf = tl.zeros([BLOCK], dtype=tl.float32)
        acc_br = tl.zeros([BLOCK], dtype=tl.float32)
        cur = tl.load(c_ptr + (b * S + S - 1) * D + j, mask=mask, other=0.0)
        for i in range(S - 1):  # t = S-1 .. 1: c_{t-1} is a saved state
            row = b * S + S - 1 - i
            prev = tl.load(c_ptr + (row - 1) * D + j, mask=mask, other=0.0)
            grad_c, df, dr = _backward_step(u_ptr, x_ptr, dh_ptr, du_ptr, dx_ptr, row, D, j, mask, prev, cur,
                                            grad_c, v_f, v_r, b_f, b_r)
            acc_vf += df * prev
            acc_vr += dr * prev
            acc_bf += df
            acc_br += dr
            cur = prev
        prev = tl.load(c0_ptr + b * D + j, mask=mask, other=0.0).to(tl.float32)  # t = 0: c_{-1} = c0
        grad_c, df, dr = _backward_step(u_ptr, x_ptr, dh_ptr, du_ptr, dx_ptr, b * S, D, j, mask, prev, cur,
                                        grad_c, v_f, v_r, b_f, b_r)
        tl.store(dc0_ptr + b * D + j, grad_c.to(dc0_ptr.dtype.element_ty), mask=mask)
        out = dparam_ptr + b * 4 * D + j
        tl.store(out, acc_vf + df * prev, mask=mask)
        tl.store(out + D, acc_vr + dr * prev, mask=mask)
        tl.store(out + 2 * D, acc_bf + df, mask=mask)
        tl.store(out + 3 * D, acc_br + dr, mask=mask)


class TritonKernel:
    """forward/backward on contiguous tensors (the contract of `fused.Recurrence`); states are saved in fp32."""

    def forward(self, u, x, v, bias, c0):
        b, s, d = x.shape
        h = torch.empty_like(x)
        c = torch.empty((b, s, d), dtype=torch.float32, device=x.device)
        _forward[(b, triton.cdiv(d, BLOCK))](u, x, v, bias, c0, h, c, s, d, BLOCK=BLOCK)
        return h, c

    def backward(self, u, x, v, bias, c0, c, dh, dc_last):
        b, s, d = x.shape
        du, dx, dc0 = torch.empty_like(u), torch.empty_like(x), torch.empty_like(c0)
        dparam = torch.empty((b, 4, d), dtype=torch.float32, device=x.device)
        _backward[(b, triton.cdiv(d, BLOCK))](u, x, v, bias, c0, c, dh, dc_last, du, dx, dparam, dc0, s, d,
                                               BLOCK=BLOCK)
        dsum = dparam.sum(0)
        return du, dx, dsum[:2].to(v.dtype), dsum[2:].to(bias.dtype), dc0


def triton_kernel() -> TritonKernel | None:
    return None if triton is None else TritonKernel()


def supports(x: torch.Tensor) -> bool:
    """CUDA tensors, or any tensor under the Triton interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
