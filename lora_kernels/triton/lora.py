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
import triton.language as tl

from ..reference import compute_dtype, empty_grad
from . import _common
from .lora_configs import da as _da, down as _down, dx as _dx, fwd as _fwd, gb as _gb

_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}
_MAX_BLOCK_R = 64     # rank columns one program holds; larger ranks loop over chunks of this
_M_GRANULE = 128      # row chunks of the split reductions: a multiple of every tuned BLOCK_M
_K_GRANULE = 256      # column chunks of the split down projection: a multiple of every BLOCK_K
# Crude H100 figures for the fused-or-split choice of the forward (awaiting GPU measurement).
_HBM_BYTES_PER_S, _L2_BYTES_PER_S, _LAUNCH_S = 3.0e12, 8.0e12, 4e-6
_FLOPS = {2: 6.0e14, 4: 5.0e13, 8: 5.0e13}  # dense rate by element size (fp32 without tf32)


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
        # B's tile and dB's accumulator ([BLOCK_N, BLOCK_R] each) stay in registers: fp32 (on CUDA
        # cores, operands in registers too) spilled at BLOCK_N = 64 with BLOCK_R = 64 in sm_90 builds.
        block_n = {2: 256 if block_r <= 32 else 128, 4: 32, 8: 32}[g.element_size()]
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
