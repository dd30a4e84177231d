"""Symmetric InfoNCE on the compiled CUDA kernels (csrc/kernels/infonce_*.cu). logit_scale
and the loss gradient stay on the device: csrc/glue/infonce.cpp hands them to the kernels as one
accumulator-dtype value each, so no call synchronises with the host."""
from typing import Optional

import torch

from ..reference import compute_dtype
from . import ops, rows, rows_reason


def forward(image, text, logit_scale, lambda_, normalize):
    """-> (loss: 0-d, lse_row: [N], lse_col: [N]) in the compute dtype (as the reference)."""
    return ops().infonce_fwd_cuda(rows(image), rows(text), logit_scale, float(lambda_), bool(normalize))


def backward(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize,
             need_dimage: bool, need_dtext: bool, need_dscale: bool):
    """-> (d image, d text, d logit_scale); empty placeholders for those not needed."""
    ct = compute_dtype(image.dtype)
    return ops().infonce_bwd_cuda(gloss, rows(image), rows(text), logit_scale, lse_row.to(ct).contiguous(),
                                  lse_col.to(ct).contiguous(), float(lambda_), bool(normalize),
                                  need_dimage, need_dtext, need_dscale)


def supports(image: torch.Tensor, *_) -> Optional[str]:
    return rows_reason("InfoNCE", image, "the CUDA InfoNCE kernels need at least one feature per row (d >= 1)")


# One direction on a rectangular block (the distributed loss): the same tile kernels with a
# diagonal offset and no column statistics.

def rows_forward(queries, keys, logit_scale, offset, normalize):
    """-> (part: 0-d, lse: [m]) in the compute dtype (as reference.infonce.rows_forward)."""
    return ops().infonce_rows_fwd_cuda(rows(queries), rows(keys), logit_scale, int(offset), bool(normalize))


def rows_backward(gpart, queries, keys, logit_scale, lse, offset, normalize,
                  need_dqueries: bool, need_dkeys: bool, need_dscale: bool):
    """-> (d queries, d keys, d logit_scale); empty placeholders for those not needed."""
    return ops().infonce_rows_bwd_cuda(gpart, rows(queries), rows(keys), logit_scale,
                                       lse.to(compute_dtype(queries.dtype)).contiguous(), int(offset),
                                       bool(normalize), need_dqueries, need_dkeys, need_dscale)


rows_supports = supports
