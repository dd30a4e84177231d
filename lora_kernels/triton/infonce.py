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
import triton
import triton.language as tl

from ..reference import compute_dtype
from . import _common
from ._common import dot

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NORM_EPS2 = tl.constexpr(1e-24)  # (the reference's NORM_EPS)², a normal number in fp32


@triton.jit
def _scores(I, T, C, RINV_I, RINV_T, rows, cols, rmask, cmask, D,
            s_i0, s_i1, s_t0, s_t1,
            NORMALIZE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """S[rows, cols] = c·a_i·b_j·(I_i · T_j) as a [BM, BN] tile in ACC (a, b: inverse norms)."""
    return _cosines(I, T, RINV_I, RINV_T, rows, cols, rmask, cmask, D, s_i0, s_i1, s_t0, s_t1,
                    NORMALIZE, ACC, UPCAST, PREC, BM, BN, BK) * tl.load(C).to(ACC)


@triton.jit
def _cosines(I, T, RINV_I, RINV_T, rows, cols, rmask, cmask, D,
             s_i0, s_i1, s_t0, s_t1,
             NORMALIZE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """S/c = a_i·b_j·(I_i · T_j) as a [BM, BN] tile in ACC (plain dot products without NORMALIZE)."""
    acc = tl.zeros([BM, BN], dtype=ACC)
    i_rows = I + rows.to(tl.int64)[:, None] * s_i0
    t_cols = T + cols.to(tl.int64)[None, :] * s_t0
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        a = tl.load(i_rows + ks[None, :] * s_i1, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(t_cols + ks[:, None] * s_t1, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = dot(a, b, acc, UPCAST, PREC)
    if NORMALIZE:
        a_inv = tl.load(RINV_I + rows, mask=rmask, other=0.0)
        b_inv = tl.load(RINV_T + cols, mask=cmask, other=0.0)
        acc = acc * a_inv[:, None] * b_inv[None, :]
    return acc


@triton.jit
def _infonce_rows_kernel(
        X,       # [M, D] rows (image)
        Y,       # [M + y_offset, D] rows (text); row i pairs with row i + y_offset
        C,       # [1] logit_scale
        RINV_X,  # [M] out: 1/‖X_i‖ (NORMALIZE)
        RINV_Y,  # [M] out: 1/‖Y_{i+y_offset}‖ at index i (NORMALIZE)
        DIAG,    # [M] out: S_i,i+y_offset (WITH_DIAG)
        M, D, y_offset, s_x0, s_x1, s_y0, s_y1,
        NORMALIZE: tl.constexpr, WITH_DIAG: tl.constexpr, ACC: tl.constexpr,
        BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < M
    x_rows = X + rows.to(tl.int64)[:, None] * s_x0
    y_rows = Y + (rows + y_offset).to(tl.int64)[:, None] * s_y0
    xx = tl.zeros([BR, BD], dtype=ACC)
    yy = tl.zeros([BR, BD], dtype=ACC)
    xy = tl.zeros([BR, BD], dtype=ACC)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        mask = rmask[:, None] & (ds < D)[None, :]
        x = tl.load(x_rows + ds[None, :] * s_x1, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_rows + ds[None, :] * s_y1, mask=mask, other=0.0).to(ACC)
        xx += x * x
        yy += y * y
        xy += x * y
    s = tl.sum(xy, 1) * tl.load(C).to(ACC)
    if NORMALIZE:
        # 1/max(‖x‖, 1e-12) as F.normalize: a zero row stays zero instead of NaN downstream.
        # The bound is made in ACC: a bare float literal is fp32 in Triton (off by 1e-8 in fp64).
        eps2 = tl.full([BR], NORM_EPS2, ACC)
        rx = 1.0 / tl.sqrt(tl.maximum(tl.where(rmask, tl.sum(xx, 1), 1.0), eps2))
        ry = 1.0 / tl.sqrt(tl.maximum(tl.where(rmask, tl.sum(yy, 1), 1.0), eps2))
        tl.store(RINV_X + rows, rx, mask=rmask)
        tl.store(RINV_Y + rows, ry, mask=rmask)
        s = s * rx * ry
    if WITH_DIAG:
        tl.store(DIAG + rows, s, mask=rmask)


@triton.jit
def _infonce_fwd_kernel(
        I,       # [M, D] image rows
        T,       # [NC, D] text rows (the columns of S)
        C,       # [1] logit_scale
        RINV_I,  # [M] 1/‖I_i‖ (NORMALIZE)
        RINV_T,  # [NC] 1/‖T_j‖ (NORMALIZE)
        ROW_M,   # [C_SPLIT, M] out: per column split, row max of S·log2(e)
        ROW_L,   # [C_SPLIT, M] out: per column split, row Σ 2^(z − max)
        COL_M,   # [R_SPLIT, NC] out: per row split, column max of S·log2(e)
        COL_L,   # [R_SPLIT, NC] out: per row split, column Σ 2^(z − max)
        M, NC, D, s_i0, s_i1, s_t0, s_t1,
        NORMALIZE: tl.constexpr, COLS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # COLS: also the column statistics (the symmetric loss); off for one direction of a
    # rectangular block (the distributed loss).
    # Program (pr, pc) takes row blocks pr, pr + R_SPLIT, ... against a contiguous run of
    # column blocks. Strided rows keep all programs sweeping the same column block at about
    # the same time, so each T tile is read from HBM once and served to the others from L2.
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    r_split = tl.num_programs(0)
    c_split = tl.num_programs(1)
    n_rb = (M + BM - 1) // BM
    n_cb = (NC + BN - 1) // BN
    cb_lo = pc * n_cb // c_split
    cb_hi = (pc + 1) * n_cb // c_split
    col_m = COL_M + pr.to(tl.int64) * NC
    col_l = COL_L + pr.to(tl.int64) * NC
    for rb in range(pr, n_rb, r_split):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < M
        m_r = tl.full([BM], float("-inf"), ACC)
        l_r = tl.zeros([BM], dtype=ACC)
        for cb in range(cb_lo, cb_hi):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < NC
            z = _scores(I, T, C, RINV_I, RINV_T, rows, cols, rmask, cmask, D, s_i0, s_i1, s_t0, s_t1,
                        NORMALIZE, ACC, UPCAST, PREC, BM, BN, BK) * LOG2E
            z = tl.where(rmask[:, None] & cmask[None, :], z, float("-inf"))
            # Online log-sum-exp along rows; padded rows stay at -inf and are never stored,
            # the "safe" max only keeps them from producing NaN.
            m_new = tl.maximum(m_r, tl.max(z, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_r = l_r * tl.exp2(m_r - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), 1)
            m_r = m_new
            if COLS:
                # The same along columns, into this program's own partial row. The first row
                # block of the program starts it afresh, so the buffer needs no initialisation.
                # (A bound, not `cmask & (rb > pr)`: the interpreter mistypes a mask ANDed with
                # a scalar condition.)
                again = cols < NC * tl.minimum(rb - pr, 1)
                cm = tl.load(col_m + cols, mask=again, other=float("-inf"))
                cl = tl.load(col_l + cols, mask=again, other=0.0)
                cm_new = tl.maximum(cm, tl.max(z, 0))
                cm_safe = tl.where(cm_new == float("-inf"), 0.0, cm_new)
                cl = cl * tl.exp2(cm - cm_safe) + tl.sum(tl.exp2(z - cm_safe[None, :]), 0)
                tl.store(col_m + cols, cm_new, mask=cmask)
                tl.store(col_l + cols, cl, mask=cmask)
        tl.store(ROW_M + pc.to(tl.int64) * M + rows, m_r, mask=rmask)
        tl.store(ROW_L + pc.to(tl.int64) * M + rows, l_r, mask=rmask)


@triton.jit
def _merge_lse(MAX, SUM, n_split, stride, offs, mask, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Natural-log LSE of partial (max, sum) pairs in log2 units, merged in split order."""
    m = tl.full([BLOCK], float("-inf"), ACC)
    s = tl.zeros([BLOCK], dtype=ACC)
    for p in range(0, n_split):
        base = tl.cast(p, tl.int64) * stride + offs
        mp = tl.load(MAX + base, mask=mask, other=float("-inf"))
        sp = tl.load(SUM + base, mask=mask, other=0.0)
        m_new = tl.maximum(m, mp)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_safe) + sp * tl.exp2(mp - m_safe)
        m = m_new
    return (m + tl.log2(tl.where(mask, s, 1.0))) * LN2


@triton.jit
def _infonce_lse_kernel(
        ROW_M, ROW_L,   # [C_SPLIT, N] row partials from the forward sweep
        COL_M, COL_L,   # [R_SPLIT, N] column partials
        DIAG,           # [N] S_ii
        LSE_ROW,        # [N] out
        LSE_COL,        # [N] out
        PART,           # [cdiv(N, BLOCK)] out: this block's Σ λ(lse_row − S_ii) + (1−λ)(lse_col − S_ii)
        N, c_split, r_split, lam_hi, lam_lo,
        COLS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # N: rows of S (= columns when COLS); without COLS the term is lse_row − S_i,i+offset.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    lse_row = _merge_lse(ROW_M, ROW_L, c_split, N, offs, mask, ACC, BLOCK)
    tl.store(LSE_ROW + offs, lse_row, mask=mask)
    diag = tl.load(DIAG + offs, mask=mask, other=0.0)
    term = lse_row - diag
    if COLS:
        lse_col = _merge_lse(COL_M, COL_L, r_split, N, offs, mask, ACC, BLOCK)
        tl.store(LSE_COL + offs, lse_col, mask=mask)
        # λ arrives as two fp32 halves: kernel float arguments are fp32, the fp64 path needs more.
        lam = tl.cast(lam_hi, ACC) + tl.cast(lam_lo, ACC)
        term = lam * term + (1.0 - lam) * (lse_col - diag)
    tl.store(PART + tl.program_id(0), tl.sum(tl.where(mask, term, 0.0), 0))


@triton.jit
def _infonce_sum_kernel(
        PART,   # [n] partial sums, added in index order
        OUT,    # [1] out: Σ PART / N (loss), or gloss · Σ PART / N (d logit_scale)
        C,      # [1] logit_scale
        G,      # [1] gloss
        n, N,
        DSCALE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        acc += tl.load(PART + offs, mask=offs < n, other=0.0)
    total = tl.sum(acc, 0)
    if DSCALE:
        total = total * tl.load(G).to(ACC)
    tl.store(OUT, (total / N).to(OUT.dtype.element_ty))


@triton.jit
def _infonce_bwd_tile_kernel(
        I,         # [.., D] image; rows row0 .. row0 + M_s are this stripe
        T,         # [NC, D] text
        C,         # [1] logit_scale
        RINV_I,    # [..] 1/‖I_i‖ (NORMALIZE)
        RINV_T,    # [NC] 1/‖T_j‖ (NORMALIZE)
        LSE_ROW,   # [..] row LSE from the forward
        LSE_COL,   # [NC] column LSE from the forward
        H,         # [M_s, NC] out (STORE_H): γ·Ĝ for the stripe, in the input dtype
        RHO_PART,  # [n_cb, s_rho] out (ROWSUM): per column block, the stripe rows' Σ_j Ĝ⊙S/c
        SIG_PART,  # [n_slots, NC] in/out (COLSUM): per row-block slot, Σ_i Ĝ⊙S/c over all stripes
        row0, M_s, NC, D, diag_offset, s_i0, s_i1, s_t0, s_t1, s_h0, s_rho,
        lam_hi, lam_lo, gamma, accumulate,
        NORMALIZE: tl.constexpr, STORE_H: tl.constexpr, ROWSUM: tl.constexpr, COLSUM: tl.constexpr,
        COLS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Ĝ = λ(P_row − Id) + (1−λ)(P_col − Id) with COLS, else P_row − Id (Id shifted by diag_offset).
    cb = tl.program_id(0)
    slot = tl.program_id(1)
    local = slot * BM + tl.arange(0, BM)
    rows = row0 + local
    rmask = local < M_s
    cols = cb * BN + tl.arange(0, BN)
    cmask = cols < NC
    mask = rmask[:, None] & cmask[None, :]
    # The sums take Ĝ⊙(S/c), not (Ĝ⊙S)/c afterwards: d logit_scale stays finite at c = 0.
    u = _cosines(I, T, RINV_I, RINV_T, rows, cols, rmask, cmask, D, s_i0, s_i1, s_t0, s_t1,
                 NORMALIZE, ACC, UPCAST, PREC, BM, BN, BK)
    z = (u * tl.load(C).to(ACC)) * LOG2E  # S as _scores makes it, so P matches the forward's LSE
    lr = tl.load(LSE_ROW + rows, mask=rmask, other=0.0) * LOG2E
    g = tl.exp2(z - lr[:, None])
    if COLS:
        lc = tl.load(LSE_COL + cols, mask=cmask, other=0.0) * LOG2E
        lam = tl.cast(lam_hi, ACC) + tl.cast(lam_lo, ACC)
        g = lam * g + (1.0 - lam) * tl.exp2(z - lc[None, :])
    g = g - tl.where(rows[:, None] + diag_offset == cols[None, :], 1.0, 0.0)
    g = tl.where(mask, g, 0.0)
    if STORE_H:
        # γ (a power of two) lifts the O(1/N) probabilities out of fp16's subnormal range.
        h = H + local.to(tl.int64)[:, None] * s_h0 + cols[None, :]
        tl.store(h, (g * gamma).to(H.dtype.element_ty), mask=mask)
    gs = g * u
    if ROWSUM:
        tl.store(RHO_PART + cb.to(tl.int64) * s_rho + local, tl.sum(gs, 1), mask=rmask)
    if COLSUM:
        sig = SIG_PART + slot.to(tl.int64) * NC + cols
        prev = tl.load(sig, mask=cols < NC * accumulate, other=0.0)
        tl.store(sig, prev + tl.sum(gs, 0), mask=cmask)


@triton.jit
def _infonce_gemm_kernel(
        A,      # [M, K] (any strides: Ĝ or its transpose)
        B,      # [K, N] (any strides)
        SCALE,  # [K] per-k factor applied to B's rows (HAS_SCALE): unit-norm features
        OUT,    # [n_split, M, N] out (or in/out when accumulate): fp32/fp64
        M, N, K, k_per_split, s_am, s_ak, s_bk, s_bn, s_os, s_om, accumulate,
        HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Split k (axis 2) writes one partial per split; the consumer adds them in split order.
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    rmask = rows < M
    cmask = cols < N
    acc = tl.zeros([BM, BN], dtype=OUT.dtype.element_ty)
    a_rows = A + rows.to(tl.int64)[:, None] * s_am
    b_cols = B + cols.to(tl.int64)[None, :] * s_bn
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < k_hi
        a = tl.load(a_rows + ks.to(tl.int64)[None, :] * s_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_cols + ks.to(tl.int64)[:, None] * s_bk, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if HAS_SCALE:
            f = tl.load(SCALE + ks, mask=kmask, other=0.0)
            b = (b.to(acc.dtype) * f[:, None]).to(B.dtype.element_ty)
        acc = dot(a, b, acc, UPCAST, PREC)
    out = OUT + split.to(tl.int64) * s_os + rows.to(tl.int64)[:, None] * s_om + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    acc += tl.load(out, mask=(rows < M * accumulate)[:, None] & cmask[None, :], other=0.0)
    tl.store(out, acc, mask=mask)


@triton.jit
def _infonce_bwd_finish_kernel(
        OUT,     # [M, D] out (WRITE): the gradient of X, in X's dtype
        V,       # [n_split, M, D] GEMM partials: (γĜ)·(unit) features, summed in split order
        X,       # [M, D] the raw features whose gradient this is
        RINV,    # [M] 1/‖X_i‖ (NORMALIZE)
        PART,    # [n_part, s_part] partial Σ Ĝ⊙S/c per row, summed in order
        TOTAL,   # [cdiv(M, BR)] out (TOTALS): this block's Σ_i Σ Ĝ⊙S/c (for d logit_scale)
        C,       # [1] logit_scale
        G,       # [1] gloss
        M, D, N, n_split, s_vs, s_vm, s_x0, s_x1, s_o0, s_o1, n_part, s_part, gamma,
        NORMALIZE: tl.constexpr, WRITE: tl.constexpr, TOTALS: tl.constexpr, ACC: tl.constexpr,
        BR: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < M
    rho = tl.zeros([BR], dtype=ACC)
    if NORMALIZE or TOTALS:
        acc = tl.zeros([BP, BR], dtype=ACC)
        for p0 in range(0, n_part, BP):
            ps = p0 + tl.arange(0, BP)
            acc += tl.load(PART + ps.to(tl.int64)[:, None] * s_part + rows[None, :],
                           mask=(ps < n_part)[:, None] & rmask[None, :], other=0.0)
        rho = tl.sum(acc, 0)
    if TOTALS:
        tl.store(TOTAL + tl.program_id(0), tl.sum(rho, 0))
    if WRITE:
        # G = (gloss/N)·Ĝ; V carries an extra γ. With normalisation, the chain rule through
        # z/‖z‖ removes the radial part: dX = a·(coef·V) − (gloss/N)·c·a²·ρ·X (ρ = Σ Ĝ⊙S/c).
        kappa = tl.load(G).to(ACC) / N
        coef = tl.full([BR], 1.0, ACC) * (tl.load(C).to(ACC) * kappa / gamma)
        proj = tl.zeros([BR], dtype=ACC)
        if NORMALIZE:
            a = tl.load(RINV + rows, mask=rmask, other=0.0)
            coef = coef * a
            proj = (kappa * tl.load(C).to(ACC)) * a * a * rho
        x_rows = X + rows.to(tl.int64)[:, None] * s_x0
        o_rows = OUT + rows.to(tl.int64)[:, None] * s_o0
        v_rows = V + rows.to(tl.int64)[:, None] * s_vm
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            mask = rmask[:, None] & (ds < D)[None, :]
            v = tl.zeros([BR, BD], dtype=ACC)
            for sp in range(0, n_split):
                v += tl.load(v_rows + tl.cast(sp, tl.int64) * s_vs + ds[None, :], mask=mask, other=0.0)
            out = coef[:, None] * v
            if NORMALIZE:
                x = tl.load(x_rows + ds[None, :] * s_x1, mask=mask, other=0.0).to(ACC)
                out -= proj[:, None] * x
            tl.store(o_rows + ds[None, :] * s_o1, out.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_INTERP = _common.INTERPRET


def _pruner(stage_bytes, tunable_tile):
    """Autotuner pre-filter: the tuner never compiles a config that cannot launch or that
    spilled registers when every config was compiled for sm_90 offline (Triton 3.6, ptxas
    resource usage). Kept: pipelined tiles (stage_bytes a stage) within shared memory; 8 warps
    for 128×128 output tiles; and where the dot runs on CUDA cores with every operand in
    registers (fp64, fp32 without TF32), 8 warps for tiles of 64×128 and up, BK = 32 in fp32
    and, when the tile is tunable (the GEMM), no tile above 64×128. The smallest config stays
    when none survives."""
    def prune(configs, named_args, **kwargs):
        esize = named_args["A" if tunable_tile else "I"].element_size()
        fma = esize >= 4 and kwargs.get("PREC", "ieee") == "ieee"

        def smem(c):
            return stage_bytes(c.kwargs, named_args, kwargs) * c.num_stages

        def ok(c):
            meta = {**kwargs, **c.kwargs}
            area = meta["BM"] * meta["BN"]
            if smem(c) > _common.SMEM_BYTES or (c.num_warps < 8 and area >= (64 * 128 if fma else 128 * 128)):
                return False
            return not fma or ((esize > 4 or meta["BK"] <= 32) and (not tunable_tile or area <= 64 * 128))
        return [c for c in configs if ok(c)] or [min(configs, key=smem)]
    return prune


def _tile_stage(cfg, args, kwargs):   # an image and a text tile
    return (kwargs["BM"] + kwargs["BN"]) * cfg["BK"] * args["I"].element_size()


def _gemm_stage(cfg, args, kwargs):   # an A and a B tile
    return cfg["BK"] * (cfg["BM"] * args["A"].element_size() + cfg["BN"] * args["B"].element_size())


def _autotuned(kernel, configs, key, prune, restore_value=None):
    """The same kernel body everywhere: autotuned on a GPU, one fixed config when interpreted
    (the autotuner needs a GPU driver)."""
    if _INTERP:
        return kernel
    return triton.autotune(configs=configs, key=key, restore_value=restore_value,
                           prune_configs_by=_common.prune_by(prune))(kernel)


def _cfgs(space):
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in space]


_TILE_CONFIGS = _cfgs([({"BK": bk}, w, s) for bk in (32, 64) for w in (4, 8) for s in (3, 4)])
_GEMM_CONFIGS = _cfgs([({"BM": bm, "BN": bn, "BK": bk}, w, s)
                       for bm, bn in ((128, 128), (64, 128), (128, 64), (64, 64))
                       for bk, w, s in ((32, 4, 4), (64, 4, 3), (64, 8, 3), (32, 8, 4))])

_TILE_PRUNE, _GEMM_PRUNE = _pruner(_tile_stage, tunable_tile=False), _pruner(_gemm_stage, tunable_tile=True)
_fwd = _autotuned(_infonce_fwd_kernel, _TILE_CONFIGS, ["M", "NC", "D"], _TILE_PRUNE)
# These two read-modify-write buffers across launches (Σ Ĝ⊙S/c per column, the dT accumulator):
# the tuner's trial runs must not apply their update several times.
_bwd_tile = _autotuned(_infonce_bwd_tile_kernel, _TILE_CONFIGS, ["M_s", "NC", "D"], _TILE_PRUNE,
                       restore_value=["SIG_PART"])
_gemm = _autotuned(_infonce_gemm_kernel, _GEMM_CONFIGS, ["M", "N", "K"], _GEMM_PRUNE, restore_value=["OUT"])

# What the interpreter runs instead of a tuned config. Its cost is per operation, not per
# element, so blocks are as large as still lets the test shapes (N = 300, d = 64) cross tile,
# k-chunk, split and stripe boundaries.
_INTERP_TILE = {"BK": 32}
_INTERP_GEMM = {"BM": 64, "BN": 64, "BK": 32}
_K_GRANULE = 32 if _INTERP else 64   # split-k chunks are multiples of every BK candidate
_ROW_BLOCK = 128 if _INTERP else 32  # rows per program of the O(N·d) row-wise kernels


def _tile_block(dtype: torch.dtype) -> int:
    """BM = BN of the S tiles (fixed: the partial buffers' shapes depend on it)."""
    if _INTERP:
        return 64
    return 32 if dtype == torch.float64 else 128


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

    bm = _tile_block(image.dtype)
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

    bm = _tile_block(image.dtype)
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
