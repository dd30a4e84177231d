"""LoRA linear in Triton: y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, and its backward.

Forward: one GEMM kernel over tiles of y whose epilogue adds s·u Bᵀ and the bias. The
low-rank product u = drop(x) Aᵀ either accumulates inside the same K loop, sharing the loads
of x ("fused": one launch, but every column tile of y recomputes u), or comes from a small
memory-bound kernel run first ("split": x is read once more, nothing is recomputed);
`_fuse_down_projection` picks per shape. u (M×r) is saved for the backward.
Backward: one pass over g gives dB = s·gᵀu and v = s·gB; then dA = vᵀ drop(x); then
dx = gW + drop'(vA), the low-rank term in the epilogue of the gW GEMM.
Dropout keeps are regenerated from (seed, element index) with Philox in every kernel that
needs them; nothing mask-sized is stored, and dropout_p = 0 compiles the mask away.
Reductions over M or N that would need atomics go through fp32 partial buffers summed in a
fixed order, so results are deterministic and autotuning may rerun any kernel safely.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import compute_dtype, empty_grad
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


# ----------------------------------------------------------------------------- launch helpers

_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}
_MAX_BLOCK_R = 64     # rank columns one program holds; larger ranks loop over chunks of this
_M_GRANULE = 128      # row chunks of the split reductions: a multiple of every tuned BLOCK_M
_K_GRANULE = 256      # column chunks of the split down projection: a multiple of every BLOCK_K
# Crude H100 figures for the fused-or-split choice of the forward (awaiting GPU measurement).
_HBM_BYTES_PER_S, _L2_BYTES_PER_S, _LAUNCH_S = 3.0e12, 8.0e12, 4e-6
_FLOPS = {2: 6.0e14, 4: 5.0e13, 8: 5.0e13}  # dense rate by element size (fp32 without tf32)
_SMEM_BUDGET = 192 << 10  # bytes of pipelined tiles per program (H100: 227 KB, minus epilogue scratch)


def _config(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def _gemm_configs(out_name, red_name):
    """(BLOCK_M, output width, reduction step) tiles, for the forward (N, K) and dx (K, N)."""
    def cfg(bm, bo, br, warps, stages, group=8):
        return _config(warps, stages, BLOCK_M=bm, GROUP_M=group, **{out_name: bo, red_name: br})
    return [
        # many rows: compute-bound tiles
        cfg(128, 256, 64, 8, 3), cfg(256, 128, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(128, 128, 64, 4, 4),
        cfg(128, 64, 64, 4, 4), cfg(64, 128, 64, 4, 4), cfg(64, 64, 64, 4, 4), cfg(128, 128, 32, 8, 3),
        cfg(64, 64, 32, 4, 3), cfg(64, 64, 16, 4, 2), cfg(32, 64, 32, 4, 2),
        # few rows (decode): thin tiles that stream the weight, one program per few columns
        cfg(16, 32, 256, 4, 4), cfg(16, 64, 256, 4, 4), cfg(16, 64, 128, 4, 5), cfg(16, 128, 128, 4, 4),
        cfg(32, 64, 128, 4, 4), cfg(32, 32, 64, 4, 2), cfg(16, 32, 32, 4, 2), cfg(64, 64, 128, 4, 3),
    ]


def _stream_configs(shapes):
    return [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in shapes]


_STREAM_TILES = [(16, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3),
                 (16, 64, 4, 3), (128, 128, 8, 3), (32, 256, 4, 3), (32, 32, 4, 2)]
_GB_TILES = [_config(4, 3, BLOCK_M=32), _config(4, 3, BLOCK_M=64), _config(8, 3, BLOCK_M=64),
             _config(8, 3, BLOCK_M=128), _config(4, 3, BLOCK_M=16)]


def _pruner(first_arg, stage_elems, tall, out=None, accumulators=None):
    """Autotuner pre-filter. stage_elems(blocks, kwargs): elements one pipeline stage holds.
    Keeps configs that fit in shared memory, whose row tile suits the row count (``tall``:
    GEMMs, where many rows want tiles of 64+ rows) and, for fp64 (no tensor cores, 8-byte
    accumulators), a small output tile ``out``. accumulators(kwargs): how many [BLOCK_M, out]
    accumulators the kernel holds; above 128 registers a thread for them, sm_90 builds spill."""
    def prune(configs, named_args, **kwargs):
        esize, m = named_args[first_arg].element_size(), named_args["M_BUCKET"]

        def ok(c):
            bm = c.kwargs["BLOCK_M"]
            rows = bm >= 64 if (tall and m > 64) else bm <= max(16, m)
            small = esize < 8 or out is None or c.kwargs["BLOCK_M"] * c.kwargs[out] <= 64 * 64
            regs = accumulators is None or (accumulators(kwargs) * bm * c.kwargs[out] * max(1, esize // 4)
                                            <= 128 * 32 * c.num_warps)
            return rows and small and regs and stage_elems(c.kwargs, kwargs) * esize * c.num_stages <= _SMEM_BUDGET
        kept = [c for c in configs if ok(c)]
        return kept or [min(configs, key=lambda c: stage_elems(c.kwargs, kwargs) * c.num_stages)]
    return prune


def _autotuned(kernel, configs, key, prune):
    # The autotuner needs a GPU driver; under the interpreter the plain kernel runs one fixed
    # config, so both paths execute the same kernel body.
    if _common.INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=key, prune_configs_by=_common.prune_by(prune))(kernel)


_TUNE_KEY = ["M_BUCKET", "N", "K", "R", "HAS_DROPOUT"]
_fwd = _autotuned(  # stage: x, Wᵀ and (fused) Aᵀ tiles
    _lora_fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"), _TUNE_KEY + ["FUSED"],
    _pruner("X", lambda b, k: (b["BLOCK_M"] + b["BLOCK_N"] + (k["BLOCK_R"] if k["FUSED"] else 0)) * b["BLOCK_K"],
            tall=True, out="BLOCK_N"))
_dx = _autotuned(  # stage: g and W tiles
    _lora_bwd_dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"), _TUNE_KEY,
    _pruner("G", lambda b, k: (b["BLOCK_M"] + b["BLOCK_K"]) * b["BLOCK_N"], tall=True, out="BLOCK_K",
            accumulators=lambda k: 2 if k["HAS_DROPOUT"] else 1))
_down = _autotuned(  # stage: x and Aᵀ tiles
    _lora_down_kernel, _stream_configs(_STREAM_TILES), ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: (b["BLOCK_M"] + k["BLOCK_R"]) * b["BLOCK_K"], tall=False))
_da = _autotuned(  # stage: x and v tiles (v in fp32)
    _lora_bwd_da_kernel, _stream_configs(_STREAM_TILES), ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: b["BLOCK_M"] * (b["BLOCK_K"] + 2 * k["BLOCK_R"]), tall=False))
_gb = _autotuned(  # stage: g and u tiles (u in fp32)
    _lora_bwd_gb_kernel, _GB_TILES, ["M_BUCKET", "N", "R", "BLOCK_N"],
    _pruner("G", lambda b, k: b["BLOCK_M"] * (k["BLOCK_N"] + 2 * k["BLOCK_R"]), tall=False))

# Under the interpreter: small blocks, so the small test shapes cross tile boundaries, and
# granules to match, so they also exercise the split reductions.
_INTERP_BLOCK = 32
if _common.INTERPRET:
    _M_GRANULE = _K_GRANULE = _INTERP_BLOCK


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
    if dropout_p <= 0.0:
        return (1.0, 0.0, 1 << 62, 0)
    hi, lo = _fp32_halves(1.0 / (1.0 - dropout_p), dtype)
    threshold = min(int(round(dropout_p * 2.0 ** 31)), 2 ** 31 - 1)
    # Setting bit 62 keeps every seed a 64-bit kernel argument (one compiled variant) and is
    # one-to-one on the 62-bit seeds that ops/lora.py draws.
    return (hi, lo, (int(seed) & ((1 << 62) - 1)) | (1 << 62), threshold)


def _rank_block(r: int) -> int:
    return max(16, _common.next_pow2(r))


def _m_bucket(m: int) -> int:
    return min(_common.next_pow2(max(m, 1)), 1 << 16)


def _target_programs(device: torch.device) -> int:
    """Programs a memory-bound launch should have to keep the device's bandwidth busy."""
    if device.type != "cuda":
        return 4
    return 2 * _common.sm_count(device)


