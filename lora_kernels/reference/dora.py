"""DoRA linear, as PEFT computes it (peft/tuners/lora/dora.py, variants.py).

    x' = drop(x),  u = x' Aᵀ,  z = W0 x' + s·u Bᵀ,  c = m / ‖W0 + s·BA‖_row   (c detached)
    y  = W0 x + b + (c − 1)⊙W0 x' + c⊙s·u Bᵀ  =  W0 x − W0 x' + c⊙z + b

Without dropout (or in eval) x' = x and y = c⊙z + b. The row norms come from the low-rank
structure, never from an N×K temporary (W0 is read once, for W0 Aᵀ and ‖W0_n‖²):
    ‖W0_n + s·(BA)_n‖² = ‖W0_n‖² + 2s·Σ_j B[n,j](W0 Aᵀ)[n,j] + s²·((B (AAᵀ)) ⊙ B)[n,:].sum()
Statistics are kept in the compute dtype (fp32 for half inputs).
Backward, with gc = g⊙c, v = s·gc B:  dB = s·gcᵀu, dA = vᵀx', d m = Σ_rows g⊙z / ‖·‖,
dx = g W0 + drop'(g⊙(c−1) W0 + v A)  (= gc W0 + v A without dropout), dW0 = gᵀx + (g⊙(c−1))ᵀx', db = Σg.
"""
import torch

from . import compute_dtype, empty_grad
from .lora import apply_dropout, dropout_mask


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W0_n‖² per output row in the compute dtype: W0 is frozen, so a module may cache it."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=compute_dtype(weight.dtype)).square()


def row_norm(weight, lora_A, lora_B, scaling, w_sq=None):
    """‖W0 + s·BA‖ per output row [N], from the low-rank structure, in the compute dtype."""
    ct = compute_dtype(weight.dtype)
    a, b = lora_A.to(ct), lora_B.to(ct)
    sq = weight_sq_norm(weight) if w_sq is None else w_sq.to(ct)
    # [N, r] in the input dtype: an fp32 copy of a half W0 would be an N×K temporary
    wa = (weight @ lora_A.T).to(ct)
    cross = (b * wa).sum(1)
    low = ((b @ (a @ a.T)) * b).sum(1)             # ‖s·(BA)_n‖² / s²
    # Rounding can push a (near-)zero norm² below zero; the true value never is.
    return (sq + (2.0 * scaling) * cross + (scaling * scaling) * low).clamp_min(0.0).sqrt()


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, mask=None, dropout_p=0.0):
    """The spec, differentiable by autograd; ``mask`` is the dropout keep-mask or None."""
    norm = row_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)
    c = magnitude / norm.to(magnitude.dtype)
    xd = apply_dropout(x, mask, dropout_p)
    base_d = xd @ weight.T
    z = base_d + scaling * ((xd @ lora_A.T) @ lora_B.T)
    y = c * z if mask is None else x @ weight.T - base_d + c * z
    return y if bias is None else y + bias


def forward(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, dropout_p, seed, save_z):
    """x:[M,K] -> (y:[M,N] in x.dtype, u:[M,r], c:[N], 1/‖·‖:[N] in the compute dtype,
    z:[M,N] in x.dtype when ``save_z`` (for d magnitude) else empty)."""
    ct = compute_dtype(x.dtype)
    xc, w = x.to(ct), weight.to(ct)
    rnorm = row_norm(weight, lora_A, lora_B, scaling, w_sq).reciprocal()
    c = magnitude.to(ct) * rnorm
    mask = dropout_mask(x.shape, dropout_p, seed, x.device)
    xd = apply_dropout(xc, mask, dropout_p)
    u = xd @ lora_A.to(ct).T
    base_d = xd @ w.T
    if mask is None:  # in place: the CPU path users run keeps one M×N temporary
        z = base_d.addmm_(u, lora_B.to(ct).T, alpha=scaling)
        y = z * c
    else:
        z = torch.addmm(base_d, u, lora_B.to(ct).T, alpha=scaling)
        y = torch.addcmul(xc @ w.T - base_d, z, c)
    if bias is not None:
        y += bias.to(ct)
    return y.to(x.dtype), u, c, rnorm, (z.to(x.dtype) if save_z else empty_grad(x))


def backward(g, x, weight, lora_A, lora_B, u, c, rnorm, z, scaling, dropout_p, seed,
             need_dx: bool, need_dW: bool, need_db: bool, need_dm: bool, z_is_y: bool = False):
    """Gradients (dx, dA, dB, d magnitude, dW, db); the ones not needed come back empty.
    ``z_is_y``: ``z`` holds y = c⊙z (no bias, no dropout), so z = y / c."""
    ct = compute_dtype(x.dtype)
    gc_, xc, w, A, B = g.to(ct), x.to(ct), weight.to(ct), lora_A.to(ct), lora_B.to(ct)
    mask = dropout_mask(x.shape, dropout_p, seed, x.device)
    xd = apply_dropout(xc, mask, dropout_p)
    gc = gc_ * c
    dB = scaling * (gc.T @ u)
    v = scaling * (gc @ B)
    dA = v.T @ xd
    dm = empty_grad(weight)
    if need_dm:
        dm = ((gc_ * z.to(ct)).sum(0) * (rnorm / c if z_is_y else rnorm)).to(weight.dtype)
    dx = dW = empty_grad(x)
    if mask is None:
        if need_dx:
            dx = (gc @ w + v @ A).to(x.dtype)
        if need_dW:
            dW = (gc.T @ xc).to(weight.dtype)
    else:
        gm = gc - gc_  # g⊙(c − 1)
        if need_dx:
            dx = (gc_ @ w + apply_dropout(gm @ w + v @ A, mask, dropout_p)).to(x.dtype)
        if need_dW:
            dW = (gc_.T @ xc + gm.T @ xd).to(weight.dtype)
    if not need_dW:
        dW = empty_grad(weight)
    db = gc_.sum(0).to(weight.dtype) if need_db else empty_grad(weight)
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype), dm, dW, db
