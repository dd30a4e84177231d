"""Bottleneck adapter's Triton kernels (the data flow is described in triton/adapter.py, whose
launchers size and launch them; the autotune configs and their pruning rules are in
triton/adapter_configs.py)."""
import triton
import triton.language as tl

from ._common import dot

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


# ----------------------------------------------------------------------------------------
# Activations (exact derivatives; tanh is written as a sigmoid, which never cancels)
# ----------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(u):
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:  # gelu, erf form
        a = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 1:  # gelu_tanh: 0.5·(1 + tanh(u)) == sigmoid(2u)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        a = h * _sigmoid(2.0 * u)
    elif ACT == 2:  # relu
        a = tl.maximum(h, 0.0)
    else:  # silu
        a = h * _sigmoid(h)
    return a


@triton.jit
def _act_and_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        a = h * cdf
        da = cdf + h * (0.3989422804014327 * tl.exp(-0.5 * h * h))
    elif ACT == 1:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        sg = _sigmoid(2.0 * u)
        a = h * sg
        da = sg + 2.0 * h * sg * (1.0 - sg) * (0.7978845608028654 * (1.0 + 0.134145 * h * h))
    elif ACT == 2:
        a = tl.maximum(h, 0.0)
        da = (h > 0.0).to(h.dtype)
    else:
        sg = _sigmoid(h)
        a = h * sg
        da = sg * (1.0 + h * (1.0 - sg))
    return a, da


