"""Symmetric InfoNCE (CLIP loss) in Triton: tiled over S = c·I Tᵀ, O(N·d) memory, deterministic.

Forward: one sweep over the S tiles computes both the row and the column log-sum-exp. A grid
of R_SPLIT × C_SPLIT programs partitions the tile grid; each program keeps its rows'
running (max, sum) in registers and owns one partial row of column statistics in memory, so
no two programs ever write the same element and the partials are combined in a fixed order.

Backward: the rows are processed in stripes of R rows. For a stripe, one kernel recomputes its
S tiles once and writes Ĝ = λ(P_row − Id) + (1−λ)(P_col − Id) for the stripe (R × N with
R ≤ 1024, so O(N) whatever the batch), plus the row/column sums of Ĝ⊙S/c that give
d logit_scale and the normalisation's projection; then two GEMMs give dI for the stripe's rows (complete) and add the stripe's
share to dT (accumulated in fp32, in stripe order). No atomics anywhere.

The tile kernels take the number of rows, of columns and (where the diagonal matters) a
diagonal offset, so that a rectangular block of local rows against gathered columns can reuse
them; the LSE/loss reduction (_infonce_lse_kernel) is the square case's.
"""
import math
from typing import Optional

import torch
import triton.language as tl

from ..reference import compute_dtype
from . import _common
from .infonce_configs import bwd_tile as _bwd_tile, fwd as _fwd, gemm as _gemm
from .infonce_kernels import (_infonce_bwd_finish_kernel, _infonce_lse_kernel, _infonce_rows_kernel,
                              _infonce_sum_kernel)


_INTERP = _common.INTERPRET


# What the interpreter runs instead of a tuned config. Its cost is per operation, not per
# element, so blocks are as large as still lets the test shapes (N = 300, d = 64) cross tile,
# k-chunk, split and stripe boundaries.
_INTERP_TILE = {"BK": 32}
_INTERP_GEMM = {"BM": 64, "BN": 64, "BK": 32}
_K_GRANULE = 32 if _INTERP else 64   # split-k chunks are multiples of every BK candidate
_ROW_BLOCK = 128 if _INTERP else 32  # rows per program of the O(N·d) row-wise kernels


def _tile_block(image, text) -> int:
    """BM = BN of the S tiles (fixed: the partial buffers' shapes depend on it). fp32 with misaligned
    rows (d or a row stride not a multiple of 16) takes 64: at 128 its tile kernels (CUDA-core dots,
    element-wise loads) spilled 64-640 B a thread in sm_90 builds (infonce_configs.py)."""
    if _INTERP:
        return 64
    if image.dtype == torch.float64:
        return 32
    ints = dict(d=image.shape[1], si=image.stride(0), st=text.stride(0))
    return 64 if image.dtype == torch.float32 and _common.misaligned(ints, ints) else 128


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _common.sm_count(device)


def _acc_tl(ct: torch.dtype):
    return tl.float64 if ct == torch.float64 else tl.float32


def _tile_args(dtype):
    return dict(UPCAST=_common.upcast_bf16_dot(dtype), PREC=_common.input_precision(dtype))


def _rows(image, text, logit_scale, normalize, with_diag, ct, offset=0):
    """Inverse row norms of image and of text rows offset .. offset + m (when normalising),
    and the diagonal S_i,i+offset (when asked)."""
    n, d = image.shape
    dev = image.device
    rinv_i = _common.empty((n,), ct, dev) if normalize else None
    rinv_t = _common.empty((n,), ct, dev) if normalize else None
    diag = _common.empty((n,), ct, dev) if with_diag else None
    dummy = rinv_i if rinv_i is not None else diag
    br, bd = _ROW_BLOCK, max(16, min(128, _common.next_pow2(d)))
    _infonce_rows_kernel[(_common.cdiv(n, br),)](
        image, text, logit_scale, rinv_i if normalize else dummy, rinv_t if normalize else dummy,
        diag if with_diag else dummy, n, d, offset, image.stride(0), image.stride(1),
        text.stride(0), text.stride(1), NORMALIZE=normalize, WITH_DIAG=with_diag, ACC=_acc_tl(ct),
        BR=br, BD=bd, num_warps=4)
    return rinv_i, rinv_t, diag


def _inverse_norms(image, text, logit_scale, normalize, ct):
    """1/‖I_i‖ [M] and 1/‖T_j‖ [NC] for normalize (else None): one pass when M = NC."""
    if not normalize:
        return None, None
    if image.shape[0] == text.shape[0]:
        return _rows(image, text, logit_scale, True, False, ct)[:2]
    return (_rows(image, image, logit_scale, True, False, ct)[0],
            _rows(text, text, logit_scale, True, False, ct)[0])


