"""Many LoRA adapters in one batch: y_m = x_m Wᵀ + b + s_i·(drop(x_m) A_iᵀ) B_iᵀ, i = adapter_ids[m].

Layout (the spec every backend follows):
  * lora_A [n, r, K], lora_B [n, N, r], scalings [n]: adapter i is (lora_A[i], lora_B[i],
    scalings[i]). Adapters of rank r_i < r are zero-padded: lora_A[i, r_i:] = 0 and
    lora_B[i, :, r_i:] = 0. The padding changes nothing in y, and the padded entries get exactly
    zero gradient (dA's pad rows are s·(g B_pad)ᵀ x = 0, dB's pad columns s·gᵀ(x A_padᵀ) = 0), so
    they stay zero under any gradient-based optimiser.
  * adapter_ids [M] (int32/int64): row m uses adapter adapter_ids[m]; −1 means the base layer only.
  * scalings are applied in the compute dtype (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64) and
    receive no gradient, as lora_linear's float ``scaling``.
Dropout: one keep-mask over the whole x [M, K], regenerated from ``seed`` exactly as
``reference.lora`` does (``dropout_mask(x.shape, p, seed)``), whatever the adapters. So with the
same seed, row m equals row m of ``lora_linear(x, weight, bias, lora_A[i], lora_B[i], scalings[i])``
on the whole x, adapter i = adapter_ids[m] (on each backend: every backend keeps its own mask
generator for both ops). u = drop(x)A_iᵀ is kept per row, [M, r], zero on base-only rows.
"""
import torch

from . import compute_dtype, empty_grad
from .lora import apply_dropout, dropout_mask


def _rows_of(adapter_ids, n):
    """(adapter, its row indices) for every adapter that owns at least one row."""
    for i in range(n):
        rows = (adapter_ids == i).nonzero().squeeze(1)
        if rows.numel():
            yield i, rows


def lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, mask=None, dropout_p=0.0):
    """The spec, differentiable by autograd (x [M, K]); ``mask`` is the dropout keep-mask or None."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    xd = apply_dropout(x, mask, dropout_p)
    for i, rows in _rows_of(adapter_ids, lora_A.shape[0]):
        low = scalings[i].to(x.dtype) * ((xd[rows] @ lora_A[i].T) @ lora_B[i].T)
        y = y.index_add(0, rows, low)
    return y


def forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, seed):
    """x:[M,K] -> (y:[M,N] in x.dtype, u = drop(x)A_iᵀ:[M,r] in the compute dtype, 0 on base rows)."""
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    mask = dropout_mask(x.shape, dropout_p, seed, x.device)
    xd = apply_dropout(xc, mask, dropout_p)
    y = xc @ weight.to(ct).T if bias is None else torch.addmm(bias.to(ct), xc, weight.to(ct).T)
    u = xc.new_zeros(x.shape[0], lora_A.shape[1])
    s = scalings.to(ct)
    for i, rows in _rows_of(adapter_ids, lora_A.shape[0]):
        u[rows] = xd[rows] @ lora_A[i].to(ct).T
        y.index_add_(0, rows, s[i] * (u[rows] @ lora_B[i].to(ct).T))
    return y.to(x.dtype), u


def backward(g, x, weight, lora_A, lora_B, u, scalings, adapter_ids, dropout_p, seed,
             need_dx: bool, need_dW: bool, need_db: bool):
    """Gradients (dx, dA, dB, dW, db): dB_i = s_i·g_iᵀu_i, v_i = s_i·g_i B_i, dA_i = v_iᵀ drop(x_i)
    over the rows of adapter i; dx = gW + drop'(v A_id). The ones not needed come back empty."""
    ct = compute_dtype(x.dtype)
    gc, xc = g.to(ct), x.to(ct)
    mask = dropout_mask(x.shape, dropout_p, seed, x.device)
    xd = apply_dropout(xc, mask, dropout_p)
    s = scalings.to(ct)
    dA = torch.zeros(lora_A.shape, dtype=ct, device=x.device)
    dB = torch.zeros(lora_B.shape, dtype=ct, device=x.device)
    low = torch.zeros_like(xc)  # v A_id per row, before dropout's backward
    for i, rows in _rows_of(adapter_ids, lora_A.shape[0]):
        gi = gc[rows]
        dB[i] = s[i] * (gi.T @ u[rows])
        v = s[i] * (gi @ lora_B[i].to(ct))
        dA[i] = v.T @ xd[rows]
        low[rows] = v @ lora_A[i].to(ct)
    dx = empty_grad(x)
    if need_dx:
        dx = (gc @ weight.to(ct) + apply_dropout(low, mask, dropout_p)).to(x.dtype)
    dW = (gc.T @ xc).to(weight.dtype) if need_dW else empty_grad(weight)
    db = gc.sum(0).to(weight.dtype) if need_db else empty_grad(weight)
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype), dW, db
