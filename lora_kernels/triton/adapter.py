"""Houlsby bottleneck adapter in Triton: y = x + s·(act(x W_dᵀ + b_d) W_uᵀ + b_u).

The op moves ~r FLOP per byte, so the kernels are organised around the big [M, K] tensors:

* forward, one kernel: a program owns BLOCK_M rows; it reduces them over K into h, keeps h
  in registers, then streams y out chunk by chunk, re-reading x while it is still in L2;
* backward, rows kernel: the same shape of program computes dh = (s·g W_u) ⊙ act'(h) and
  dx = g + dh W_d, and leaves dh and act(h) (small, [M, r]) for the weight gradients;
* backward, weights kernel: a program owns a K × r tile of dW_u and dW_d and reduces over a
  stripe of rows; stripes (when there are several) are summed by a third, tiny kernel, in
  a fixed order, so the gradients are deterministic (no float atomics).

When r is wider than one register tile (BLOCK_R), the [M, r] intermediates go through memory
between the two phases of a rows program instead of registers.
"""
from typing import Optional

import torch
import triton.language as tl

from ..reference import compute_dtype, empty_grad
from . import _common
from .adapter_configs import tuned as _tuned
from .adapter_kernels import (ACTIVATIONS, _adapter_bwd_reduce_kernel, _adapter_bwd_rows_kernel,
                              _adapter_bwd_weights_kernel, _adapter_fwd_kernel)


_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}
# Widest bottleneck tile held in registers as a [BLOCK_M, BLOCK_R] accumulator; wider r is
# tiled and its [M, r] intermediates go through memory.
_MAX_BLOCK_R = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 128, torch.float64: 64}
# The interpreter runs one fixed, small configuration so that tests cross block boundaries.
_INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_K=32, num_warps=4)
_INTERPRET_SMS = 4
_ROWS_ALIGN = 128  # row stripes of the weights kernel are a multiple of every BLOCK_M


def _block_r(r: int, dtype: torch.dtype) -> int:
    return min(max(16, _common.next_pow2(r)), _MAX_BLOCK_R[dtype])


def _m_bucket(m: int) -> int:
    return min(_common.next_pow2(m), 1 << 15)


def _launch(kernel, grid, args, meta, block_r, itemsize):
    """One fixed config under the interpreter (autotune needs a GPU driver); autotuned on GPU."""
    if _common.INTERPRET:
        fixed = {k: v for k, v in _INTERPRET_BLOCKS.items() if k not in meta}
        kernel[grid(fixed)](*args, **meta, **fixed)
    else:
        _tuned(kernel.__name__, block_r, itemsize)[grid](*args, **meta)


def _dot_meta(dtype: torch.dtype) -> dict:
    return dict(ACC=_ACC[dtype], UPCAST=_common.upcast_bf16_dot(dtype),
                PRECISION=_common.input_precision(dtype))


def forward(x, w_down, b_down, w_up, b_up, activation, scale):
    """x:[M,K] -> (y:[M,K] in x.dtype, h = x W_dᵀ + b_d:[M,r] in the compute dtype)."""
    m, k = x.shape
    r = w_down.shape[0]
    y = _common.empty((m, k), x.dtype, x.device)
    h = _common.empty((m, r), compute_dtype(x.dtype), x.device)
    if m == 0:
        return y, h
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    b_down = b_down.contiguous() if b_down is not None else None
    b_up = b_up.contiguous() if b_up is not None else None
    block_r = _block_r(r, x.dtype)
    one_tile = r <= block_r
    ah = h if one_tile else _common.empty((m, r), x.dtype, x.device)
    args = (x, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up,
            y, h, ah, m, k, r, x.stride(0), x.stride(1), *_common.split_fp32(scale), _m_bucket(m))
    meta = dict(ACT=ACTIVATIONS[activation], HAS_BD=b_down is not None, HAS_BU=b_up is not None,
                ONE_R_TILE=one_tile, BLOCK_R=block_r, **_dot_meta(x.dtype))
    _launch(_adapter_fwd_kernel, lambda c: (_common.cdiv(m, c["BLOCK_M"]),), args, meta,
            block_r, x.element_size())
    return y, h


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_SMS
    return _common.sm_count(device)


