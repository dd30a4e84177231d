"""Bottleneck adapter on the compiled CUDA kernels (csrc/kernels/adapter*.cu).
The activation travels by name; csrc/glue/adapter.cpp maps it onto lk::Activation (adapter.cuh),
whose order is reference.adapter.ACTIVATIONS."""
from typing import Optional

import torch

from ..reference import compute_dtype
from . import dense, ops, rows, rows_reason


def forward(x, w_down, b_down, w_up, b_up, activation, scale):
    """x:[M,K] -> (y:[M,K] in x.dtype, h = x W_dᵀ + b_d:[M,r] in the compute dtype)."""
    return ops().adapter_fwd_cuda(rows(x), dense(w_down), dense(b_down), dense(w_up), dense(b_up),
                                  activation, float(scale))


def backward(g, x, w_down, w_up, h, activation, scale, need_dx: bool, need_dbd: bool, need_dbu: bool):
    """Gradients (dx, dW_d, db_d, dW_u, db_u); the ones not needed come back empty."""
    h = h.to(compute_dtype(x.dtype)).contiguous()
    return ops().adapter_bwd_cuda(dense(g), rows(x), dense(w_down), dense(w_up), h, activation, float(scale),
                                  need_dx, need_dbd, need_dbu)


def supports(x: torch.Tensor, *_) -> Optional[str]:
    return rows_reason("adapter", x, "the CUDA adapter kernels need at least one feature per row (K >= 1)")
