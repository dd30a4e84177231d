"""Many LoRA adapters in one batch, in Triton: y_m = x_m Wᵀ + b + s_i·(drop(x_m) A_iᵀ) B_iᵀ.

Routing: rows are sorted by adapter id on the device (a stable torch.sort of M ints: no host
sync, no copy of x) and every kernel walks the rows in that order, reading and writing them
through the permutation (a gather inside the kernel). Why sort rather than gather unsorted:
the low-rank epilogue of a [BLOCK_M, BLOCK_N] tile must run one small dot per distinct
adapter among its rows, and sorted rows make that count the number of adapter segments that
cross the tile (1-2 for prefill, where each adapter owns many rows) instead of up to BLOCK_M.
Each tile walks only the adapters present in it (``next = min(ids > a)``), and the per-adapter
reductions of the backward see each adapter's rows as one contiguous segment of sorted
positions (found with searchsorted, again without a sync).

Forward: u = drop(x)A_iᵀ first ([M, r], saved for the backward), by one of two kernels:
  * decode (M <= _DECODE_M, each row likely its own adapter): one program per (row, K chunk),
    a gathered GEMV against that row's A_i, the shape Punica's BGMV uses;
  * segments: one program per (tile of sorted rows, K chunk); x's tile is loaded once per K
    step and meets the A_i of each adapter in the tile, rows of other adapters masked out.
Then one GEMM over tiles of sorted rows, x Wᵀ, whose epilogue adds s_i·u B_iᵀ per adapter
segment of the tile and the bias (the base GEMM and the low-rank epilogue in one pass).
lora_linear's other strategy, u accumulated inside the GEMM's K loop, is not offered: every
column tile would redo the per-adapter dots of its rows (× adapters in the tile), while the
separate pass costs one more read of x.
Backward: for each (adapter, column tile) one program walks the adapter's segment: dB_i = s_i·gᵀu
and v = s_i·g B_i in one pass over g; then dA_i = vᵀdrop(x) per (adapter, K tile); then
dx = gW + drop'(v A_i), the low-rank term in the epilogue of the gW GEMM. Reductions go through
fp32 partial buffers summed in a fixed order: deterministic, no atomics.
Dropout keeps come from the same Philox stream as triton/lora.py (element (m, k) of x, m the
original row), so a row's mask is the one lora_linear draws for it with the same seed.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import compute_dtype, empty_grad
from . import _common


@triton.jit
def _tile_ids(NUM_M, NUM_N, GROUP_M: tl.constexpr):
    # GROUP_M row tiles walk one column tile together, so the weight tile they share stays in L2.
    pid = tl.program_id(0)
    per_group = GROUP_M * NUM_N
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(NUM_M - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """hi + lo in the accumulator's dtype: fp64 kernels get back the bits an fp32 argument loses."""
    return tl.zeros((1,), ACC) + hi + lo


@triton.jit
def _keep_mask(seed, threshold, rm, k0, K4, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    """Dropout keep-mask of x[rm, k0:k0+BLOCK_K]: bit for bit triton/lora.py's _keep_mask (word
    k % 4 of Philox(seed, m·K4 + k // 4)); tests/test_lora_multi_op.py checks the two agree."""
    quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    if WIDE:
        counter = rm.to(tl.int64)[:, None] * K4 + quads[None, :]
    else:
        counter = rm[:, None] * K4 + quads[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_M, BLOCK_K))
    return (words >> 1).to(tl.int32) >= threshold


@triton.jit
def _sorted_rows(PERM, SIDS, p, M):
    """Original row index, adapter id (−1 past M) and the tile's first and last adapter (first >
    last when the tile has no adapter row) of the sorted positions p."""
    p_ok = p < M
    rows = tl.load(PERM + p, mask=p_ok, other=0).to(tl.int32)
    ids = tl.load(SIDS + p, mask=p_ok, other=-1)
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
    PERM,    # [M] original row of each sorted position
    SIDS,    # [M] int32 adapter ids, sorted
    U_PART,  # [S, M, r] partial sums of u over S column chunks of x
    U,       # [M, r] out, contiguous: u, written by column tile 0 when S > 1
    Y,       # [M, N] out, contiguous, x's dtype
    M, N, K, R, S, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_bi, stride_bn, stride_br, stride_ps, stride_pm,
    STORE_U: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    p_ok, rm, ids, first, last = _sorted_rows(PERM, SIDS, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M)
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