def _weights_blocks(r: int, k: int, dtype: torch.dtype, misaligned: bool = False):
    """(BLOCK_R, BLOCK_K) of the weights kernel: two [BLOCK_R, BLOCK_K] accumulators in registers.
    fp32 with misaligned rows (element-wise loads) gets fp64's budget: with 16384 elements it
    spilled 436 B a thread in sm_90 builds (adapter_configs.py)."""
    block_r = _block_r(r, dtype)
    if _common.INTERPRET:
        return block_r, _INTERPRET_BLOCKS["BLOCK_K"]
    small = dtype == torch.float64 or (dtype == torch.float32 and misaligned)
    budget = 8192 if small else 16384  # accumulator elements per program
    block_k = max(16, min(128, budget // (2 * block_r), _common.next_pow2(k)))
    return block_r, block_k


def _row_splits(m: int, r: int, tiles: int, device: torch.device):
    """How many row stripes the weights kernel reduces separately: enough programs to fill the
    GPU, but stripes long enough (>= 16·r rows) that the partials stay small next to g and x."""
    want = _common.cdiv(2 * _num_sms(device), tiles)
    splits = max(1, min(want, m // max(16 * r, 512)))
    rows = _common.cdiv(_common.cdiv(m, splits), _ROWS_ALIGN) * _ROWS_ALIGN
    return _common.cdiv(m, rows), rows


def backward(g, x, w_down, w_up, h, activation, scale,
             need_dx: bool, need_dbd: bool, need_dbu: bool):
    """Gradients (dx, dW_d, db_d, dW_u, db_u); the ones not needed come back empty."""
    m, k = x.shape
    r = w_down.shape[0]
    dev, dtype = x.device, x.dtype
    dx = _common.empty((m, k), dtype, dev) if need_dx else empty_grad(x)
    dwd = _common.empty((r, k), w_down.dtype, dev)
    dwu = _common.empty((k, r), w_up.dtype, dev)
    dbd = _common.empty((r,), w_down.dtype, dev) if need_dbd else empty_grad(w_down)
    dbu = _common.empty((k,), w_up.dtype, dev) if need_dbu else empty_grad(w_up)
    if m == 0:  # sums over no rows
        for t in (dwd, dwu, dbd, dbu):
            t.zero_()
        return dx, dwd, dbd, dwu, dbu
    w_down, w_up, h = w_down.contiguous(), w_up.contiguous(), h.contiguous()
    scale_parts = _common.split_fp32(scale)
    bucket = _m_bucket(m)
    dot_meta = _dot_meta(dtype)

    block_r = _block_r(r, dtype)
    dh = _common.empty((m, r), dtype, dev)
    ah = _common.empty((m, r), dtype, dev)
    args = (g, w_down, w_up, h, dh, ah, dx if need_dx else g, m, k, r, g.stride(0), g.stride(1),
            *scale_parts, bucket)
    meta = dict(ACT=ACTIVATIONS[activation], NEED_DX=need_dx, ONE_R_TILE=r <= block_r, BLOCK_R=block_r,
                **dot_meta)
    _launch(_adapter_bwd_rows_kernel, lambda c: (_common.cdiv(m, c["BLOCK_M"]),), args, meta,
            block_r, x.element_size())

    ints = dict(k=k, g=g.stride(0), x=x.stride(0))
    block_r, block_k = _weights_blocks(r, k, dtype, _common.misaligned(ints, ints))
    r_tiles, k_tiles = _common.cdiv(r, block_r), max(1, _common.cdiv(k, block_k))
    splits, rows_per_split = _row_splits(m, r, r_tiles * k_tiles, dev)
    if splits == 1:
        targets = (dwu, dwd, dbu, dbd)
    else:
        part = compute_dtype(dtype)
        targets = (_common.empty((splits, k, r), part, dev), _common.empty((splits, r, k), part, dev),
                   _common.empty((splits, k), part, dev), _common.empty((splits, r), part, dev))
    bu_t, bd_t = (targets[2] if need_dbu else targets[0]), (targets[3] if need_dbd else targets[0])
    args = (g, x, ah, dh, targets[0], targets[1], bu_t, bd_t, m, k, r, g.stride(0), g.stride(1),
            x.stride(0), x.stride(1), rows_per_split, *scale_parts, bucket)
    meta = dict(HAS_DBU=need_dbu, HAS_DBD=need_dbd, BLOCK_R=block_r, BLOCK_K=block_k, **dot_meta)
    _launch(_adapter_bwd_weights_kernel, lambda c: (r_tiles, k_tiles, splits), args, meta,
            block_r, x.element_size())

    if splits > 1:
        block = 1024
        n = max(k * r, k, r)
        _adapter_bwd_reduce_kernel[(_common.cdiv(n, block),)](
            targets[0], targets[1], bu_t, bd_t, dwu, dwd, dbu if need_dbu else dwu, dbd if need_dbd else dwu,
            splits, k, r, HAS_DBU=need_dbu, HAS_DBD=need_dbd, BLOCK=block)
    return dx, dwd, dbd, dwu, dbu


def supports(*tensors) -> Optional[str]:
    x = tensors[0]
    if x.dtype not in _ACC:
        return f"the Triton adapter kernels take float16, bfloat16, float32 or float64, got {x.dtype}"
    return None