def _sum(part, out, logit_scale, gloss, n, dscale, ct):
    _infonce_sum_kernel[(1,)](part, out, logit_scale, gloss if gloss is not None else part,
                              part.numel(), n, DSCALE=dscale, ACC=_acc_tl(ct), BLOCK=128 if _INTERP else 1024)


def _splits(m, nc, d, itemsize, csize, bm, device):
    """Row × column splits of the forward tile grid: enough programs to fill the GPU, and no
    more partial rows of (max, sum) than about one input's worth of memory."""
    row_blocks, col_blocks = _common.cdiv(m, bm), _common.cdiv(nc, bm)
    if _INTERP:
        return min(row_blocks, 3), min(col_blocks, 2)
    budget = max(8, d * itemsize // (2 * csize))
    r_split = max(1, min(row_blocks, _num_sms(device), budget))
    c_split = max(1, min(col_blocks, budget, _num_sms(device) // r_split))
    return r_split, c_split


def forward(image, text, logit_scale, lambda_, normalize):
    """-> (loss: 0-d, lse_row: [N], lse_col: [N]) in the compute dtype (as the reference)."""
    _check(image, text, logit_scale)
    return _forward(image, text, logit_scale, lambda_, normalize, 0, True)


def rows_forward(queries, keys, logit_scale, offset, normalize):
    """One direction on a rectangular block (reference.infonce.rows_forward): -> (part, lse [m])."""
    _check(queries, keys, logit_scale, square=False)
    part, lse, _ = _forward(queries, keys, logit_scale, 1.0, normalize, offset, False)
    return part, lse


def _forward(image, text, logit_scale, lambda_, normalize, offset, cols):
    """S = c·I Tᵀ with I [M, d], T [NC, d]; cols: the symmetric loss (M = NC, offset 0), else
    one direction, Σᵢ (lse_row_i − S_i,i+offset) / NC. Returns (loss, lse_row, lse_col or None)."""
    m, d = image.shape
    nc = text.shape[0]
    ct = compute_dtype(image.dtype)
    dev = image.device
    if m == 0:
        return torch.zeros((), dtype=ct, device=dev), image.new_empty(0, dtype=ct), image.new_empty(0, dtype=ct)
    acc = _acc_tl(ct)
    if m == nc:  # offset is 0: one pass gives the norms and the diagonal
        rinv_i, rinv_t, diag = _rows(image, text, logit_scale, normalize, True, ct)
    else:
        diag = _rows(image, text, logit_scale, normalize, True, ct, offset)[2]
        rinv_i, rinv_t = _inverse_norms(image, text, logit_scale, normalize, ct)
    rinv_i = rinv_i if normalize else diag
    rinv_t = rinv_t if normalize else diag

    bm = _tile_block(image, text)
    r_split, c_split = _splits(m, nc, d, image.element_size(), torch.finfo(ct).bits // 8, bm, dev)
    row_m, row_l = (_common.empty((c_split, m), ct, dev) for _ in range(2))
    col_m, col_l = (_common.empty((r_split, nc), ct, dev) if cols else row_m for _ in range(2))
    extra = dict(_INTERP_TILE) if _INTERP else {}
    _fwd[(r_split, c_split)](
        image, text, logit_scale, rinv_i, rinv_t, row_m, row_l, col_m, col_l, m, nc, d,
        image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        NORMALIZE=normalize, COLS=cols, ACC=acc, BM=bm, BN=bm, **_tile_args(image.dtype), **extra)

    block = 128 if _INTERP else 1024
    lse_row = _common.empty((m,), ct, dev)
    lse_col = _common.empty((nc,), ct, dev) if cols else None
    part = _common.empty((_common.cdiv(m, block),), ct, dev)
    _infonce_lse_kernel[(_common.cdiv(m, block),)](
        row_m, row_l, col_m, col_l, diag, lse_row, lse_col if cols else lse_row, part, m, c_split, r_split,
        *_common.split_fp32(lambda_), COLS=cols, ACC=acc, BLOCK=block, num_warps=4)
    loss = _common.empty((), ct, dev)
    _sum(part, loss, logit_scale, None, nc, False, ct)
    return loss, lse_row, lse_col


def _stripe_rows(n, bm):
    """Rows R per backward stripe (the Ĝ buffer is R × N). Each stripe re-reads and re-writes
    the fp32 dT accumulator (8·N·d bytes) for 6·R·N·d FLOPs: R = 1024 keeps that at 768
    FLOP/byte, well above the H100's ~260, while the buffer stays at 2 KiB per column,
    no more than the inputs themselves for d >= 512."""
    r = 2 * bm if _INTERP else 1024
    return min(r, _common.cdiv(n, bm) * bm)


def _k_splits(k, tiles, device):
    """Split-k for the dI GEMM, whose output (stripe rows × d) has few tiles."""
    if _INTERP:
        want = 2
    else:
        want = max(1, min(_common.cdiv(2 * _num_sms(device), tiles), _common.cdiv(k, 1024)))
    per = _common.cdiv(_common.cdiv(k, want), _K_GRANULE) * _K_GRANULE
    return _common.cdiv(k, per), per


def _gemm_launch(a, a_strides, b, b_strides, scale, out, out_strides, m, n, k, n_split, k_per, accumulate, dtype):
    extra = dict(_INTERP_GEMM) if _INTERP else {}

    def grid(meta):
        return (_common.cdiv(m, meta["BM"]), _common.cdiv(n, meta["BN"]), n_split)

    _gemm[grid](a, b, scale if scale is not None else out, out, m, n, k, k_per,
                *a_strides, *b_strides, *out_strides, int(accumulate),
                HAS_SCALE=scale is not None, **_tile_args(dtype), **extra)


def backward(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize,
             need_dimage: bool, need_dtext: bool, need_dscale: bool):
    """-> (d image, d text, d logit_scale); empty placeholders for those not needed."""
    _check(image, text, logit_scale)
    return _backward(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize, 0, True,
                     need_dimage, need_dtext, need_dscale)


def rows_backward(gpart, queries, keys, logit_scale, lse, offset, normalize,
                  need_dqueries: bool, need_dkeys: bool, need_dscale: bool):
    """Gradients of ``rows_forward``'s part: (d queries, d keys, d logit_scale)."""
    _check(queries, keys, logit_scale, square=False)
    return _backward(gpart, queries, keys, logit_scale, lse, None, 1.0, normalize, offset, False,
                     need_dqueries, need_dkeys, need_dscale)


def _backward(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize, offset, cols,
              need_dimage, need_dtext, need_dscale):
    """I [m, d] against T [n, d]: stripes of rows of Ĝ (n columns each) feed the dI and dT GEMMs."""
    m, d = image.shape
    n = text.shape[0]
    ct = compute_dtype(image.dtype)
    dev = image.device
    acc = _acc_tl(ct)
    di = _common.empty(image.shape, image.dtype, dev) if need_dimage else image.new_empty(0)
    dt = _common.empty(text.shape, text.dtype, dev) if need_dtext else text.new_empty(0)
    dc = _common.empty(logit_scale.shape, logit_scale.dtype, dev) if need_dscale else logit_scale.new_empty(0)
    if m == 0 or not (need_dimage or need_dtext or need_dscale):
        for grad, needed in ((di, need_dimage), (dt, need_dtext), (dc, need_dscale)):
            if needed:
                grad.zero_()
        return di, dt, dc
    gloss = gloss.reshape(1)
    lse_row = lse_row.to(ct).contiguous()
    lse_col = lse_col.to(ct).contiguous() if cols else lse_row  # never read without cols
    if normalize:
        rinv_i, rinv_t = _inverse_norms(image, text, logit_scale, True, ct)
    else:
        rinv_i = rinv_t = lse_row   # never read

    bm = _tile_block(image, text)
    stripe = _stripe_rows(m, bm)
    n_cb = _common.cdiv(n, bm)
    n_slots = stripe // bm
    gamma = float(2.0 ** min(14, int(math.log2(n))))
    store_h = need_dimage or need_dtext
    rowsum = normalize and need_dimage
    colsum = need_dscale or (normalize and need_dtext)

    h = _common.empty((stripe, n), image.dtype, dev) if store_h else lse_row
    rho_part = _common.empty((n_cb, stripe), ct, dev) if rowsum else lse_row
    sig_part = _common.empty((n_slots, n), ct, dev) if colsum else lse_row
    if need_dimage:
        tiles = _common.cdiv(stripe, 128) * _common.cdiv(d, 128)
        v_split, k_per = _k_splits(n, tiles, dev)
        v = _common.empty((v_split, stripe, d), ct, dev)
    if need_dtext:
        # dT accumulates over stripes in fp32 (fp64): straight into dT when it has that dtype.
        w = dt if text.dtype == ct else _common.empty((n, d), ct, dev)
        w_strides = (w.stride(0), w.stride(1))

    lam = _common.split_fp32(lambda_)
    extra = dict(_INTERP_TILE) if _INTERP else {}
    for row0 in range(0, m, stripe):
        m_s = min(stripe, m - row0)
        _bwd_tile[(n_cb, _common.cdiv(m_s, bm))](
            image, text, logit_scale, rinv_i, rinv_t, lse_row, lse_col, h, rho_part, sig_part,
            row0, m_s, n, d, offset, image.stride(0), image.stride(1), text.stride(0), text.stride(1),
            n, stripe, *lam, gamma, int(row0 > 0),
            NORMALIZE=normalize, STORE_H=store_h, ROWSUM=rowsum, COLSUM=colsum, COLS=cols, ACC=acc,
            BM=bm, BN=bm, **_tile_args(image.dtype), **extra)
        if need_dimage:
            # V = (γĜ) @ (b ⊙ T): complete rows of dI for this stripe.
            _gemm_launch(h, (n, 1), text, (text.stride(0), text.stride(1)), rinv_t if normalize else None,
                         v, (stripe * d, d), m_s, d, n, v_split, k_per, False, image.dtype)
            img = image[row0:row0 + m_s]
            out = di[row0:row0 + m_s]
            _finish(out, v, v_split, img, rinv_i[row0:row0 + m_s] if normalize else None, rho_part, n_cb,
                    stripe, None, logit_scale, gloss, m_s, d, n, gamma, normalize, True, ct)
        if need_dtext:
            # W += (γĜ)ᵀ @ (a ⊙ I_stripe), in stripe order.
            _gemm_launch(h, (1, n), image[row0:row0 + m_s], (image.stride(0), image.stride(1)),
                         rinv_i[row0:row0 + m_s] if normalize else None, w, (0, w_strides[0]),
                         n, d, m_s, 1, _common.cdiv(m_s, _K_GRANULE) * _K_GRANULE, row0 > 0, image.dtype)

    if need_dtext or need_dscale:
        total = _common.empty((_common.cdiv(n, _ROW_BLOCK),), ct, dev) if need_dscale else lse_row
        _finish(dt if need_dtext else lse_row, w if need_dtext else lse_row, 1, text,
                rinv_t if normalize else None, sig_part, n_slots, n, total if need_dscale else None,
                logit_scale, gloss, n, d, n, gamma, normalize and need_dtext, need_dtext, ct,
                v_strides=(0, w_strides[0]) if need_dtext else (0, 0))
        if need_dscale:
            _sum(total, dc.view(-1), logit_scale, gloss, n, True, ct)
    return di, dt, dc


def _finish(out, v, n_split, x, rinv, part, n_part, s_part, total, logit_scale, gloss, m, d, n, gamma,
            normalize, write, ct, v_strides=None):
    br = _ROW_BLOCK
    bd = max(16, min(128, _common.next_pow2(d)))
    if v_strides is None:
        v_strides = (v.stride(0), v.stride(1))
    _infonce_bwd_finish_kernel[(_common.cdiv(m, br),)](
        out, v, x, rinv if rinv is not None else part, part, total if total is not None else part,
        logit_scale, gloss, m, d, n, n_split, *v_strides, x.stride(0), x.stride(1),
        out.stride(0) if write else 0, out.stride(1) if write else 0, n_part, s_part, gamma,
        NORMALIZE=normalize, WRITE=write, TOTALS=total is not None, ACC=_acc_tl(ct),
        BR=br, BD=bd, BP=16 if _INTERP else 64, num_warps=4)


def _check(image, text, logit_scale, square=True):
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1] or (
            square and text.shape != image.shape) or text.shape[0] < image.shape[0]:
        raise ValueError(f"image and text must be [N, d] ([m, d] and [n >= m, d] for one direction); "
                         f"got {list(image.shape)} and {list(text.shape)}")
    if text.dtype != image.dtype or text.device != image.device:
        raise ValueError("image and text must share dtype and device")
    if logit_scale.numel() != 1 or logit_scale.device != image.device:
        raise ValueError("logit_scale must be one value on the features' device")


def supports(*tensors) -> Optional[str]:
    image = tensors[0]
    if image.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the Triton InfoNCE kernels take float16/bfloat16/float32/float64 features, got {image.dtype}"
    if image.ndim == 2 and image.shape[0] >= 2 ** 31 // 2:
        return f"the Triton InfoNCE kernels index rows with int32 and take N < 2^30, got N = {image.shape[0]}"
    return None


rows_supports = supports