# ----------------------------------------------------------------------------- launch helpers

_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}
_MAX_BLOCK_R = 64     # rank columns one program holds; larger ranks loop over chunks of this
_K_GRANULE = 256      # column chunks of the split down projection: a multiple of every BLOCK_K
_DECODE_M = 16        # up to this many rows, u comes from the per-row (gathered GEMV) kernel
_SMEM_BUDGET = 192 << 10  # bytes of pipelined tiles per program (H100: 227 KB, minus epilogue scratch)


def _config(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Short, conservative lists (blocks <= 128, stages <= 3; see the sm_90 spill gate): (BLOCK_M,
# output width, reduction step, warps, stages) for the forward (N, K) and dx (K, N) GEMMs.
_GEMM_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
               (32, 64, 64, 4, 3), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (16, 32, 128, 4, 2)]
_STREAM_TILES = [(16, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (32, 32, 4, 2)]


def _gemm_configs(out_name, red_name):
    return [_config(w, s, BLOCK_M=bm, GROUP_M=8, **{out_name: bo, red_name: br}) for bm, bo, br, w, s in _GEMM_TILES]


def _pruner(first_arg, stage_elems, tall, out=None):
    """Autotuner pre-filter: row tiles that suit the row count (``tall``: GEMMs, where many rows
    want 64+), a small output tile ``out`` for fp64 (no tensor cores, 8-byte accumulators), and
    pipelined tiles within shared memory. stage_elems(blocks, kwargs): elements one stage holds."""
    def prune(configs, named_args, **kwargs):
        esize, m = named_args[first_arg].element_size(), named_args["M_BUCKET"]

        def ok(c):
            bm = c.kwargs["BLOCK_M"]
            rows = bm >= 64 if (tall and m > 64) else bm <= max(16, m)
            small = esize < 8 or out is None or bm * c.kwargs[out] <= 64 * 64
            return rows and small and stage_elems(c.kwargs, kwargs) * esize * c.num_stages <= _SMEM_BUDGET
        kept = [c for c in configs if ok(c)]
        return kept or [min(configs, key=lambda c: stage_elems(c.kwargs, kwargs) * c.num_stages)]
    return prune


def _autotuned(kernel, configs, key, prune):
    # The autotuner needs a GPU driver; under the interpreter the plain kernel runs one fixed config.
    if _common.INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=key, prune_configs_by=_common.prune_by(prune))(kernel)


_TUNE_KEY = ["M_BUCKET", "N", "K", "R"]
_fwd = _autotuned(  # stage: x and Wᵀ tiles
    _multi_fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"), _TUNE_KEY,
    _pruner("X", lambda b, k: (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_K"], tall=True, out="BLOCK_N"))
_dx = _autotuned(  # stage: g and W tiles
    _multi_bwd_dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"), _TUNE_KEY + ["HAS_DROPOUT"],
    _pruner("G", lambda b, k: (b["BLOCK_M"] + b["BLOCK_K"]) * b["BLOCK_N"], tall=True, out="BLOCK_K"))
_down_seg = _autotuned(  # stage: x and Aᵀ tiles
    _multi_down_seg_kernel, [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in _STREAM_TILES],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: (b["BLOCK_M"] + k["BLOCK_R"]) * b["BLOCK_K"], tall=False))
_down_rows = _autotuned(  # one row: x and A_i tiles
    _multi_down_rows_kernel, [_config(4, 3, BLOCK_K=128), _config(2, 3, BLOCK_K=64)],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"], None)
_da = _autotuned(  # stage: x and v tiles (v in fp32)
    _multi_bwd_da_kernel, [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in _STREAM_TILES],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: b["BLOCK_M"] * (b["BLOCK_K"] + 2 * k["BLOCK_R"]), tall=False))
_gb = _autotuned(  # stage: g and u tiles (u in fp32)
    _multi_bwd_gb_kernel, [_config(4, 3, BLOCK_M=16), _config(4, 3, BLOCK_M=32), _config(4, 3, BLOCK_M=64)],
    ["M_BUCKET", "N", "R", "BLOCK_N"],
    _pruner("G", lambda b, k: b["BLOCK_M"] * (k["BLOCK_N"] + 2 * k["BLOCK_R"]), tall=False))

# Under the interpreter: small blocks, so the small test shapes cross tile boundaries, and a
# granule to match, so they also exercise the split reductions.
_INTERP_BLOCK = 32
if _common.INTERPRET:
    _K_GRANULE = _INTERP_BLOCK


def _launch(kernel, grid, args, consts, interp_blocks):
    """Launch ``kernel`` (autotuned on a GPU) on ``grid(meta)``; interp_blocks: the fixed config."""
    if _common.INTERPRET:
        meta = {**consts, **interp_blocks}
        kernel[grid(meta)](*args, **meta)
    else:
        kernel[grid](*args, **consts)


def _interp_m(m):
    return 16 if m <= 16 else _INTERP_BLOCK


def _fp32_halves(value: float, dtype: torch.dtype):
    """Triton passes Python floats as fp32: an fp64 kernel gets value = hi + lo instead."""
    hi, lo = _common.split_fp32(value)
    return hi, (lo if dtype == torch.float64 else 0.0)


def _dropout_args(dropout_p: float, seed: int, dtype: torch.dtype):
    """(1/(1−p) in two halves, seed, threshold) exactly as triton/lora.py derives them: the same
    seed gives the same keep-mask in both ops."""
    if dropout_p <= 0.0:
        return (1.0, 0.0, 1 << 62, 0)
    hi, lo = _fp32_halves(1.0 / (1.0 - dropout_p), dtype)
    threshold = min(int(round(dropout_p * 2.0 ** 31)), 2 ** 31 - 1)
    return (hi, lo, (int(seed) & ((1 << 62) - 1)) | (1 << 62), threshold)


def _wide_counters(M: int, K: int) -> bool:
    # Dropout counters m·⌈K/4⌉ + k//4, also those of the masked rows past M, overflow int32.
    return (M + 256) * -(-K // 4) >= 2 ** 31


def _target_programs(device: torch.device) -> int:
    """Programs a memory-bound launch should have to keep the device's bandwidth busy."""
    return 2 * _common.sm_count(device) if device.type == "cuda" else 4


def _split(extent: int, granule: int, programs: int, target: int):
    """(chunk, count): ``extent`` cut into chunks (multiples of ``granule``) so that ``programs``
    launches per chunk reach about ``target`` programs in all."""
    wanted = max(1, min(-(-target // max(programs, 1)), -(-extent // granule)))
    chunk = -(-max(extent, 1) // wanted)
    chunk = -(-chunk // granule) * granule
    return chunk, max(1, -(-extent // chunk))


def _routing(adapter_ids, n: int):
    """(permutation sorting the rows by adapter, sorted int32 ids, [n + 1] first sorted position
    of each adapter and the end of the last), all on the device, without a host sync."""
    sorted_ids, perm = torch.sort(adapter_ids, stable=True)
    bounds = torch.arange(0, n + 1, device=adapter_ids.device, dtype=sorted_ids.dtype)
    return perm, sorted_ids.to(torch.int32), torch.searchsorted(sorted_ids, bounds)


def _common_args(dtype):
    return dict(ACC=_ACC[dtype], UPCAST=_common.upcast_bf16_dot(dtype), PRECISION=_common.input_precision(dtype))


def _rank_block(r: int) -> int:
    return min(max(16, _common.next_pow2(r)), _MAX_BLOCK_R)


def _m_bucket(m: int) -> int:
    return min(_common.next_pow2(max(m, 1)), 1 << 16)


def forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, seed):
    """x:[M,K] -> (y:[M,N] in x.dtype, u = drop(x)A_iᵀ:[M,r] in the compute dtype, 0 on base rows)."""
    M, K = x.shape
    N, (n, r) = weight.shape[0], lora_A.shape[:2]
    ct = compute_dtype(x.dtype)
    y = _common.empty((M, N), x.dtype, x.device)
    if M == 0:
        return y, _common.empty((0, r), ct, x.device)
    has_dropout = dropout_p > 0.0
    drop_hi, drop_lo, seed, threshold = _dropout_args(dropout_p, seed, x.dtype)
    common, wide, bucket, K4 = _common_args(x.dtype), _wide_counters(M, K), _m_bucket(M), -(-K // 4)
    block_r = _rank_block(r)
    rank_chunks = -(-r // block_r)
    perm, sorted_ids, _ = _routing(adapter_ids, n)
    decode = M <= _DECODE_M
    k_chunk, S = _split(K, _K_GRANULE, (M if decode else -(-M // 64)) * rank_chunks, _target_programs(x.device))
    parts = _common.empty((S, M, r), ct, x.device)
    drop = (drop_hi, drop_lo, seed, threshold)
    if decode:
        _launch(_down_rows, lambda meta: (M, rank_chunks, S),
                (x, lora_A, adapter_ids, parts, M, K, r, K4, k_chunk, bucket, x.stride(0), x.stride(1),
                 *lora_A.stride(), parts.stride(0), parts.stride(1), *drop),
                dict(HAS_DROPOUT=has_dropout, WIDE=wide, ACC=common["ACC"], BLOCK_R=block_r),
                dict(BLOCK_K=_INTERP_BLOCK, num_warps=4))
    else:
        _launch(_down_seg, lambda meta: (_common.cdiv(M, meta["BLOCK_M"]), rank_chunks, S),
                (x, lora_A, perm, sorted_ids, parts, M, K, r, K4, k_chunk, bucket, x.stride(0), x.stride(1),
                 *lora_A.stride(), parts.stride(0), parts.stride(1), *drop),
                dict(HAS_DROPOUT=has_dropout, WIDE=wide, BLOCK_R=block_r, **common),
                dict(BLOCK_M=_interp_m(M), BLOCK_K=_INTERP_BLOCK, num_warps=4))
    u = parts[0] if S == 1 else _common.empty((M, r), ct, x.device)
    if N == 0:
        return y, (u if S == 1 else parts.sum(0))
    _launch(_fwd, lambda meta: (_common.cdiv(M, meta["BLOCK_M"]) * _common.cdiv(N, meta["BLOCK_N"]),),
            (x, weight, bias if bias is not None else y, lora_B, scalings, perm, sorted_ids, parts, u, y,
             M, N, K, r, S, bucket, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
             bias.stride(0) if bias is not None else 0, *lora_B.stride(), parts.stride(0), parts.stride(1)),
            dict(STORE_U=S > 1, HAS_BIAS=bias is not None, BLOCK_R=block_r, **common),
            dict(BLOCK_M=_interp_m(M), BLOCK_N=_INTERP_BLOCK, BLOCK_K=_INTERP_BLOCK, GROUP_M=4, num_warps=4))
    return y, u


def backward(g, x, weight, lora_A, lora_B, u, scalings, adapter_ids, dropout_p, seed,
             need_dx: bool, need_dW: bool, need_db: bool):
    """Gradients (dx, dA, dB, dW, db); the ones not needed come back empty. dW = gᵀx and db = Σg
    (a base layer that requires grad, which LoRA never has) are one torch GEMM and one sum."""
    M, K = x.shape
    N, (n, r) = weight.shape[0], lora_A.shape[:2]
    ct = compute_dtype(x.dtype)
    dW = torch.matmul(g.t(), x).to(weight.dtype) if need_dW else empty_grad(weight)
    db = g.sum(0, dtype=ct).to(weight.dtype) if need_db else empty_grad(weight)
    if M == 0 or N == 0:
        dx = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_dx else empty_grad(x)
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B), dW, db

    has_dropout = dropout_p > 0.0
    drop = _dropout_args(dropout_p, seed, x.dtype)
    common, wide, bucket, K4 = _common_args(x.dtype), _wide_counters(M, K), _m_bucket(M), -(-K // 4)
    target = _target_programs(x.device)
    block_r = _rank_block(r)
    rank_chunks = -(-r // block_r)
    perm, sorted_ids, offsets = _routing(adapter_ids, n)

    # 1. one pass over each adapter's rows of g: v = s_i·gB_i (partial per column tile) and
    # dB_i = s_i·gᵀu (partial per row chunk of the adapter's segment)
    if _common.INTERPRET:
        block_n = _INTERP_BLOCK
    else:
        block_n = {2: 128 if block_r <= 32 else 64, 4: 64, 8: 32}[g.element_size()]
    block_n = min(block_n, max(16, _common.next_pow2(N)))
    col_tiles = -(-N // block_n)
    # Row chunks per adapter: enough programs for a few adapters, and a partial buffer
    # (S·n·N·r) never larger than about `target` column tiles' worth.
    S = max(1, min(target // max(1, col_tiles * rank_chunks * n), -(-M // 128)))
    v_parts = _common.empty((col_tiles, M, r), ct, x.device)
    db_parts = _common.empty((S, n, N, r), ct, x.device)
    _launch(_gb, lambda meta: (col_tiles, rank_chunks, n * S),
            (g, u, lora_B, scalings, perm, offsets, v_parts, db_parts, M, N, r, S, bucket,
             g.stride(0), g.stride(1), u.stride(0), u.stride(1), *lora_B.stride(),
             v_parts.stride(0), v_parts.stride(1), db_parts.stride(0), db_parts.stride(1), db_parts.stride(2)),
            dict(BLOCK_R=block_r, BLOCK_N=block_n, **common),
            dict(BLOCK_M=_interp_m(M), num_warps=4))
    v = v_parts[0] if col_tiles == 1 else v_parts.sum(0)
    dB = (db_parts[0] if S == 1 else db_parts.sum(0)).to(lora_B.dtype)

    # 2. dA_i = vᵀ drop(x) over each adapter's rows, partial per row chunk
    S = max(1, min(target // max(1, -(-K // 128) * rank_chunks * n), -(-M // 128)))
    da_parts = _common.empty((S, n, r, K), ct, x.device)
    _launch(_da, lambda meta: (_common.cdiv(K, meta["BLOCK_K"]), rank_chunks, n * S),
            (x, v, perm, offsets, da_parts, M, K, r, K4, S, bucket, x.stride(0), x.stride(1), v.stride(0), v.stride(1),
             da_parts.stride(0), da_parts.stride(1), da_parts.stride(2), *drop),
            dict(HAS_DROPOUT=has_dropout, WIDE=wide, BLOCK_R=block_r, **common),
            dict(BLOCK_M=_interp_m(M), BLOCK_K=_INTERP_BLOCK, num_warps=4))
    dA = (da_parts[0] if S == 1 else da_parts.sum(0)).to(lora_A.dtype)

    # 3. dx = gW + drop'(v A_i)
    dx = empty_grad(x)
    if need_dx:
        dx = _common.empty((M, K), x.dtype, x.device)
        _launch(_dx, lambda meta: (_common.cdiv(M, meta["BLOCK_M"]) * _common.cdiv(K, meta["BLOCK_K"]),),
                (g, weight, v, lora_A, perm, sorted_ids, dx, M, N, K, r, K4, bucket, g.stride(0), g.stride(1),
                 weight.stride(0), weight.stride(1), v.stride(0), v.stride(1), *lora_A.stride(), *drop),
                dict(HAS_DROPOUT=has_dropout, WIDE=wide, BLOCK_R=block_r, **common),
                dict(BLOCK_M=_interp_m(M), BLOCK_K=_INTERP_BLOCK, BLOCK_N=_INTERP_BLOCK, GROUP_M=4, num_warps=4))
    return dx, dA, dB, dW, db


def supports(x, *tensors) -> Optional[str]:
    if x.dtype not in _ACC:
        return f"the Triton multi-LoRA kernels take float16, bfloat16, float32 or float64 inputs, got {x.dtype}"
    return None
