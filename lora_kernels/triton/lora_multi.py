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
    a gathered GEMV against that row's A_i, the shape Punica's BGMV uses (rows stay unsorted:
    they fit one row tile of the GEMM, which walks its adapters in any order);
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
import triton.language as tl

from ..reference import compute_dtype, empty_grad
from . import _common
# Launch, fp64-scalar and dropout-argument rules are LoRA's: one seed, one keep-mask in both ops.
from .lora import _dropout_args, _interp_m, _launch, _m_bucket
from .lora_multi_configs import (da as _da, down_rows as _down_rows, down_seg as _down_seg, dx as _dx,
                                 fwd as _fwd, gb as _gb)

_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}
_MAX_BLOCK_R = 64     # rank columns one program holds; larger ranks loop over chunks of this
_K_GRANULE = 256      # column chunks of the split down projection: a multiple of every BLOCK_K
_DECODE_M = 16        # up to this many rows, u comes from the per-row (gathered GEMV) kernel

# Under the interpreter: small blocks, so the small test shapes cross tile boundaries, and a
# granule to match, so they also exercise the split reductions.
_INTERP_BLOCK = 32
if _common.INTERPRET:
    _K_GRANULE = _INTERP_BLOCK


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


def _routing(adapter_ids, n: int, segments: bool = True):
    """(permutation sorting the rows by adapter, sorted int32 ids, and with ``segments`` the
    [n + 1] first sorted position of each adapter and the end of the last), all on the device,
    without a host sync."""
    sorted_ids, perm = torch.sort(adapter_ids, stable=True)
    if not segments:
        return perm, sorted_ids.to(torch.int32), None
    bounds = torch.arange(0, n + 1, device=adapter_ids.device, dtype=sorted_ids.dtype)
    return perm, sorted_ids.to(torch.int32), torch.searchsorted(sorted_ids, bounds)


def _common_args(dtype):
    return dict(ACC=_ACC[dtype], UPCAST=_common.upcast_bf16_dot(dtype), PRECISION=_common.input_precision(dtype))


def _rank_block(r: int) -> int:
    return min(max(16, _common.next_pow2(r)), _MAX_BLOCK_R)


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
    decode = M <= _DECODE_M
    # Decode rows fit one row tile (every BLOCK_M >= 16 = _DECODE_M): sorting them would change
    # nothing there but cost three small launches, a good part of a decode step.
    perm, sorted_ids = (adapter_ids, adapter_ids) if decode else _routing(adapter_ids, n, segments=False)[:2]
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
            dict(SORTED=not decode, STORE_U=S > 1, HAS_BIAS=bias is not None, BLOCK_R=block_r, **common),
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
