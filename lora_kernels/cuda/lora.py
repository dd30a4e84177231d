"""LoRA linear on the compiled CUDA kernels (csrc/kernels/lora*.cu). The dropout mask is the
kernels' own counter-based one, keyed on ``seed``: regenerated in the backward, never stored,
and not the reference's torch.Generator mask."""
from typing import Optional

import torch

from ..reference import compute_dtype
from . import dense, ops, rows, rows_reason


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x:[M,K] -> (y:[M,N] in x.dtype, u = drop(x)Aᵀ:[M,r] in the compute dtype)."""
    return ops().lora_linear_fwd_cuda(rows(x), rows(weight), dense(bias), dense(lora_A), dense(lora_B),
                                      float(scaling), float(dropout_p), int(seed))


def backward(g, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
             need_dx: bool, need_dW: bool, need_db: bool):
    """Gradients (dx, dA, dB, dW, db); the ones not needed come back empty."""
    u = u.to(compute_dtype(x.dtype)).contiguous()
    return ops().lora_linear_bwd_cuda(dense(g), rows(x), rows(weight), dense(lora_A), dense(lora_B), u,
                                      float(scaling), float(dropout_p), int(seed), need_dx, need_dW, need_db)


def supports(x: torch.Tensor, *_) -> Optional[str]:
    return rows_reason("LoRA", x, "the CUDA LoRA kernels need at least one input feature (K >= 1)")
