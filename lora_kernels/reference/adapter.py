"""Houlsby bottleneck adapter: y = x + s·(act(x W_dᵀ + b_d) W_uᵀ + b_u)."""
import math

import torch

from . import compute_dtype, empty_grad

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * h * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3)))
    if activation == "relu":
        return torch.clamp_min(h, 0.0)
    if activation == "silu":
        return h * torch.sigmoid(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def act_grad(h: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(h) / dh, exact (no approximation of the approximation)."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
        return cdf + h * pdf
    if activation == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "silu":
        sig = torch.sigmoid(h)
        return sig * (1.0 + h * (1.0 - sig))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def adapter(x, w_down, b_down, w_up, b_up, activation="gelu", scale=1.0):
    """The spec, differentiable by autograd."""
    h = x @ w_down.T
    if b_down is not None:
        h = h + b_down
    z = act(h, activation) @ w_up.T
    if b_up is not None:
        z = z + b_up
    return x + scale * z


def forward(x, w_down, b_down, w_up, b_up, activation, scale):
    """x:[M,K] -> (y:[M,K] in x.dtype, h = x W_dᵀ + b_d:[M,r] in the compute dtype)."""
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    h = xc @ w_down.to(ct).T
    if b_down is not None:
        h = h + b_down.to(ct)
    z = act(h, activation) @ w_up.to(ct).T
    if b_up is not None:
        z = z + b_up.to(ct)
    return (xc + scale * z).to(x.dtype), h


def backward(g, x, w_down, w_up, h, activation, scale,
             need_dx: bool, need_dbd: bool, need_dbu: bool):
    """Gradients (dx, dW_d, db_d, dW_u, db_u); the ones not needed come back empty."""
    ct = compute_dtype(x.dtype)
    gc, xc = g.to(ct), x.to(ct)
    dz = scale * gc
    dWu = dz.T @ act(h, activation)
    dh = (dz @ w_up.to(ct)) * act_grad(h, activation)
    dWd = dh.T @ xc
    dbd = dh.sum(0).to(w_down.dtype) if need_dbd else empty_grad(w_down)
    dbu = dz.sum(0).to(w_up.dtype) if need_dbu else empty_grad(w_up)
    dx = (gc + dh @ w_down.to(ct)).to(x.dtype) if need_dx else empty_grad(x)
    return dx, dWd.to(w_down.dtype), dbd, dWu.to(w_up.dtype), dbu
