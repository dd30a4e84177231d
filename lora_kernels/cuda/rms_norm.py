"""RMSNorm on the compiled CUDA kernels (csrc/kernels/rms_norm.cu)."""
from typing import Optional

import torch

from ..reference import compute_dtype
from . import dense, ops, rows, rows_reason


def forward(x, weight, eps, offset, stats: bool = True):
    """x:[M,N] -> (y in x.dtype, rstd:[M] in the compute dtype); ``stats=False`` (inference) skips
    rstd: None."""
    y, rstd = ops().rms_norm_fwd_cuda(rows(x), dense(weight), float(eps), float(offset), stats)
    return y, (rstd if stats else None)


def backward(g, x, weight, rstd, offset, need_dx: bool, need_dw: bool):
    """Gradients (dx, dγ); the ones not needed come back as empty placeholders."""
    ct = compute_dtype(x.dtype)
    return ops().rms_norm_bwd_cuda(dense(g), rows(x), dense(weight), rstd.to(ct).contiguous(), float(offset),
                                   need_dx, need_dw and weight is not None)


def supports(x: torch.Tensor, *_) -> Optional[str]:
    return rows_reason("RMSNorm", x, "a row of zero features has no mean square to normalise by")