# ----------------------------------------------------------------------------------------
# Tile helpers shared by the forward and the backward rows kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """_common.dot, naming the accumulator's dtype: Triton 3.6 rejects an fp64 one otherwise."""
    if UPCAST:
        return dot(a, b, acc, UPCAST, PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _rows_times_w(a_rows, stride_ak, row_ok, W, stride_wk, stride_wr, r0, K, R,
                  ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """A[rows, :] @ W[:, r0:r0+BLOCK_R] as [BLOCK_M, BLOCK_R], with W addressed as [K, R]."""
    rr = r0 + tl.arange(0, BLOCK_R)
    w_cols = W + rr[None, :].to(tl.int64) * stride_wr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(a_rows + kk[None, :].to(tl.int64) * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_ok[:, None] & (rr[None, :] < R), other=0.0)
        acc = _mma(a, w, acc, UPCAST, PRECISION)
    return acc


@triton.jit
def _tile_times_w(t, acc, W, stride_wr, stride_wk, r0, kk, R, K,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + t @ W[r0:r0+BLOCK_R, kk], with W addressed as [R, K]."""
    rr = r0 + tl.arange(0, BLOCK_R)
    w = tl.load(W + rr[:, None].to(tl.int64) * stride_wr + kk[None, :] * stride_wk,
                mask=(rr[:, None] < R) & (kk[None, :] < K), other=0.0)
    return _mma(t, w, acc, UPCAST, PRECISION)


@triton.jit
def _fwd_h_tile(x_rows, stride_xk, rows, row_ok, WD, BD, H, r0, K, R, ACT: tl.constexpr, HAS_BD: tl.constexpr,
                ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Stores the h tile (W_d [R, K] seen as [K, R]) and returns act(h) in x's dtype."""
    h = _rows_times_w(x_rows, stride_xk, row_ok, WD, 1, K, r0, K, R,
                      ACC, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    rr = r0 + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    if HAS_BD:
        h += tl.load(BD + rr, mask=r_ok, other=0.0).to(ACC)[None, :]
    tl.store(H + rows[:, None] * R + rr[None, :], h.to(H.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])
    return _act(h, ACT).to(x_rows.dtype.element_ty)


@triton.jit
def _bwd_dh_tile(g_rows, stride_gk, rows, row_ok, WU, H, DH, AH, s, r0, K, R, ACT: tl.constexpr,
                 ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Stores the dh and act(h) tiles in g's dtype and returns dh."""
    dact = _rows_times_w(g_rows, stride_gk, row_ok, WU, R, 1, r0, K, R,
                         ACC, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    rr = r0 + tl.arange(0, BLOCK_R)
    mask = row_ok[:, None] & (rr[None, :] < R)
    offs = rows[:, None] * R + rr[None, :]
    a, da = _act_and_grad(tl.load(H + offs, mask=mask, other=0.0).to(ACC), ACT)
    dh = (s * dact * da).to(g_rows.dtype.element_ty)
    tl.store(DH + offs, dh, mask=mask)
    tl.store(AH + offs, a.to(g_rows.dtype.element_ty), mask=mask)
    return dh


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M_BUCKET"])
def _adapter_fwd_kernel(
    X,   # [M, K] input rows, any strides
    WD,  # [R, K] down projection, contiguous
    BD,  # [R] down bias (read only if HAS_BD)
    WU,  # [K, R] up projection, contiguous
    BU,  # [K] up bias (read only if HAS_BU)
    Y,   # [M, K] output, contiguous
    H,   # [M, R] out: h = x W_dᵀ + b_d in the compute dtype, contiguous (saved for backward)
    AH,  # [M, R] scratch act(h) in x's dtype, used only when R spans several BLOCK_R tiles
    M, K, R, stride_xm, stride_xk,
    scale_hi, scale_lo,  # float arguments arrive as fp32: the fp64 path needs the low half too
    M_BUCKET,  # not read: an autotune key, so that small and large M are tuned apart
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, ONE_R_TILE: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    x_rows = X + rows[:, None] * stride_xm
    in_dtype = X.dtype.element_ty
    s = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)

    # Phase 1: h = x W_dᵀ + b_d; one register tile when it fits, else tile by tile via AH.
    if ONE_R_TILE:
        a = _fwd_h_tile(x_rows, stride_xk, rows, row_ok, WD, BD, H, 0, K, R, ACT, HAS_BD,
                        ACC, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    else:
        for r0 in range(0, R, BLOCK_R):
            a_t = _fwd_h_tile(x_rows, stride_xk, rows, row_ok, WD, BD, H, r0, K, R, ACT, HAS_BD,
                              ACC, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
            rr = r0 + tl.arange(0, BLOCK_R)
            tl.store(AH + rows[:, None] * R + rr[None, :], a_t, mask=row_ok[:, None] & (rr[None, :] < R))
        tl.debug_barrier()  # phase 2 reads act(h) tiles that other threads of this program stored

    # Phase 2: y = x + s·(act(h) W_uᵀ + b_u), K chunk by K chunk (W_u [K, R] seen as [R, K]).
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        z = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
        if ONE_R_TILE:
            z = _tile_times_w(a, z, WU, 1, R, 0, kk, R, K, UPCAST, PRECISION, BLOCK_R)
        else:
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                a_t = tl.load(AH + rows[:, None] * R + rr[None, :],
                              mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
                z = _tile_times_w(a_t, z, WU, 1, R, r0, kk, R, K, UPCAST, PRECISION, BLOCK_R)
        if HAS_BU:
            z += tl.load(BU + kk, mask=k_ok, other=0.0).to(ACC)[None, :]
        mask = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + kk[None, :].to(tl.int64) * stride_xk, mask=mask, other=0.0)
        tl.store(Y + rows[:, None] * K + kk[None, :], (x.to(ACC) + s * z).to(in_dtype), mask=mask)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M_BUCKET"])
def _adapter_bwd_rows_kernel(
    G,   # [M, K] upstream gradient dy, any strides
    WD,  # [R, K] down projection, contiguous
    WU,  # [K, R] up projection, contiguous
    H,   # [M, R] saved pre-activation, contiguous
    DH,  # [M, R] out: dh = (s·g W_u) ⊙ act'(h) in x's dtype, the operand of dW_d = dhᵀx
    AH,  # [M, R] out: act(h) in x's dtype, the operand of dW_u = s·gᵀact(h)
    DX,  # [M, K] out: dx = g + dh W_d, contiguous (written only if NEED_DX)
    M, K, R, stride_gm, stride_gk, scale_hi, scale_lo,
    M_BUCKET,  # not read: an autotune key
    ACT: tl.constexpr, NEED_DX: tl.constexpr, ONE_R_TILE: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    g_rows = G + rows[:, None] * stride_gm
    in_dtype = G.dtype.element_ty
    s = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)

    # Phase 1: dh = s·(g W_u) ⊙ act'(h), act(h) recomputed from h.
    if ONE_R_TILE:
        dh = _bwd_dh_tile(g_rows, stride_gk, rows, row_ok, WU, H, DH, AH, s, 0, K, R, ACT,
                          ACC, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    else:
        for r0 in range(0, R, BLOCK_R):
            _bwd_dh_tile(g_rows, stride_gk, rows, row_ok, WU, H, DH, AH, s, r0, K, R, ACT,
                         ACC, UPCAST, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)

    # Phase 2: dx = g + dh W_d, re-reading g while it is still in L2.
    if NEED_DX:
        if not ONE_R_TILE:
            tl.debug_barrier()  # dh tiles are read back from memory, written by other threads
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
            if ONE_R_TILE:
                acc = _tile_times_w(dh, acc, WD, K, 1, 0, kk, R, K, UPCAST, PRECISION, BLOCK_R)
            else:
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    dh_t = tl.load(DH + rows[:, None] * R + rr[None, :],
                                   mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
                    acc = _tile_times_w(dh_t, acc, WD, K, 1, r0, kk, R, K, UPCAST, PRECISION, BLOCK_R)
            mask = row_ok[:, None] & (kk[None, :] < K)
            g = tl.load(g_rows + kk[None, :].to(tl.int64) * stride_gk, mask=mask, other=0.0)
            tl.store(DX + rows[:, None] * K + kk[None, :], (g.to(ACC) + acc).to(in_dtype), mask=mask)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _adapter_bwd_weights_kernel(
    G,    # [M, K] upstream gradient, any strides
    X,    # [M, K] input, any strides
    AH,   # [M, R] act(h) from the rows kernel, contiguous
    DH,   # [M, R] dh from the rows kernel, contiguous
    DWU,  # [S, K, R] dW_u: one partial per row stripe, or the gradient itself when S == 1
    DWD,  # [S, R, K] dW_d, likewise
    DBU,  # [S, K] db_u, likewise (written only if HAS_DBU)
    DBD,  # [S, R] db_d, likewise (written only if HAS_DBD)
    M, K, R, stride_gm, stride_gk, stride_xm, stride_xk, rows_per_split, scale_hi, scale_lo,
    M_BUCKET,  # not read: an autotune key
    HAS_DBU: tl.constexpr, HAS_DBD: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # r tiles vary fastest so that programs sharing the same g and x tiles run side by side.
    pid_r, pid_k, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok, k_ok = rr < R, kk < K
    kk64 = kk.to(tl.int64)
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)

    # Both weight gradients accumulate as [BLOCK_R, BLOCK_K] = [M, R]ᵀ @ [M, K] tiles.
    dwu_t = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
    dwd = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
    dbu = tl.zeros((BLOCK_K,), dtype=ACC)
    dbd = tl.zeros((BLOCK_R,), dtype=ACC)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m_end
        rows = rows.to(tl.int64)
        mk = row_ok[:, None] & k_ok[None, :]
        mr = row_ok[:, None] & r_ok[None, :]
        g = tl.load(G + rows[:, None] * stride_gm + kk64[None, :] * stride_gk, mask=mk, other=0.0)
        x = tl.load(X + rows[:, None] * stride_xm + kk64[None, :] * stride_xk, mask=mk, other=0.0)
        ah = tl.load(AH + rows[:, None] * R + rr[None, :], mask=mr, other=0.0)
        dh = tl.load(DH + rows[:, None] * R + rr[None, :], mask=mr, other=0.0)
        dwu_t = _mma(tl.trans(ah), g, dwu_t, UPCAST, PRECISION)
        dwd = _mma(tl.trans(dh), x, dwd, UPCAST, PRECISION)
        if HAS_DBU:
            dbu += tl.sum(g.to(ACC), axis=0)
        if HAS_DBD:
            dbd += tl.sum(dh.to(ACC), axis=0)

    s = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    split64 = split.to(tl.int64)
    rk_mask = r_ok[:, None] & k_ok[None, :]
    tl.store(DWU + split64 * K * R + kk64[None, :] * R + rr[:, None],
             (s * dwu_t).to(DWU.dtype.element_ty), mask=rk_mask)
    tl.store(DWD + split64 * R * K + rr[:, None].to(tl.int64) * K + kk64[None, :],
             dwd.to(DWD.dtype.element_ty), mask=rk_mask)
    if HAS_DBU:
        if pid_r == 0:  # every r tile summed the same g columns: the first one writes them
            tl.store(DBU + split64 * K + kk, (s * dbu).to(DBU.dtype.element_ty), mask=k_ok)
    if HAS_DBD:
        if pid_k == 0:
            tl.store(DBD + split64 * R + rr, dbd.to(DBD.dtype.element_ty), mask=r_ok)


@triton.jit
def _adapter_bwd_reduce_kernel(
    PWU, PWD,  # [S, K·R] partials of dW_u and dW_d (compute dtype)
    PBU,       # [S, K] partials of db_u (read only if HAS_DBU)
    PBD,       # [S, R] partials of db_d (read only if HAS_DBD)
    DWU, DWD,  # [K·R] gradients, weights' dtype
    DBU,       # [K]
    DBD,       # [R]
    S, K, R,
    HAS_DBU: tl.constexpr, HAS_DBD: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n = tl.cast(K, tl.int64) * R
    w_ok, bu_ok, bd_ok = offs < n, offs < K, offs < R
    acc_u = tl.zeros((BLOCK,), dtype=PWU.dtype.element_ty)
    acc_d = tl.zeros((BLOCK,), dtype=PWU.dtype.element_ty)
    acc_bu = tl.zeros((BLOCK,), dtype=PWU.dtype.element_ty)
    acc_bd = tl.zeros((BLOCK,), dtype=PWU.dtype.element_ty)
    for s in range(0, S):  # a fixed order: the sum is the same on every run
        acc_u += tl.load(PWU + s * n + offs, mask=w_ok, other=0.0)
        acc_d += tl.load(PWD + s * n + offs, mask=w_ok, other=0.0)
        if HAS_DBU:
            acc_bu += tl.load(PBU + s * K + offs, mask=bu_ok, other=0.0)
        if HAS_DBD:
            acc_bd += tl.load(PBD + s * R + offs, mask=bd_ok, other=0.0)
    tl.store(DWU + offs, acc_u.to(DWU.dtype.element_ty), mask=w_ok)
    tl.store(DWD + offs, acc_d.to(DWD.dtype.element_ty), mask=w_ok)
    if HAS_DBU:
        tl.store(DBU + offs, acc_bu.to(DBU.dtype.element_ty), mask=bu_ok)
    if HAS_DBD:
        tl.store(DBD + offs, acc_bd.to(DBD.dtype.element_ty), mask=bd_ok)
