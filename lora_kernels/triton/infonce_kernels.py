"""Symmetric InfoNCE's Triton kernels (the algorithm is described in triton/infonce.py, whose
launchers size and launch them; the autotune configs and their pruning rules are in
triton/infonce_configs.py)."""
import triton
import triton.language as tl

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
