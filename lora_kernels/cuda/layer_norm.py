"""LayerNorm on the compiled CUDA kernels (csrc/kernels/layer_norm.cu)."""
from typing import Optional

import torch

from ..reference import compute_dtype
from . import dense, ops, rows, rows_reason


def forward(x, weight, bias, eps, stats: bool = True):
    """x:[M,N] -> (y in x.dtype, mean:[M], rstd:[M] in the compute dtype). The kernel always
    writes mean and rstd (``stats=False`` is the Triton kernel's saving only)."""
    return ops().layer_norm_fwd_cuda(rows(x), dense(weight), dense(bias), float(eps))


def backward(g, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    """Gradients (dx, dγ, dβ); the ones not needed come back as empty placeholders."""
    ct = compute_dtype(x.dtype)
    return ops().layer_norm_bwd_cuda(dense(g), rows(x), dense(weight), mean.to(ct).contiguous(),
                                     rstd.to(ct).contiguous(), need_dx, need_dw, need_db)


def supports(x: torch.Tensor, *_) -> Optional[str]:
    return rows_reason("LayerNorm", x, "a row of zero features has no mean or variance to normalise by")
