"""The SRU++ elementwise recurrence as a plain PyTorch loop over time: the definition the fused kernels are checked
against, and the fallback when no kernel can be built.

Per hidden unit j and time step t (Lei et al., 2018 and 2021), with U holding per unit the candidate u_c, the forget
input u_f and the reset input u_r:

    f_t = sigmoid(u_f,t + v_f * c_{t-1} + b_f)
    r_t = sigmoid(u_r,t + v_r * c_{t-1} + b_r)
    c_t = f_t * c_{t-1} + (1 - f_t) * u_c,t
    h_t = r_t * c_t + (1 - r_t) * x_t                      (highway: x is the layer input)

Every unit is independent of the others, which is what lets tensor parallelism shard the hidden dimension.
"""
from __future__ import annotations

import torch


def check_shapes(u: torch.Tensor, x: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, c0: torch.Tensor) -> None:
    """The layout every implementation takes: u [B, S, 3, D] (candidate, forget, reset), x [B, S, D], v and bias
    [2, D] (forget row, reset row), c0 [B, D]."""
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"SRU recurrence: x must be [batch, seq > 0, hidden], got {tuple(x.shape)}")
    b, s, d = x.shape
    expected = {"u": (u, (b, s, 3, d)), "v": (v, (2, d)), "bias": (bias, (2, d)), "c0": (c0, (b, d))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"SRU recurrence: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def reference_recurrence(u: torch.Tensor, x: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, S, D] and the last state c_S [B, D]; autograd differentiates the loop."""
    check_shapes(u, x, v, bias, c0)
    u_c, u_f, u_r = u.unbind(2)
    (v_f, v_r), (b_f, b_r) = v, bias
    c, hs = c0, []
    for t in range(x.shape[1]):
        f = torch.sigmoid(u_f[:, t] + v_f * c + b_f)
        r = torch.sigmoid(u_r[:, t] + v_r * c + b_r)
        c = f * c + (1 - f) * u_c[:, t]
        hs.append(r * c + (1 - r) * x[:, t])
    return torch.stack(hs, dim=1), c
