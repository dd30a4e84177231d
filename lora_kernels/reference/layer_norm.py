"""LayerNorm for LN-tuning: y = γ ⊙ (x − μ)·rstd + β over the last dimension."""
import torch

from . import compute_dtype, empty_grad


def layer_norm(x, weight, bias, eps=1e-5):
    """The spec, differentiable by autograd (two-pass statistics, biased variance)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def forward(x, weight, bias, eps, stats: bool = True):
    """x:[M,K] -> (y in x.dtype, mean:[M], rstd:[M] in the compute dtype, never half).
    ``stats=False`` says no backward will read mean and rstd; y needs them here anyway."""
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    # Shift by the row's first element before summing: when |mean| >> std the shifted values
    # are small and exact, so the variance keeps its digits (x + 1e4 in fp32).
    pivot = xc[:, :1]
    shifted_mean = (xc - pivot).mean(-1, keepdim=True)
    centered = (xc - pivot) - shifted_mean
    rstd = torch.rsqrt((centered * centered).mean(-1) + eps)
    mean = (pivot + shifted_mean)[:, 0]
    y = centered * rstd[:, None]
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype), mean, rstd


def backward(g, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    """Gradients (dx, dγ, dβ); only the requested ones are computed."""
    ct = compute_dtype(x.dtype)
    gc = g.to(ct)
    xhat = (x.to(ct) - mean[:, None]) * rstd[:, None]
    # γ, β and x share one dtype (the ops check it), so the grads come back in x.dtype.
    dw = (gc * xhat).sum(0).to(x.dtype) if need_dw else empty_grad(x)
    db = gc.sum(0).to(x.dtype) if need_db else empty_grad(x)
    dx = empty_grad(x)
    if need_dx:
        wg = gc if weight is None else gc * weight.to(ct)
        c1 = wg.mean(-1, keepdim=True)
        c2 = (wg * xhat).mean(-1, keepdim=True)
        dx = (rstd[:, None] * (wg - c1 - xhat * c2)).to(x.dtype)
    return dx, dw, db
