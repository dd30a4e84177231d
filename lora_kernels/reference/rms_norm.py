"""RMSNorm for LN-tuning of LLaMA-family models: y = x·rstd·(offset + γ), rstd = 1/√(mean(x²) + eps).

``offset`` is 0 for LLaMA/Mistral/Qwen/Phi-3/T5 and 1 for Gemma, whose γ stores the scale minus one.
Without a weight the output is x·rstd (torch.nn.RMSNorm(elementwise_affine=False)).
"""
import torch

from . import compute_dtype, empty_grad


def rms_norm(x, weight, eps=1e-6, offset=0.0):
    """The spec, differentiable by autograd."""
    y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * (offset + weight)


def forward(x, weight, eps, offset, stats: bool = True):
    """x:[M,K] -> (y in x.dtype, rstd:[M] in the compute dtype, never half): the statistics in
    fp32 (fp64 for fp64) and a single rounding of y to x's dtype. ``stats=False`` says no backward
    will read rstd; y needs it here anyway."""
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
    y = xc * rstd[:, None]
    if weight is not None:
        y = y * (offset + weight.to(ct))
    return y.to(x.dtype), rstd


def backward(g, x, weight, rstd, offset, need_dx: bool, need_dw: bool):
    """Gradients (dx, dγ); only the requested ones are computed. With x̂ = x·rstd and
    s = offset + γ: dγ = Σ_rows g⊙x̂, dx = rstd·(s⊙g − x̂·mean(s⊙g⊙x̂))."""
    ct = compute_dtype(x.dtype)
    gc = g.to(ct)
    xhat = x.to(ct) * rstd[:, None]
    dw = (gc * xhat).sum(0).to(x.dtype) if need_dw else empty_grad(x)
    dx = empty_grad(x)
    if need_dx:
        sg = gc if weight is None else gc * (offset + weight.to(ct))
        c2 = (sg * xhat).mean(-1, keepdim=True)
        dx = (rstd[:, None] * (sg - xhat * c2)).to(x.dtype)
    return dx, dw
