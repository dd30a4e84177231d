"""LoRA linear's Triton kernels (the math and data flow are described in triton/lora.py, whose
launchers size and launch them; the autotune configs and their pruning rules are in
triton/lora_configs.py)."""
import triton
import triton.language as tl

from . import _common


@triton.jit
def _tile_ids(NUM_M, NUM_N, GROUP_M: tl.constexpr):
    # Consecutive programs walk GROUP_M row tiles down one column tile, so the column tile of
    # the weight they share is still in L2.
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
    """Dropout keep-mask of x[rm, k0:k0+BLOCK_K] (k0 a multiple of 4), the same in every kernel.

    Element (m, k) draws word k % 4 of Philox(seed, counter = m·K4 + k // 4): one Philox call
    serves four neighbouring columns, a quarter of the integer work of one call per element.
    WIDE: the counters need 64 bits (M·K ≥ 2³³); 32-bit counters draw the same words more cheaply.
    """
    quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    if WIDE:
        counter = rm.to(tl.int64)[:, None] * K4 + quads[None, :]
    else:
        counter = rm[:, None] * K4 + quads[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (BLOCK_M, BLOCK_K))
    # Keep with probability 1 − threshold/2³¹ = 1 − p, compared in integers.
    return (words >> 1).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_fwd_kernel(
    X,       # [M, K] input rows, any strides
    W,       # [N, K] frozen weight, any strides (GPT-2 Conv1D hands in a transposed view)
    BIAS,    # [N] (unused without HAS_BIAS)
    A,       # [r, K] lora_A, any strides
    B,       # [N, r] lora_B, any strides
    U_PART,  # [S, M, r] partial sums of drop(x)Aᵀ over S column chunks of x (split path only)
    U,       # [M, r] out, contiguous: u = drop(x)Aᵀ, written by the programs of column tile 0
    Y,       # [M, N] out, contiguous, x's dtype
    M, N, K, R, K4, S, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias,
    stride_ar, stride_ak, stride_bn, stride_br, stride_ps, stride_pm,
    scale_hi, scale_lo, drop_hi, drop_lo,  # s and 1/(1−p), each split in two fp32 halves for fp64
    seed, threshold,
    FUSED: tl.constexpr, STORE_U: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok, n_ok = rm < M, rn < N
    rows = rm.to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = W + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk  # a [K, N] tile of Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    if FUSED:
        a_ptrs = A + rr[None, :] * stride_ar + rk[:, None] * stride_ak  # a [K, r] tile of Aᵀ
        u = tl.zeros((BLOCK_M, BLOCK_R), ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _common.dot(x, w, acc, UPCAST, PRECISION)
        if FUSED:
            a = tl.load(a_ptrs, mask=k_ok[:, None] & (rr < R)[None, :], other=0.0)
            if HAS_DROPOUT:
                x = tl.where(_keep_mask(seed, threshold, rm, k0, K4, BLOCK_M, BLOCK_K, WIDE), x, tl.zeros_like(x))
            u = _common.dot(x, a, u, UPCAST, PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    scale = _scalar(scale_hi, scale_lo, ACC)
    if FUSED:
        if HAS_DROPOUT:
            u = u * _scalar(drop_hi, drop_lo, ACC)
        if pid_n == 0:
            tl.store(U + rows[:, None] * R + rr[None, :], u.to(U.dtype.element_ty),
                     mask=m_ok[:, None] & (rr < R)[None, :])
        b = tl.load(B + rn.to(tl.int64)[None, :] * stride_bn + rr[:, None] * stride_br,
                    mask=(rr < R)[:, None] & n_ok[None, :], other=0.0)  # an [r, N] tile of Bᵀ
        # u meets B in B's dtype, as in an eager lora_B(u): the tensor-core path for half inputs.
        acc = _common.dot((u * scale).to(b.dtype), b, acc, UPCAST, PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + rr) < R
            ur = tl.zeros((BLOCK_M, BLOCK_R), ACC)
            p_ptrs = U_PART + rows[:, None] * stride_pm + (r0 + rr)[None, :]
            for _ in range(0, S):
                ur += tl.load(p_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                p_ptrs += stride_ps
            if STORE_U:
                if pid_n == 0:
                    tl.store(U + rows[:, None] * R + (r0 + rr)[None, :], ur, mask=m_ok[:, None] & r_ok[None, :])
            b = tl.load(B + rn.to(tl.int64)[None, :] * stride_bn + (r0 + rr)[:, None] * stride_br,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _common.dot((ur * scale).to(b.dtype), b, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn * stride_bias, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_down_kernel(
    X,       # [M, K] input rows, any strides
    A,       # [r, K] lora_A, any strides
    U_PART,  # [S, M, r] out, compute dtype: split s holds drop(x[:, chunk s]) A[:, chunk s]ᵀ
    M, K, R, K4, K_CHUNK, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_ps, stride_pm,
    drop_hi, drop_lo, seed, threshold,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (row tiles, rank chunks, S): few rows (decode) still spread over the whole GPU.
    pid_m, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok, r_ok = rm < M, rr < R
    rows = rm.to(tl.int64)
    k_start = pid_s * K_CHUNK  # a multiple of every BLOCK_K, hence of 4 as _keep_mask needs
    k_end = tl.minimum(K, k_start + K_CHUNK)
    # int64 columns: k·stride_xk passes 2³¹ for a column-major x of 2³¹+ elements
    x_ptrs = X + rows[:, None] * stride_xm + (k_start + rk).to(tl.int64)[None, :] * stride_xk
    a_ptrs = A + rr[None, :] * stride_ar + (k_start + rk)[:, None] * stride_ak
    u = tl.zeros((BLOCK_M, BLOCK_R), ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = (k0 + rk) < k_end
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, threshold, rm, k0, K4, BLOCK_M, BLOCK_K, WIDE), x, tl.zeros_like(x))
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        u = _common.dot(x, a, u, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        u = u * _scalar(drop_hi, drop_lo, ACC)
    tl.store(U_PART + pid_s.to(tl.int64) * stride_ps + rows[:, None] * stride_pm + rr[None, :],
             u.to(U_PART.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_bwd_gb_kernel(
    G,        # [M, N] upstream gradient, any strides
    U,        # [M, r] saved u, any strides
    B,        # [N, r] lora_B, any strides
    V_PART,   # [NT, M, r] out, compute dtype: column tile j's share of v = s·gB
    DB_PART,  # [S, N, r] out, compute dtype: row chunk s's share of dB = s·gᵀu
    M, N, R, M_CHUNK, M_BUCKET,
    stride_gm, stride_gn, stride_um, stride_ur, stride_bn, stride_br,
    stride_vt, stride_vm, stride_ds, stride_dn,
    scale_hi, scale_lo,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid (column tiles NT, rank chunks, row chunks S): each g tile is read once and feeds
    # both products; B's tile stays in registers, dB's tile accumulates over the row chunk.
    pid_n, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok, r_ok = rn < N, rr < R
    scale = _scalar(scale_hi, scale_lo, ACC)
    b = tl.load(B + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    db = tl.zeros((BLOCK_N, BLOCK_R), ACC)
    m_start = pid_s * M_CHUNK
    m_end = tl.minimum(M, m_start + M_CHUNK)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        rows = rm.to(tl.int64)
        g = tl.load(G + rows[:, None] * stride_gm + rn[None, :] * stride_gn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(U + rows[:, None] * stride_um + rr[None, :] * stride_ur,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        db = _common.dot(tl.trans(g), u.to(g.dtype), db, UPCAST, PRECISION)
        v = _common.dot(g, b, tl.zeros((BLOCK_M, BLOCK_R), ACC), UPCAST, PRECISION)
        tl.store(V_PART + pid_n.to(tl.int64) * stride_vt + rows[:, None] * stride_vm + rr[None, :], v * scale,
                 mask=m_ok[:, None] & r_ok[None, :])
    tl.store(DB_PART + pid_s.to(tl.int64) * stride_ds + rn.to(tl.int64)[:, None] * stride_dn + rr[None, :], db * scale,
             mask=n_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_bwd_da_kernel(
    X,        # [M, K] input rows, any strides
    V,        # [M, r] v = s·gB, compute dtype, any strides
    DA_PART,  # [S, r, K] out, compute dtype: row chunk s's share of dA = vᵀ drop(x)
    M, K, R, K4, M_CHUNK, M_BUCKET,
    stride_xm, stride_xk, stride_vm, stride_vr, stride_ds, stride_dr,
    drop_hi, drop_lo, seed, threshold,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (column tiles of x, rank chunks, row chunks S)
    pid_k, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_ok, r_ok = rk < K, rr < R
    da = tl.zeros((BLOCK_R, BLOCK_K), ACC)
    m_start = pid_s * M_CHUNK
    m_end = tl.minimum(M, m_start + M_CHUNK)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        rows = rm.to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, threshold, rm, pid_k * BLOCK_K, K4, BLOCK_M, BLOCK_K, WIDE), x,
                         tl.zeros_like(x))
        v = tl.load(V + rows[:, None] * stride_vm + rr[None, :] * stride_vr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        da = _common.dot(tl.trans(v.to(x.dtype)), x, da, UPCAST, PRECISION)
    if HAS_DROPOUT:
        da = da * _scalar(drop_hi, drop_lo, ACC)
    tl.store(DA_PART + pid_s.to(tl.int64) * stride_ds + rr[:, None] * stride_dr + rk[None, :], da,
             mask=r_ok[:, None] & k_ok[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _lora_bwd_dx_kernel(
    G,    # [M, N] upstream gradient, any strides
    W,    # [N, K] frozen weight, any strides
    V,    # [M, r] v = s·gB, compute dtype, any strides
    A,    # [r, K] lora_A, any strides
    DX,   # [M, K] out, contiguous, x's dtype
    M, N, K, R, K4, M_BUCKET,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_vm, stride_vr, stride_ar, stride_ak,
    drop_hi, drop_lo, seed, threshold,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Tiles of dx are [BLOCK_M, BLOCK_K]; the GEMM's reduction runs over N in BLOCK_N steps.
    pid_m, pid_k = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok, k_ok = rm < M, rk < K
    rows = rm.to(tl.int64)
    g_ptrs = G + rows[:, None] * stride_gm + rn[None, :] * stride_gn
    w_ptrs = W + rn[:, None] * stride_wn + rk.to(tl.int64)[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    for n0 in range(0, N, BLOCK_N):
        n_ok = (n0 + rn) < N
        g = tl.load(g_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _common.dot(g, w, acc, UPCAST, PRECISION)
        g_ptrs += BLOCK_N * stride_gn
        w_ptrs += BLOCK_N * stride_wn
    # (v·A) goes straight into acc unless dropout must mask it first: a second [BLOCK_M, BLOCK_K]
    # accumulator made the wide tiles spill registers in sm_90 builds.
    low = tl.zeros((BLOCK_M, BLOCK_K), ACC) if HAS_DROPOUT else acc
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rr) < R
        a = tl.load(A + (r0 + rr)[:, None] * stride_ar + rk.to(tl.int64)[None, :] * stride_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(V + rows[:, None] * stride_vm + (r0 + rr)[None, :] * stride_vr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        low = _common.dot(v.to(a.dtype), a, low, UPCAST, PRECISION)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, threshold, rm, pid_k * BLOCK_K, K4, BLOCK_M, BLOCK_K, WIDE)
        acc += tl.where(keep, low * _scalar(drop_hi, drop_lo, ACC), tl.zeros_like(low))
    else:
        acc = low
    tl.store(DX + rows[:, None] * K + rk[None, :], acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])
