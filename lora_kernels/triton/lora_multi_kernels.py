"""The Triton kernels of lora_linear_multi (one batch, many LoRA adapters); triton/lora_multi.py
says how they route rows and launches them, triton/lora_multi_configs.py tunes them."""
import triton
import triton.language as tl

from . import _common
# The tile order, fp64 scalars and the dropout keep-mask are LoRA's own: the same seed draws the
# same mask in both ops because it is the same function.
from .lora_kernels import _keep_mask, _scalar, _tile_ids


@triton.jit
def _sorted_rows(PERM, SIDS, p, M, SORTED: tl.constexpr = True):
    """Original row index, adapter id (−1 past M) and the tile's first and last adapter (first >
    last when the tile has no adapter row) of the sorted positions p. Without SORTED, p are the
    rows themselves and SIDS the ids in row order: the walk over the adapters of a tile
    (_next_adapter) is right in any order, sorting only makes tiles hold fewer adapters."""
    p_ok = p < M
    if SORTED:
        rows = tl.load(PERM + p, mask=p_ok, other=0).to(tl.int32)
    else:
        rows = p
    ids = tl.load(SIDS + p, mask=p_ok, other=-1).to(tl.int32)
    first = tl.min(tl.where(ids >= 0, ids, 2147483647), axis=0)
    return p_ok, rows, ids, first, tl.max(ids, axis=0)