def _split(extent: int, granule: int, programs: int, target: int):
    """(chunk, count): cut ``extent`` into chunks (multiples of ``granule``) so that
    ``programs`` launches per chunk reach about ``target`` programs in all."""
    wanted = max(1, min(-(-target // max(programs, 1)), -(-extent // granule)))
    chunk = -(-max(extent, 1) // wanted)
    chunk = -(-chunk // granule) * granule
    return chunk, max(1, -(-extent // chunk))


def _fuse_down_projection(M: int, N: int, K: int, r: int, esize: int, dropout: bool) -> bool:
    """True: accumulate u inside the GEMM's K loop; False: run _lora_down_kernel first."""
    r_pad = _rank_block(r)
    if dropout or r_pad > _MAX_BLOCK_R or N == 0:
        # Fused, every column tile would regenerate the mask of its rows: Philox dominates.
        return False
    col_tiles = -(-N // 128)
    # Fused: each column tile recomputes u (FLOPs) and re-reads A (from L2).
    fused = max(2.0 * M * K * r_pad * col_tiles / _FLOPS[esize], col_tiles * r_pad * K * esize / _L2_BYTES_PER_S)
    # Split: one more read of x and one more launch.
    split = M * K * esize / _HBM_BYTES_PER_S + _LAUNCH_S
    return fused <= split


def _common_args(dtype):
    return dict(ACC=_ACC[dtype], UPCAST=_common.upcast_bf16_dot(dtype), PRECISION=_common.input_precision(dtype))


def _wide_counters(M: int, K: int) -> bool:
    # Dropout counters m·⌈K/4⌉ + k//4, also those of the masked rows past M, overflow int32.
    return (M + 256) * -(-K // 4) >= 2 ** 31


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """x:[M,K] -> (y:[M,N] in x.dtype, u = drop(x)Aᵀ:[M,r] in the compute dtype)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    ct = compute_dtype(x.dtype)
    y = _common.empty((M, N), x.dtype, x.device)
    if M == 0:
        return y, _common.empty((0, r), ct, x.device)
    has_dropout = dropout_p > 0.0
    drop_hi, drop_lo, seed, threshold = _dropout_args(dropout_p, seed, x.dtype)
    scale_hi, scale_lo = _fp32_halves(float(scaling), x.dtype)
    common, wide = _common_args(x.dtype), _wide_counters(M, K)
    bucket, K4 = _m_bucket(M), -(-K // 4)
    fused = _fuse_down_projection(M, N, K, r, x.element_size(), has_dropout)

    if fused:
        u = _common.empty((M, r), ct, x.device)
        parts, S = u, 1
    else:
        block_r = min(_rank_block(r), _MAX_BLOCK_R)
        rank_chunks = -(-r // block_r)
        k_chunk, S = _split(K, _K_GRANULE, -(-M // 64) * rank_chunks, _target_programs(x.device))
        parts = _common.empty((S, M, r), ct, x.device)
        _launch(_down, lambda meta: (_common.cdiv(M, meta["BLOCK_M"]), rank_chunks, S),
                (x, lora_A, parts, M, K, r, K4, k_chunk, bucket, x.stride(0), x.stride(1),
                 lora_A.stride(0), lora_A.stride(1), parts.stride(0), parts.stride(1),
                 drop_hi, drop_lo, seed, threshold),
                dict(HAS_DROPOUT=has_dropout, WIDE=wide, BLOCK_R=block_r, **common),
                dict(BLOCK_M=_interp_m(M), BLOCK_K=_INTERP_BLOCK, num_warps=4))
        u = parts[0] if S == 1 else _common.empty((M, r), ct, x.device)
    if N == 0:
        return y, (u if S == 1 else parts.sum(0))

    _launch(_fwd, lambda meta: (_common.cdiv(M, meta["BLOCK_M"]) * _common.cdiv(N, meta["BLOCK_N"]),),
            (x, weight, bias if bias is not None else y, lora_A, lora_B, parts, u, y,
             M, N, K, r, K4, S, bucket, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
             bias.stride(0) if bias is not None else 0, lora_A.stride(0), lora_A.stride(1),
             lora_B.stride(0), lora_B.stride(1), parts.stride(0), parts.stride(1),
             scale_hi, scale_lo, drop_hi, drop_lo, seed, threshold),
            dict(FUSED=fused, STORE_U=not fused and S > 1, HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout,
                 WIDE=wide, BLOCK_R=_rank_block(r) if fused else min(_rank_block(r), _MAX_BLOCK_R), **common),
            dict(BLOCK_M=_interp_m(M), BLOCK_N=_INTERP_BLOCK, BLOCK_K=_INTERP_BLOCK, GROUP_M=4, num_warps=4))
    return y, u


def backward(g, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed,
             need_dx: bool, need_dW: bool, need_db: bool):
    """Gradients (dx, dA, dB, dW, db); the ones not needed come back empty.
    dW = gᵀx and db = Σg (only for a base layer that requires grad, which LoRA never does)
    are one torch GEMM and one torch sum."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    ct = compute_dtype(x.dtype)
    dW = torch.matmul(g.t(), x).to(weight.dtype) if need_dW else empty_grad(weight)
    db = g.sum(0, dtype=ct).to(weight.dtype) if need_db else empty_grad(weight)
    if M == 0 or N == 0:
        dx = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_dx else empty_grad(x)
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B), dW, db

    has_dropout = dropout_p > 0.0
    drop_hi, drop_lo, seed, threshold = _dropout_args(dropout_p, seed, x.dtype)
    scale_hi, scale_lo = _fp32_halves(float(scaling), x.dtype)
    common, wide = _common_args(x.dtype), _wide_counters(M, K)
    bucket, K4, target = _m_bucket(M), -(-K // 4), _target_programs(x.device)
    block_r = min(_rank_block(r), _MAX_BLOCK_R)
    rank_chunks = -(-r // block_r)

    # 1. one pass over g: v = s·gB (partial per column tile) and dB = s·gᵀu (partial per row chunk)
    if _common.INTERPRET:
        block_n = _INTERP_BLOCK
    else:
        block_n = {2: 256 if block_r <= 32 else 128, 4: 64, 8: 32}[g.element_size()]
    block_n = min(block_n, max(16, _common.next_pow2(N)))
    col_tiles = -(-N // block_n)
    m_chunk, S = _split(M, _M_GRANULE, col_tiles * rank_chunks, target)
    v_parts = _common.empty((col_tiles, M, r), ct, x.device)
    db_parts = _common.empty((S, N, r), ct, x.device)
    _launch(_gb, lambda meta: (col_tiles, rank_chunks, S),
            (g, u, lora_B, v_parts, db_parts, M, N, r, m_chunk, bucket, g.stride(0), g.stride(1),
             u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1), v_parts.stride(0), v_parts.stride(1),
             db_parts.stride(0), db_parts.stride(1), scale_hi, scale_lo),
            dict(BLOCK_R=block_r, BLOCK_N=block_n, **common),
            dict(BLOCK_M=_interp_m(M), num_warps=4))
    v = v_parts[0] if col_tiles == 1 else v_parts.sum(0)
    dB = (db_parts[0] if S == 1 else db_parts.sum(0)).to(lora_B.dtype)

    # 2. dA = vᵀ drop(x), partial per row chunk
    m_chunk, S = _split(M, _M_GRANULE, -(-K // 128) * rank_chunks, target)
    da_parts = _common.empty((S, r, K), ct, x.device)
    _launch(_da, lambda meta: (_common.cdiv(K, meta["BLOCK_K"]), rank_chunks, S),
            (x, v, da_parts, M, K, r, K4, m_chunk, bucket, x.stride(0), x.stride(1), v.stride(0), v.stride(1),
             da_parts.stride(0), da_parts.stride(1), drop_hi, drop_lo, seed, threshold),
            dict(HAS_DROPOUT=has_dropout, WIDE=wide, BLOCK_R=block_r, **common),
            dict(BLOCK_M=_interp_m(M), BLOCK_K=_INTERP_BLOCK, num_warps=4))
    dA = (da_parts[0] if S == 1 else da_parts.sum(0)).to(lora_A.dtype)

    # 3. dx = gW + drop'(vA)
    dx = empty_grad(x)
    if need_dx:
        dx = _common.empty((M, K), x.dtype, x.device)
        _launch(_dx, lambda meta: (_common.cdiv(M, meta["BLOCK_M"]) * _common.cdiv(K, meta["BLOCK_K"]),),
                (g, weight, v, lora_A, dx, M, N, K, r, K4, bucket, g.stride(0), g.stride(1),
                 weight.stride(0), weight.stride(1), v.stride(0), v.stride(1), lora_A.stride(0), lora_A.stride(1),
                 drop_hi, drop_lo, seed, threshold),
                dict(HAS_DROPOUT=has_dropout, WIDE=wide, BLOCK_R=block_r, **common),
                dict(BLOCK_M=_interp_m(M), BLOCK_K=_INTERP_BLOCK, BLOCK_N=_INTERP_BLOCK, GROUP_M=4, num_warps=4))
    return dx, dA, dB, dW, db


def supports(x, *tensors) -> Optional[str]:
    if x.dtype not in _ACC:
        return f"the Triton LoRA kernels take float16, bfloat16, float32 or float64 inputs, got {x.dtype}"
    return None
