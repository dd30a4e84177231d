"""DoRA linear in Triton (PEFT's semantics, see reference/dora.py), and its backward.

Forward, two launches and no N×K temporary:
  1. the row-norm kernel reads W0 once: ‖W0_n‖² (skipped when the caller passes it cached, W0
     being frozen) and W0 Aᵀ accumulate over K; its epilogue forms
     ‖W0_n + s·(BA)_n‖² = ‖W0_n‖² + 2s·Σ_j B[n,j](W0Aᵀ)[n,j] + s²·((B·AAᵀ)⊙B)[n,:].sum()
     and writes c = m/‖·‖ and 1/‖·‖ (fp32 for half inputs);
  2. the LoRA GEMM (u = x'Aᵀ accumulated in the same K loop when that is cheaper than one cuBLAS
     GEMM first: small M·N, r ≤ 64; ``_fuse_u``) with c in its epilogue:
     y = c⊙(xW0ᵀ + s·uBᵀ) + b. With dropout, PEFT's y = W0x + (c−1)⊙W0x' + c⊙s·uBᵀ + b needs two
     base products: both accumulate in the same K loop from one load of each W0 tile.
     z = W0x' + s·uBᵀ is stored too when the magnitude needs a gradient and there is a bias or
     dropout (else y = c⊙z stands for it: ops/dora.py).
Backward without dropout: one pass over g writes gc = g⊙c and per-row-chunk partials of
Σ g⊙z (d magnitude, summed in a fixed order: deterministic); the rest is exactly LoRA's backward
with g replaced by gc (dx = gc W0 + vA, dA, dB, dW0 = gcᵀx), run by lora_kernels.triton.lora's
public ``backward``; db = Σg. With dropout the same pass also writes g⊙(c − 1); dA and dB are
LoRA's on x'; dx = gW0 + drop'(g⊙(c−1) W0 + vA) adds two base GEMMs (torch, in x's dtype, as PEFT's
autograd runs them). The keep-mask is the reference's (torch's generator seeded per call),
regenerated in the backward, and x' = drop(x) is materialised (M×K) for the kernel and for dA.
Nothing of W0's size is ever allocated.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import compute_dtype, empty_grad
from ..reference import dora as ref
from ..reference.lora import apply_dropout, dropout_mask
from . import _common
from . import lora as _lora
from .lora import _fp32_halves, _launch, _rank_block
from .lora_kernels import _scalar

_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}
_MAX_R = 128          # rank one program holds whole (norm epilogue, GEMM epilogue)
_MAX_FUSED_R = 64     # above this u = x'Aᵀ always comes from one torch GEMM before the kernel
# Crude H100 figures for the fused-or-not choice of u (as triton/lora.py's; awaiting GPU measurement).
_HBM_BYTES_PER_S, _LAUNCH_S = 3.0e12, 4e-6
_FLOPS = {2: 6.0e14, 4: 5.0e13, 8: 5.0e13}  # dense rate by element size (fp32 without tf32)


def _fuse_u(M: int, N: int, K: int, r: int, esize: int) -> bool:
    """True: accumulate u = x'Aᵀ in the GEMM's K loop (every column tile recomputes it: FLOPs);
    False: one cuBLAS GEMM first (one more read of x' and a launch). Large M·N favours the latter."""
    r_pad = _rank_block(r)
    if r_pad > _MAX_FUSED_R:
        return False
    fused = 2.0 * M * K * r_pad * -(-N // 128) / _FLOPS[esize]
    return fused <= M * K * esize / _HBM_BYTES_PER_S + _LAUNCH_S


@triton.jit
def _dora_norm_kernel(
    W,       # [N, K] frozen weight, any strides
    A,       # [r, K] lora_A, any strides
    B,       # [N, r] lora_B, any strides
    GRAM,    # [r, r] A Aᵀ, compute dtype, contiguous
    MAG,     # [N] magnitude
    WSQ,     # [N] cached ‖W0_n‖², compute dtype (unused without HAS_WSQ)
    C,       # [N] out, compute dtype: m / ‖W0 + s·BA‖
    RNORM,   # [N] out, compute dtype: 1 / ‖W0 + s·BA‖
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_mag,
    scale_hi, scale_lo,
    HAS_WSQ: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    n_ok, r_ok = rn < N, rr < R
    w_ptrs = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :] * stride_wk
    a_ptrs = A + rr[None, :] * stride_ar + rk[:, None] * stride_ak  # a [K, r] tile of Aᵀ
    wa = tl.zeros((BLOCK_N, BLOCK_R), ACC)
    sq = tl.zeros((BLOCK_N,), ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        # ieee even for fp32 under allow_tf32: c multiplies every output, 1e-3 there is too much
        wa = _common.dot(w, a, wa, UPCAST, "ieee")
        if not HAS_WSQ:
            wf = w.to(ACC)
            sq += tl.sum(wf * wf, axis=1)
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_WSQ:
        sq = tl.load(WSQ + rn, mask=n_ok, other=0.0).to(ACC)
    b = tl.load(B + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
    # ‖s·B_n A‖² = s²·B_n G B_nᵀ (G = AAᵀ, symmetric): one rank at a time, (B_n G)_i = Σ_j B_nj G_ji
    # from row i of G, with no tl.dot: an fp32 product in a 16-bit kernel would run on CUDA cores
    # with G whole in registers (at r = 128 that alone was 128 a thread, and spilled).
    bgb = tl.zeros((BLOCK_N,), ACC)
    for i in range(0, R):
        g_i = tl.load(GRAM + i * R + rr, mask=r_ok, other=0.0).to(ACC)
        b_i = tl.load(B + rn.to(tl.int64) * stride_bn + i * stride_br, mask=n_ok, other=0.0).to(ACC)
        bgb += b_i * tl.sum(b * g_i[None, :], axis=1)
    s = _scalar(scale_hi, scale_lo, ACC)
    n2 = sq + 2.0 * s * tl.sum(b * wa, axis=1) + s * s * bgb
    # Rounding can push a (near-)zero norm² below zero; the true value never is.
    rnorm = 1.0 / tl.sqrt(tl.where(n_ok, tl.maximum(n2, 0.0), 1.0))  # lanes past N: no 1/0
    mag = tl.load(MAG + rn * stride_mag, mask=n_ok, other=0.0).to(ACC)
    tl.store(RNORM + rn, rnorm, mask=n_ok)
    tl.store(C + rn, mag * rnorm, mask=n_ok)


@triton.jit
def _dora_fwd_kernel(
    X,       # [M, K] input rows, any strides
    XD,      # [M, K] drop(x), any strides (unused without DUAL)
    W,       # [N, K] frozen weight, any strides (GPT-2 Conv1D hands in a transposed view)
    BIAS,    # [N] (unused without HAS_BIAS)
    A,       # [r, K] lora_A, any strides (unused without FUSED)
    B,       # [N, r] lora_B, any strides
    C,       # [N] c = m/‖W0 + s·BA‖, compute dtype
    U,       # [M, r] compute dtype, contiguous: out when FUSED (column tile 0 writes it), else in
    Y,       # [M, N] out, contiguous, x's dtype
    Z,       # [M, N] out, contiguous, x's dtype: z = W0x' + s·uBᵀ (unused without SAVE_Z)
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_dm, stride_dk, stride_wn, stride_wk, stride_bias,
    stride_ar, stride_ak, stride_bn, stride_br,
    scale_hi, scale_lo,
    DUAL: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Consecutive programs walk GROUP_M row tiles down one column tile: its W0 tile stays in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m, pid_n = first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok, n_ok, r_ok = rm < M, rn < N, rr < R
    rows = rm.to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + rk[None, :] * stride_xk
    d_ptrs = XD + rows[:, None] * stride_dm + rk[None, :] * stride_dk
    w_ptrs = W + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk  # a [K, N] tile of W0ᵀ
    a_ptrs = A + rr[None, :] * stride_ar + rk[:, None] * stride_ak              # a [K, r] tile of Aᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)       # W0 x
    if DUAL:
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), ACC)  # W0 x', from the same W0 tile
    if FUSED:
        u = tl.zeros((BLOCK_M, BLOCK_R), ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _common.dot(x, w, acc, UPCAST, PRECISION)
        if DUAL:
            x = tl.load(d_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc_d = _common.dot(x, w, acc_d, UPCAST, PRECISION)
            d_ptrs += BLOCK_K * stride_dk
        if FUSED:
            a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            u = _common.dot(x, a, u, UPCAST, PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    u_ptrs = U + rows[:, None] * R + rr[None, :]
    if FUSED:
        if pid_n == 0:
            tl.store(u_ptrs, u.to(U.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])
    else:
        u = tl.load(u_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
    b = tl.load(B + rn.to(tl.int64)[None, :] * stride_bn + rr[:, None] * stride_br,
                mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # an [r, N] tile of Bᵀ
    us = (u * _scalar(scale_hi, scale_lo, ACC)).to(b.dtype)  # in B's dtype, as an eager lora_B(u)
    c = tl.load(C + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    if DUAL:
        z = _common.dot(us, b, acc_d, UPCAST, PRECISION)
        y = acc - acc_d + z * c
    else:
        z = _common.dot(us, b, acc, UPCAST, PRECISION)
        y = z * c
    if HAS_BIAS:
        y += tl.load(BIAS + rn * stride_bias, mask=n_ok, other=0.0).to(ACC)[None, :]
    out = rows[:, None] * N + rn[None, :]
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if SAVE_Z:
        tl.store(Z + out, z.to(Z.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# M = 1 specialised (a decode step's backward) spilled 4 B at 96 registers in 16-bit (sm_90,
# Triton 3.6: benchmarks/triton_sm90.py --ops dora --kernel dora_bwd_scale); the constant buys nothing.
@triton.jit(do_not_specialize=["M"])
def _dora_bwd_scale_kernel(
    G,        # [M, N] upstream gradient, contiguous
    Z,        # [M, N] saved z (or y = c⊙z), contiguous (unused without NEED_DM)
    C,        # [N] c, compute dtype
    GC,       # [M, N] out, contiguous, g's dtype: g⊙c
    GM,       # [M, N] out, contiguous, g's dtype: g⊙(c − 1) (dropout's second base product; WRITE_GM)
    DM_PART,  # [S, N] out, compute dtype: row chunk s's share of Σ g⊙z
    M, N, M_CHUNK,
    NEED_DM: tl.constexpr, WRITE_GM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # grid (column tiles, row chunks S): g is read once, gc written once.
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    c = tl.load(C + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    dm = tl.zeros((BLOCK_N,), ACC)
    m_start = pid_s * M_CHUNK
    m_end = tl.minimum(M, m_start + M_CHUNK)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        ok = (rm < m_end)[:, None] & n_ok[None, :]
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        g = tl.load(G + offs, mask=ok, other=0.0).to(ACC)
        tl.store(GC + offs, (g * c).to(GC.dtype.element_ty), mask=ok)
        if WRITE_GM:
            tl.store(GM + offs, (g * (c - 1.0)).to(GM.dtype.element_ty), mask=ok)
        if NEED_DM:
            dm += tl.sum(g * tl.load(Z + offs, mask=ok, other=0.0).to(ACC), axis=0)
    if NEED_DM:
        tl.store(DM_PART + pid_s.to(tl.int64) * N + rn, dm, mask=n_ok)


# ----------------------------------------------------------------------------- launch helpers

_SMEM_BUDGET = 192 << 10  # bytes of pipelined tiles per program (H100/H200: 227 KB, minus epilogue)


def _config(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Short and conservative on purpose (blocks ≤ 128, ≤ 3 stages): a static sm_90 spill gate runs on it.
_FWD_CONFIGS = [_config(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8) for bm, bn, bk, w, s in [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
    (32, 64, 128, 4, 3), (16, 64, 128, 4, 3), (16, 32, 128, 4, 2)]]
_NORM_CONFIGS = [_config(4, s, BLOCK_N=bn, BLOCK_K=bk) for bn, bk, s in [
    (32, 128, 3), (64, 64, 3), (32, 64, 2), (16, 128, 3), (16, 32, 3)]]


# Register rules, from what ptxas made of every config for sm_90 (Triton 3.6, ptxas 12.8; rerun
# `python benchmarks/triton_sm90.py --full --ops dora`; table in
# benchmarks/results/triton-sm90-3.6.0.md).
# Values a thread keeps live, in 4-byte words (fp64: two):
# - forward, 16-bit on tensor cores: accumulators (two with dropout) plus the [BM, BR] tile of u
#   (with dropout counted twice) within LIVE_TC = 112 (tf32 by the same rule, not measured): with
#   dropout at 128 (BM64 BN64 w4, r = 64) it spilled 856 B, at 256 / 384 (128x128 w8 / 128x64 w4,
#   r = 128) 164 / 112 B;
# - forward, fp32 on CUDA cores (operands in registers): accumulators and one stage of operand
#   tiles within LIVE_FMA = 96 (BM32 BN64 BK128 with dropout, 160, spilled 12-80 B), the epilogue's
#   accumulators, u tile and Bᵀ tile within LIVE_FMA_EPILOGUE = 96 (BM64 BN64 w4 at r = 128, 160,
#   spilled 2268 B);
# - misaligned sizes or strides (K = N = 1000, loaded element by element): the output tile plus
#   one stage within LIVE_MISALIGNED = 80 on tensor cores (BM64 BN64 BK64 at r = 8, 104, spilled
#   124 B; BM64 BN128, 168, 1268 B) and LIVE_FMA_MISALIGNED = 64 on CUDA cores (BM16 BN64 BK128, 106: 312 B).
# When no tile passes, the one with the fewest live values runs (a spilling tile is no faster).
LIVE_TC, LIVE_FMA, LIVE_FMA_EPILOGUE, LIVE_MISALIGNED, LIVE_FMA_MISALIGNED = 112, 96, 96, 80, 64
_FWD_INTS = ("N", "K", "stride_xm", "stride_dm", "stride_wn", "stride_ar")


def _prune_fwd(configs, named_args, **kwargs):
    """Keep tiles that fit shared memory and the register rules above, and among them those whose
    row tile suits the row count (when none does, the ones that fit)."""
    esize, m = named_args["X"].element_size(), named_args["M_BUCKET"]
    fma = esize >= 4 and kwargs.get("PRECISION", "ieee") == "ieee"
    loose = _common.misaligned(named_args, _FWD_INTS)
    dual, fused, br = 1 if kwargs["DUAL"] else 0, 1 if kwargs["FUSED"] else 0, kwargs["BLOCK_R"]

    def live(c):
        """(values a thread keeps live in the main loop / epilogue, its limit) in 4-byte words."""
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        threads, words = 32 * c.num_warps, max(1, esize // 4)
        if fma:
            main = (1 + dual) * (bm * bn + bm * bk) + bk * bn + fused * (bm * br + bk * br)
            epilogue = (1 + dual) * bm * bn + bm * br + br * bn
            main_limit = LIVE_FMA_MISALIGNED if loose else LIVE_FMA
            if epilogue / LIVE_FMA_EPILOGUE > main / main_limit:
                return epilogue * words / threads, LIVE_FMA_EPILOGUE
            return main * words / threads, main_limit
        acc = (1 + dual) * (bm * bn + bm * br) / threads
        streamed = (bm * bn + ((1 + dual) * bm + bn + fused * br) * bk) / threads
        if loose and streamed / LIVE_MISALIGNED > acc / LIVE_TC:
            return streamed, LIVE_MISALIGNED
        return acc, LIVE_TC

    def fits(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        stage = ((1 + dual) * bm + bn + fused * br) * bk * esize
        used, limit = live(c)
        return (esize < 8 or bm * bn <= 64 * 64) and used <= limit and stage * c.num_stages <= _SMEM_BUDGET

    def rows(c):
        bm = c.kwargs["BLOCK_M"]
        return bm >= 64 if m > 64 else bm <= max(16, m)
    fit = [c for c in configs if fits(c)]
    return [c for c in fit if rows(c)] or fit or [min(configs, key=lambda c: live(c)[0] / live(c)[1])]


def _prune_norm(configs, named_args, **kwargs):
    """fp64 keeps to [BN, BR] tiles of 64 x 64; fp32 (CUDA-core dot, the W0 and Aᵀ tiles in
    registers) to BN <= 32 and BK·BR <= 4096: at r = 64 BN16 BK128 spilled 92 B, BN64 BK64 1628 B
    (measured while B G Bᵀ was still a tl.dot; the configs this rule keeps do not spill now).
    16-bit with a misaligned size or stride (element-by-element loads): one stage of W0 and Aᵀ
    tiles plus the accumulator within 88 values a thread: at r = 64, 96 (BN64 BK64) and 112
    (BN32 BK128) spilled 252 / 152 B, 88 (BN16 BK128) none. (Same run as _prune_fwd's rules.)"""
    esize, br = named_args["W"].element_size(), kwargs["BLOCK_R"]
    loose = _common.misaligned(named_args, ("N", "K", "stride_wn", "stride_ar"))

    def ok(c):
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if esize == 8:
            return bn * br <= 64 * 64
        if esize == 4:
            return bn <= 32 and bk * br <= 4096
        return not loose or (bn + br) * bk + bn * br <= 88 * 32 * c.num_warps
    kept = [c for c in configs if ok(c)]
    return kept or [configs[-1]]


def _autotuned(kernel, configs, key, prune):
    # The autotuner needs a GPU driver; under the interpreter the plain kernel runs one fixed config.
    if _common.INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=key, prune_configs_by=_common.prune_by(prune))(kernel)


_fwd = _autotuned(_dora_fwd_kernel, _FWD_CONFIGS, ["M_BUCKET", "N", "K", "R", "DUAL", "FUSED", "SAVE_Z"],
                  _prune_fwd)
_norm = _autotuned(_dora_norm_kernel, _NORM_CONFIGS, ["N", "K", "R", "HAS_WSQ"], _prune_norm)
_INTERP_BLOCK = 32  # small, so the small test shapes cross tile boundaries
_SCALE_BLOCK_M, _SCALE_BLOCK_N = (16, 32) if _common.INTERPRET else (32, 128)


def row_scale(weight, lora_A, lora_B, magnitude, w_sq, scaling):
    """(c, 1/‖W0 + s·BA‖) per output row, compute dtype, from one read of W0."""
    N, K = weight.shape
    r = lora_A.shape[0]
    ct = compute_dtype(weight.dtype)
    # r×r×K: negligible next to the N×r×K of W0 Aᵀ. An fp32 matmul would run in TF32 under
    # allow_tf32, and like W0 Aᵀ in the kernel (ieee) this term sets c, which scales every output:
    # fp32 gets it through fp64, never TF32.
    a = lora_A.to(torch.float64 if ct == torch.float32 else ct)
    gram = (a @ a.T).to(ct).contiguous()
    c = _common.empty((N,), ct, weight.device)
    rnorm = _common.empty((N,), ct, weight.device)
    scale_hi, scale_lo = _fp32_halves(float(scaling), weight.dtype)
    _launch(_norm, lambda meta: (_common.cdiv(N, meta["BLOCK_N"]),),
            (weight, lora_A, lora_B, gram, magnitude, w_sq if w_sq is not None else c, c, rnorm, N, K, r,
             weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
             lora_B.stride(1), magnitude.stride(0), scale_hi, scale_lo),
            dict(HAS_WSQ=w_sq is not None, ACC=_ACC[weight.dtype], UPCAST=_common.upcast_bf16_dot(weight.dtype),
                 BLOCK_R=_rank_block(r)),
            dict(BLOCK_N=16, BLOCK_K=_INTERP_BLOCK, num_warps=4))
    return c, rnorm


def forward(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, dropout_p, seed, save_z):
    """Same contract as reference.dora.forward: (y, u, c, 1/‖·‖, z or empty)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    if M == 0 or N == 0:
        return ref.forward(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, dropout_p, seed, save_z)
    ct = compute_dtype(x.dtype)
    c, rnorm = row_scale(weight, lora_A, lora_B, magnitude, w_sq, scaling)
    dual = dropout_p > 0.0
    xd = apply_dropout(x, dropout_mask(x.shape, dropout_p, seed, x.device), dropout_p) if dual else x
    fused = _fuse_u(M, N, K, r, x.element_size())
    # not fused: u in x's dtype from cuBLAS (fp32 accumulation), as PEFT's eager lora_A(x); no fp32 copy of x
    u = _common.empty((M, r), ct, x.device) if fused else torch.matmul(xd, lora_A.t()).to(ct).contiguous()
    y = _common.empty((M, N), x.dtype, x.device)
    z = _common.empty((M, N), x.dtype, x.device) if save_z else empty_grad(x)
    scale_hi, scale_lo = _fp32_halves(float(scaling), x.dtype)
    bucket = min(_common.next_pow2(M), 1 << 16)
    _launch(_fwd, lambda meta: (_common.cdiv(M, meta["BLOCK_M"]) * _common.cdiv(N, meta["BLOCK_N"]),),
            (x, xd, weight, bias if bias is not None else y, lora_A, lora_B, c, u, y, z if save_z else y,
             M, N, K, r, bucket, x.stride(0), x.stride(1), xd.stride(0), xd.stride(1), weight.stride(0),
             weight.stride(1), bias.stride(0) if bias is not None else 0, lora_A.stride(0), lora_A.stride(1),
             lora_B.stride(0), lora_B.stride(1), scale_hi, scale_lo),
            dict(DUAL=dual, FUSED=fused, HAS_BIAS=bias is not None, SAVE_Z=save_z, ACC=_ACC[x.dtype],
                 UPCAST=_common.upcast_bf16_dot(x.dtype), PRECISION=_common.input_precision(x.dtype),
                 BLOCK_R=_rank_block(r)),
            dict(BLOCK_M=16 if M <= 16 else _INTERP_BLOCK, BLOCK_N=_INTERP_BLOCK, BLOCK_K=_INTERP_BLOCK,
                 GROUP_M=4, num_warps=4))
    return y, u, c, rnorm, z


def _row_chunks(M: int, programs: int, device: torch.device):
    """(chunk, count) of the row split of the scale pass: enough programs to fill the device."""
    target = 2 * _common.sm_count(device) if device.type == "cuda" else 4
    wanted = max(1, min(-(-target // max(programs, 1)), -(-M // _SCALE_BLOCK_M)))
    chunk = -(-M // wanted)
    chunk = -(-chunk // _SCALE_BLOCK_M) * _SCALE_BLOCK_M
    return chunk, -(-M // chunk)


def backward(g, x, weight, lora_A, lora_B, u, c, rnorm, z, scaling, dropout_p, seed,
             need_dx: bool, need_dW: bool, need_db: bool, need_dm: bool, z_is_y: bool = False):
    """Same contract as reference.dora.backward: (dx, dA, dB, d magnitude, dW, db)."""
    M, N = x.shape[0], weight.shape[0]
    if M == 0 or N == 0:
        return ref.backward(g, x, weight, lora_A, lora_B, u, c, rnorm, z, scaling, dropout_p, seed,
                            need_dx, need_dW, need_db, need_dm, z_is_y)
    ct, dropout = compute_dtype(x.dtype), dropout_p > 0.0
    gc = _common.empty((M, N), g.dtype, g.device)
    gm = _common.empty((M, N), g.dtype, g.device) if dropout and (need_dx or need_dW) else gc
    col_tiles = -(-N // _SCALE_BLOCK_N)
    m_chunk, S = _row_chunks(M, col_tiles, g.device)
    dm_parts = _common.empty((S, N), ct, g.device) if need_dm else c
    kernel = _dora_bwd_scale_kernel[(col_tiles, S)]
    kernel(g, z if need_dm else g, c, gc, gm, dm_parts, M, N, m_chunk, NEED_DM=need_dm, WRITE_GM=gm is not gc,
           ACC=_ACC[x.dtype], BLOCK_M=_SCALE_BLOCK_M, BLOCK_N=_SCALE_BLOCK_N, num_warps=4)
    # z_is_y: the pass summed g⊙y = c⊙(g⊙z)
    dm = (dm_parts.sum(0) * (rnorm / c if z_is_y else rnorm)).to(weight.dtype) if need_dm else empty_grad(weight)
    db = g.sum(0, dtype=ct).to(weight.dtype) if need_db else empty_grad(weight)
    if not dropout:  # exactly LoRA's backward with g⊙c for g
        dx, dA, dB, dW, _ = _lora.backward(gc, x, weight, lora_A, lora_B, u, scaling, 0.0, 0, need_dx, need_dW, False)
        return dx, dA, dB, dm, dW, db
    # Dropout: dA = vᵀx', dB = s·gcᵀu are LoRA's on x' = drop(x); dx = gW0 + drop'(g(c−1)W0 + vA)
    # and dW0 = gᵀx + (g(c−1))ᵀx' take two more base GEMMs (in x's dtype, as PEFT's autograd does).
    mask = dropout_mask(x.shape, dropout_p, seed, x.device)
    xd = apply_dropout(x, mask, dropout_p)
    _, dA, dB, _, _ = _lora.backward(gc, xd, weight, lora_A, lora_B, u, scaling, 0.0, 0, False, False, False)
    dx = dW = empty_grad(x)
    if need_dx:
        v = torch.matmul(gc, lora_B) * scaling
        low = torch.addmm(torch.matmul(v, lora_A), gm, weight)
        dx = torch.matmul(g, weight).add_(apply_dropout(low, mask, dropout_p))
    if need_dW:
        dW = torch.matmul(g.t(), x).addmm_(gm.t(), xd)
    return dx, dA, dB, dm, dW if need_dW else empty_grad(weight), db


def supports(x, lora_A=None, *tensors) -> Optional[str]:
    if x.dtype not in _ACC:
        return f"the Triton DoRA kernels take float16, bfloat16, float32 or float64 inputs, got {x.dtype}"
    if lora_A is not None and lora_A.shape[0] > _MAX_R:
        return f"the Triton DoRA kernels take ranks up to {_MAX_R}, got r = {lora_A.shape[0]}"
    return None