@triton.jit
def _next_adapter(ids, a):
    # Sorted ids: the next adapter present in the tile (past the last one when there is none).
    return tl.min(tl.where(ids > a, ids, 2147483647), axis=0)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _multi_down_rows_kernel(
    X,       # [M, K] input rows, any strides
    A,       # [n, r, K] lora_A, any strides
    IDS,     # [M] adapter of each row (−1: none), unsorted
    U_PART,  # [S, M, r] out, compute dtype: K chunk s's share of drop(x)A_iᵀ
    M, K, R, K4, K_CHUNK, M_BUCKET,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_ps, stride_pm,
    drop_hi, drop_lo, seed, threshold,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # grid (M rows, rank chunks, S): decode rows each read their own adapter, in parallel.
    pid_m, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    rm = pid_m + tl.zeros((1,), tl.int32)
    aid = tl.load(IDS + pid_m).to(tl.int64)
    u = tl.zeros((BLOCK_R,), ACC)
    if aid >= 0:
        k_start = pid_s * K_CHUNK
        k_end = tl.minimum(K, k_start + K_CHUNK)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_end
            x = tl.load(X + pid_m.to(tl.int64) * stride_xm + rk.to(tl.int64)[None, :] * stride_xk,
                        mask=k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                x = tl.where(_keep_mask(seed, threshold, rm, k0, K4, 1, BLOCK_K, WIDE), x, tl.zeros_like(x))
            a = tl.load(A + aid * stride_an + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            u += tl.sum(a.to(ACC) * x.to(ACC), axis=1)
        if HAS_DROPOUT:
            u = u * _scalar(drop_hi, drop_lo, ACC)
    tl.store(U_PART + pid_s.to(tl.int64) * stride_ps + pid_m.to(tl.int64) * stride_pm + rr, u, mask=r_ok)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _multi_down_seg_kernel(
    X,       # [M, K] input rows, any strides
    A,       # [n, r, K] lora_A, any strides
    PERM,    # [M] original row of each sorted position
    SIDS,    # [M] int32 adapter ids, sorted
    U_PART,  # [S, M, r] out (original row order), compute dtype: K chunk s's share of drop(x)A_iᵀ
    M, K, R, K4, K_CHUNK, M_BUCKET,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_ps, stride_pm,
    drop_hi, drop_lo, seed, threshold,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (tiles of sorted rows, rank chunks, S)
    pid_m, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p_ok, rm, ids, first, last = _sorted_rows(PERM, SIDS, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    r_ok = rr < R
    rows = rm.to(tl.int64)
    k_start = pid_s * K_CHUNK  # a multiple of every BLOCK_K, hence of 4 as _keep_mask needs
    k_end = tl.minimum(K, k_start + K_CHUNK)
    u = tl.zeros((BLOCK_M, BLOCK_R), ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = (k0 + rk) < k_end
        x = tl.load(X + rows[:, None] * stride_xm + (k0 + rk).to(tl.int64)[None, :] * stride_xk,
                    mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, threshold, rm, k0, K4, BLOCK_M, BLOCK_K, WIDE), x, tl.zeros_like(x))
        a_id = first
        while a_id <= last:
            at = tl.load(A + a_id.to(tl.int64) * stride_an + rr[None, :] * stride_ar + (k0 + rk)[:, None] * stride_ak,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # a [K, r] tile of A_iᵀ
            u = _common.dot(tl.where((ids == a_id)[:, None], x, tl.zeros_like(x)), at, u, UPCAST, PRECISION)
            a_id = _next_adapter(ids, a_id)
    if HAS_DROPOUT:
        u = u * _scalar(drop_hi, drop_lo, ACC)
    tl.store(U_PART + pid_s.to(tl.int64) * stride_ps + rows[:, None] * stride_pm + rr[None, :],
             u.to(U_PART.dtype.element_ty), mask=p_ok[:, None] & r_ok[None, :])


@triton.jit
def _multi_fwd_kernel(
    X,       # [M, K] input rows, any strides
    W,       # [N, K] frozen weight, any strides
    BIAS,    # [N] (unused without HAS_BIAS)
    B,       # [n, N, r] lora_B, any strides
    SCALE,   # [n] scalings, compute dtype
    PERM,    # [M] original row of each sorted position (unused without SORTED)
    SIDS,    # [M] adapter ids, sorted (SORTED) or in row order
    U_PART,  # [S, M, r] partial sums of u over S column chunks of x
    U,       # [M, r] out, contiguous: u, written by column tile 0 when S > 1
    Y,       # [M, N] out, contiguous, x's dtype
    M, N, K, R, S, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_bi, stride_bn, stride_br, stride_ps, stride_pm,
    SORTED: tl.constexpr, STORE_U: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    p_ok, rm, ids, first, last = _sorted_rows(PERM, SIDS, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M, SORTED)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    n_ok = rn < N
    rows = rm.to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = W + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk  # a [K, N] tile of Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _common.dot(x, w, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        u = tl.zeros((BLOCK_M, BLOCK_R), ACC)
        p_ptrs = U_PART + rows[:, None] * stride_pm + (r0 + rr)[None, :]
        for _ in range(0, S):
            u += tl.load(p_ptrs, mask=p_ok[:, None] & r_ok[None, :], other=0.0)
            p_ptrs += stride_ps
        if STORE_U:
            if pid_n == 0:
                tl.store(U + rows[:, None] * R + (r0 + rr)[None, :], u, mask=p_ok[:, None] & r_ok[None, :])
        a_id = first
        while a_id <= last:
            b = tl.load(B + a_id.to(tl.int64) * stride_bi + rn.to(tl.int64)[None, :] * stride_bn
                        + (r0 + rr)[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            su = u * tl.load(SCALE + a_id)
            # u meets B in B's dtype, as in an eager lora_B(u): the tensor-core path for half inputs.
            acc = _common.dot(tl.where((ids == a_id)[:, None], su, tl.zeros_like(su)).to(b.dtype), b, acc,
                              UPCAST, PRECISION)
            a_id = _next_adapter(ids, a_id)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn * stride_bias, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def _segment(OFFS, pid_as, S):
    """Adapter a = pid_as // S, and the sorted positions [start, end) of its s-th row chunk."""
    a_id, s = pid_as // S, pid_as % S
    seg_start, seg_end = tl.load(OFFS + a_id), tl.load(OFFS + a_id + 1)
    chunk = tl.cdiv(seg_end - seg_start, S)
    start = seg_start + s * chunk
    return a_id, s, start, tl.minimum(seg_end, start + chunk)


@triton.jit
def _multi_bwd_gb_kernel(
    G,        # [M, N] upstream gradient, any strides
    U,        # [M, r] saved u, any strides
    B,        # [n, N, r] lora_B, any strides
    SCALE,    # [n] scalings, compute dtype
    PERM,     # [M] original row of each sorted position
    OFFS,     # [n + 1] first sorted position of each adapter (and the end of the last)
    V_PART,   # [NT, M, r] out, compute dtype: column tile j's share of v = s_i·gB_i (adapter rows only)
    DB_PART,  # [S, n, N, r] out, compute dtype: row chunk s's share of dB_i = s_i·gᵀu
    M, N, R, S, M_BUCKET,
    stride_gm, stride_gn, stride_um, stride_ur, stride_bi, stride_bn, stride_br,
    stride_vt, stride_vm, stride_ds, stride_di, stride_dn,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid (column tiles NT, rank chunks, n·S): each g tile of an adapter's rows is read once
    # and feeds both products.
    pid_n, pid_r = tl.program_id(0), tl.program_id(1)
    a_id, s, m_start, m_end = _segment(OFFS, tl.program_id(2), S)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok, r_ok = rn < N, rr < R
    scale = tl.load(SCALE + a_id)
    b = tl.load(B + a_id.to(tl.int64) * stride_bi + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    db = tl.zeros((BLOCK_N, BLOCK_R), ACC)
    for m0 in range(m_start, m_end, BLOCK_M):
        p = m0 + tl.arange(0, BLOCK_M)
        p_ok = p < m_end
        rows = tl.load(PERM + p, mask=p_ok, other=0).to(tl.int64)
        g = tl.load(G + rows[:, None] * stride_gm + rn[None, :] * stride_gn, mask=p_ok[:, None] & n_ok[None, :],
                    other=0.0)
        u = tl.load(U + rows[:, None] * stride_um + rr[None, :] * stride_ur, mask=p_ok[:, None] & r_ok[None, :],
                    other=0.0)
        db = _common.dot(tl.trans(g), u.to(g.dtype), db, UPCAST, PRECISION)
        v = _common.dot(g, b, tl.zeros((BLOCK_M, BLOCK_R), ACC), UPCAST, PRECISION)
        tl.store(V_PART + pid_n.to(tl.int64) * stride_vt + rows[:, None] * stride_vm + rr[None, :], v * scale,
                 mask=p_ok[:, None] & r_ok[None, :])
    tl.store(DB_PART + s.to(tl.int64) * stride_ds + a_id.to(tl.int64) * stride_di + rn.to(tl.int64)[:, None] * stride_dn
             + rr[None, :], db * scale, mask=n_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _multi_bwd_da_kernel(
    X,        # [M, K] input rows, any strides
    V,        # [M, r] v, compute dtype, any strides (only adapter rows are read)
    PERM,     # [M] original row of each sorted position
    OFFS,     # [n + 1] first sorted position of each adapter (and the end of the last)
    DA_PART,  # [S, n, r, K] out, compute dtype: row chunk s's share of dA_i = vᵀ drop(x)
    M, K, R, K4, S, M_BUCKET,
    stride_xm, stride_xk, stride_vm, stride_vr, stride_ds, stride_di, stride_dr,
    drop_hi, drop_lo, seed, threshold,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (column tiles of x, rank chunks, n·S)
    pid_k, pid_r = tl.program_id(0), tl.program_id(1)
    a_id, s, m_start, m_end = _segment(OFFS, tl.program_id(2), S)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok, r_ok = rk < K, rr < R
    da = tl.zeros((BLOCK_R, BLOCK_K), ACC)
    for m0 in range(m_start, m_end, BLOCK_M):
        p = m0 + tl.arange(0, BLOCK_M)
        p_ok = p < m_end
        rm = tl.load(PERM + p, mask=p_ok, other=0).to(tl.int32)
        rows = rm.to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk,
                    mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, threshold, rm, pid_k * BLOCK_K, K4, BLOCK_M, BLOCK_K, WIDE), x,
                         tl.zeros_like(x))
        v = tl.load(V + rows[:, None] * stride_vm + rr[None, :] * stride_vr, mask=p_ok[:, None] & r_ok[None, :],
                    other=0.0)
        da = _common.dot(tl.trans(v.to(x.dtype)), x, da, UPCAST, PRECISION)
    if HAS_DROPOUT:
        da = da * _scalar(drop_hi, drop_lo, ACC)
    tl.store(DA_PART + s.to(tl.int64) * stride_ds + a_id.to(tl.int64) * stride_di + rr[:, None] * stride_dr
             + rk[None, :], da, mask=r_ok[:, None] & k_ok[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _multi_bwd_dx_kernel(
    G,     # [M, N] upstream gradient, any strides
    W,     # [N, K] frozen weight, any strides
    V,     # [M, r] v, compute dtype, any strides (only adapter rows are read)
    A,     # [n, r, K] lora_A, any strides
    PERM,  # [M] original row of each sorted position
    SIDS,  # [M] int32 adapter ids, sorted
    DX,    # [M, K] out, contiguous, x's dtype
    M, N, K, R, K4, M_BUCKET,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_vm, stride_vr, stride_ai, stride_ar, stride_ak,
    drop_hi, drop_lo, seed, threshold,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Tiles of dx are [BLOCK_M, BLOCK_K] of sorted rows; the GEMM's reduction runs over N.
    pid_m, pid_k = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    p_ok, rm, ids, first, last = _sorted_rows(PERM, SIDS, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    k_ok = rk < K
    rows = rm.to(tl.int64)
    g_ptrs = G + rows[:, None] * stride_gm + rn[None, :] * stride_gn
    w_ptrs = W + rn[:, None] * stride_wn + rk.to(tl.int64)[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    for n0 in range(0, N, BLOCK_N):
        n_ok = (n0 + rn) < N
        g = tl.load(g_ptrs, mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _common.dot(g, w, acc, UPCAST, PRECISION)
        g_ptrs += BLOCK_N * stride_gn
        w_ptrs += BLOCK_N * stride_wn
    # One accumulator, as triton/lora.py: with dropout the low-rank term needs its own (the mask
    # applies to it alone), without it goes straight into acc.
    low = tl.zeros((BLOCK_M, BLOCK_K), ACC) if HAS_DROPOUT else acc
    v_rows = p_ok & (ids >= 0)  # base-only rows have no v (never written)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        v = tl.load(V + rows[:, None] * stride_vm + (r0 + rr)[None, :] * stride_vr,
                    mask=v_rows[:, None] & r_ok[None, :], other=0.0)
        a_id = first
        while a_id <= last:
            at = tl.load(A + a_id.to(tl.int64) * stride_ai + (r0 + rr)[:, None] * stride_ar
                         + rk.to(tl.int64)[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            low = _common.dot(tl.where((ids == a_id)[:, None], v, tl.zeros_like(v)).to(at.dtype), at, low,
                              UPCAST, PRECISION)
            a_id = _next_adapter(ids, a_id)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, threshold, rm, pid_k * BLOCK_K, K4, BLOCK_M, BLOCK_K, WIDE)
        acc += tl.where(keep, low * _scalar(drop_hi, drop_lo, ACC), tl.zeros_like(low))
    else:
        acc = low
    tl.store(DX + rows[:, None] * K + rk[None, :], acc.to(DX.dtype.element_ty), mask=p_ok[:, None] & k_ok[None, :])
