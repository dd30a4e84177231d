"""LoRA linear: y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ."""
from typing import Optional

import torch

from . import compute_dtype, empty_grad


def dropout_mask(shape, p: float, seed: int, device) -> Optional[torch.Tensor]:
    """Keep-mask of the LoRA-path dropout, regenerated from ``seed`` (never stored)."""
    if p == 0.0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def apply_dropout(x: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    return x if mask is None else x * mask / (1.0 - p)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, mask=None, dropout_p=0.0):
    """The spec, differentiable by autograd; ``mask`` is the dropout keep-mask or None."""
    y = x @ weight.T + scaling * ((apply_dropout(x, mask, dropout_p) @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x:[M,K] -> (y:[M,N] in x.dtype, u = drop(x)Aᵀ:[M,r] in the compute dtype)."""
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    mask = dropout_mask(x.shape, dropout_p, seed, x.device)
    u = apply_dropout(xc, mask, dropout_p) @ lora_A.to(ct).T
    # addmm folds the bias and the scaled low-rank term into the base GEMM's output buffer:
    # this is the CPU path users run, so it avoids two extra M×N temporaries.
    y = xc @ weight.to(ct).T if bias is None else torch.addmm(bias.to(ct), xc, weight.to(ct).T)
    y.addmm_(u, lora_B.to(ct).T, alpha=scaling)
    return y.to(x.dtype), u


def backward(g, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
             need_dx: bool, need_dW: bool, need_db: bool):
    """Gradients (dx, dA, dB, dW, db); the ones not needed come back empty."""
    ct = compute_dtype(x.dtype)
    gc, xc, A, B = g.to(ct), x.to(ct), lora_A.to(ct), lora_B.to(ct)
    mask = dropout_mask(x.shape, dropout_p, seed, x.device)
    dB = scaling * (gc.T @ u)
    v = scaling * (gc @ B)
    dA = v.T @ apply_dropout(xc, mask, dropout_p)
    dx = empty_grad(x)
    if need_dx:
        dx = (gc @ weight.to(ct) + apply_dropout(v @ A, mask, dropout_p)).to(x.dtype)
    dW = (gc.T @ xc).to(weight.dtype) if need_dW else empty_grad(weight)
    db = gc.sum(0).to(weight.dtype) if need_db else empty_grad(weight)
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype), dW, db
