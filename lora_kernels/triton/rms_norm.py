"""RMSNorm for LN-tuning in Triton: a one-pass forward, and a backward that always yields dγ
(fp32 partials per program, then one fixed-order sum) and dx only when asked.

The structure is layer_norm.py's: rows that fit in registers are owned whole by one program;
wider rows are chunked (the forward re-reads its row inside one program, so the second read can
come from L2; the backward tiles the [M, N] plane by columns, after a row pass for dx's row term).
With dx not needed the backward reads g and x once and writes only the column partials.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import compute_dtype, empty_grad
from . import _common
# layer_norm's pure helpers serve both; _whole_row_tile and _max_programs stay per module: they read
# this module's own _TILE and _INTERPRETER_PROGRAMS (the tests shrink those per op).
from .layer_norm import _layer_norm_bwd_reduce_kernel, _rsqrt, _tl_dtype, _warps

# Same limits and tiles as layer_norm.py (the same register budget per element, one fewer
# accumulator): see there.
_FWD_MAX_FUSED = 16384
_BWD_MAX_FUSED = 8192
_TILE = 4096
_CHUNK = 4096
_WIDE_BWD_BLOCK_N = 1024
_WIDE_BWD_BLOCK_M = 4
_INTERPRETER_PROGRAMS = 4


@triton.jit
def _rms_norm_fwd_kernel(
    X,      # [M, N] input, any strides
    Y,      # [M, N] output, contiguous, x's dtype
    W,      # [N] γ (unused when not HAS_W)
    RSTD,   # [M] fp32 (fp64 for fp64 x); unused when not STATS
    M, N, stride_xm, stride_xn,
    eps_hi, eps_lo,  # eps split in two fp32 scalars (Triton passes floats as fp32)
    off_hi, off_lo,  # the offset added to γ, split likewise
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WHOLE_ROW: tl.constexpr, STATS: tl.constexpr,
):
    # Program p normalises the row tiles p, p + P, p + 2P, ...: whole rows load the scale once
    # per program, not once per row (which would read as many bytes of γ as of x, if from cache).
    cols = tl.arange(0, BLOCK_N)
    if WHOLE_ROW:
        if HAS_W:
            s = (tl.load(W + cols, mask=cols < N, other=0).to(ACC) + off_hi) + off_lo
    for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        x_rows = X + rows.to(tl.int64) * stride_xm
        y_rows = Y + rows.to(tl.int64) * N
        if WHOLE_ROW:
            mask = row_ok[:, None] & (cols[None, :] < N)
            x = tl.load(x_rows[:, None] + cols[None, :].to(tl.int64) * stride_xn, mask=mask, other=0).to(ACC)
            rstd = _rsqrt(tl.sum(x * x, axis=1) / N + eps_hi + eps_lo)
            y = x * rstd[:, None]
            if HAS_W:
                y *= s[None, :]
            tl.store(y_rows[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        else:
            # A sum-of-squares pass, then a normalising pass over the row (its second read can come
            # from L2; rows this wide are too big for registers).
            ss = tl.zeros([BLOCK_M], ACC)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c[None, :] < N)
                xc = tl.load(x_rows[:, None] + c[None, :].to(tl.int64) * stride_xn, mask=mask, other=0).to(ACC)
                ss += tl.sum(xc * xc, axis=1)
            rstd = _rsqrt(ss / N + eps_hi + eps_lo)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c[None, :] < N)
                xc = tl.load(x_rows[:, None] + c[None, :].to(tl.int64) * stride_xn, mask=mask, other=0).to(ACC)
                y = xc * rstd[:, None]
                if HAS_W:
                    y *= ((tl.load(W + c, mask=c < N, other=0).to(ACC) + off_hi) + off_lo)[None, :]
                tl.store(y_rows[:, None] + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
        if STATS:
            tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_row_stats_kernel(
    G,      # [M, N] upstream gradient, any strides
    X,      # [M, N] input, any strides
    W,      # [N] γ (unused when not HAS_W)
    RSTD,   # [M] saved rstd (ACC dtype)
    C2,     # [M] out: mean over the row of s⊙g⊙x̂, s = offset + γ (ACC dtype)
    M, N, stride_gm, stride_gn, stride_xm, stride_xn, off_hi, off_lo,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = X + rows.to(tl.int64) * stride_xm
    g_rows = G + rows.to(tl.int64) * stride_gm
    cols = tl.arange(0, BLOCK_N)
    s2 = tl.zeros([BLOCK_M], ACC)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < N)
        c64 = c[None, :].to(tl.int64)
        x = tl.load(x_rows[:, None] + c64 * stride_xn, mask=mask, other=0).to(ACC)
        sg = tl.load(g_rows[:, None] + c64 * stride_gn, mask=mask, other=0).to(ACC)
        if HAS_W:
            sg *= ((tl.load(W + c, mask=c < N, other=0).to(ACC) + off_hi) + off_lo)[None, :]
        s2 += tl.sum(sg * x, axis=1)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0)
    tl.store(C2 + rows, s2 * rstd / N, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    G,        # [M, N] upstream gradient, any strides
    X,        # [M, N] input, any strides
    W,        # [N] γ (unused when not HAS_W)
    RSTD,     # [M] saved rstd (ACC dtype)
    C2,       # [M] row means of s⊙g⊙x̂, when not WHOLE_ROW and NEED_DX (else unused)
    DX,       # [M, N] out, contiguous, x's dtype (unused when not NEED_DX)
    DW_PART,  # [num_programs(0), N] out: this program's Σ g⊙x̂ over its rows (ACC dtype; dγ itself
              # in x's dtype when num_programs(0) == 1)
    M, N, stride_gm, stride_gn, stride_xm, stride_xn, off_hi, off_lo,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr,
):
    # Program (p, j) owns columns j·BLOCK_N.. and the row tiles p, p + P, p + 2P, ... so its
    # column partials stay in registers and are written once; WHOLE_ROW means one column block.
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols[None, :].to(tl.int64)
    if NEED_DX:  # dγ alone needs no γ
        if HAS_W:
            s = (tl.load(W + cols, mask=col_ok, other=0).to(ACC) + off_hi) + off_lo
    dw = tl.zeros([BLOCK_N], ACC)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), n_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        g = tl.load(G + rows[:, None].to(tl.int64) * stride_gm + cols64 * stride_gn, mask=mask, other=0).to(ACC)
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + cols64 * stride_xn, mask=mask, other=0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0)
        xhat = x * rstd[:, None]
        if NEED_DW:
            dw += tl.sum(g * xhat, axis=0)
        if NEED_DX:
            if HAS_W:
                sg = g * s[None, :]
            else:
                sg = g
            if WHOLE_ROW:
                c2 = tl.sum(sg * xhat, axis=1) / N
            else:
                c2 = tl.load(C2 + rows, mask=row_ok, other=0)
            dx = (sg - xhat * c2[:, None]) * rstd[:, None]
            tl.store(DX + rows[:, None].to(tl.int64) * N + cols64, dx.to(DX.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw.to(DW_PART.dtype.element_ty), mask=col_ok)


# As in layer_norm.py: the forward's warp count is tuned on a GPU (one fixed count under the
# interpreter); the backward is not, so that dγ's reduction tree never changes between processes.
def _prune_fwd(configs, named_args, **kwargs):
    """Whole rows live in registers (the x tile and γ, in the accumulator's dtype): keep the warp
    counts that hold at most 48 such values a thread. Measured (benchmarks/triton_sm90.py --full
    --ops rms_norm --kernel rms_norm_fwd, Triton 3.6, sm_90, fp32): N = 16384 at 4 warps (256 a
    thread) used 255 registers and spilled 112 B, N = 8192 at 8 warps (64) 80 registers and 4 B."""
    if not kwargs["WHOLE_ROW"]:
        return configs
    words = 2 if named_args["X"].element_size() == 8 else 1
    live = (kwargs["BLOCK_M"] + (1 if kwargs["HAS_W"] else 0)) * kwargs["BLOCK_N"] * words
    kept = [c for c in configs if live <= 48 * 32 * c.num_warps]
    return kept or [configs[-1]]


_fwd_kernel = _rms_norm_fwd_kernel if _common.INTERPRET else triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16)],
    key=["N", "BLOCK_M", "BLOCK_N", "WHOLE_ROW", "STATS"], prune_configs_by=_common.prune_by(_prune_fwd),
)(_rms_norm_fwd_kernel)


def _whole_row_tile(width: int):
    block_n = _common.next_pow2(width)
    return max(1, min(64, _TILE // block_n)), block_n


def _max_programs(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return _common.sm_count(device) * per_sm


def forward(x, weight, eps, offset, stats: bool = True):
    """x:[M, N] (any strides) -> (y:[M, N] in x.dtype, rstd:[M] in fp32, fp64 for fp64).
    ``stats=False`` (inference: no backward will read it) skips rstd: None."""
    m, n = x.shape
    ct = compute_dtype(x.dtype)
    y = _common.empty((m, n), x.dtype, x.device)
    rstd = _common.empty((m,), ct, x.device) if stats else None
    if m == 0:
        return y, rstd
    weight = weight.contiguous() if weight is not None else None
    whole_row = _common.next_pow2(n) <= _FWD_MAX_FUSED
    block_m, block_n = _whole_row_tile(n) if whole_row else (1, _CHUNK)
    eps_hi, eps_lo = _common.split_fp32(eps)
    off_hi, off_lo = _common.split_fp32(offset)
    args = (x, y, x if weight is None else weight, y if rstd is None else rstd,
            m, n, x.stride(0), x.stride(1), eps_hi, eps_lo, off_hi, off_lo)
    meta = dict(HAS_W=weight is not None, ACC=_tl_dtype(ct), BLOCK_M=block_m, BLOCK_N=block_n,
                WHOLE_ROW=whole_row, STATS=stats)
    grid = (min(_common.cdiv(m, block_m), _max_programs(x.device, 8)),)
    if _common.INTERPRET:
        _fwd_kernel[grid](*args, **meta, num_warps=_warps(block_m * block_n))
    else:
        _fwd_kernel[grid](*args, **meta)
    return y, rstd


def backward(g, x, weight, rstd, offset, need_dx: bool, need_dw: bool):
    """Gradients (dx, dγ) of forward; the ones not needed come back as empty placeholders."""
    m, n = x.shape
    ct = compute_dtype(x.dtype)
    dev = x.device
    need_dw = need_dw and weight is not None
    dx = _common.empty((m, n), x.dtype, dev) if need_dx else empty_grad(x)
    dw = _common.empty((n,), x.dtype, dev) if need_dw else empty_grad(x)
    if m == 0:
        dw.zero_()
        return dx, dw
    if not (need_dx or need_dw):
        return dx, dw
    weight = weight.contiguous() if weight is not None else None
    rstd = rstd.to(ct).contiguous()
    acc = _tl_dtype(ct)
    off_hi, off_lo = _common.split_fp32(offset)

    whole_row = _common.next_pow2(n) <= _BWD_MAX_FUSED
    if whole_row:
        block_m, block_n = _whole_row_tile(n)
    else:
        block_m, block_n = _WIDE_BWD_BLOCK_M, _WIDE_BWD_BLOCK_N
    warps = _warps(block_m * block_n)
    col_blocks = _common.cdiv(n, block_n)
    target = _max_programs(dev, max(1, 32 // warps))
    row_groups = max(1, min(_common.cdiv(m, block_m), _common.cdiv(target, col_blocks)))

    c2 = rstd  # placeholder, read only when the row term is needed
    if need_dx and not whole_row:
        c2 = _common.empty((m,), ct, dev)
        _rms_norm_bwd_row_stats_kernel[(m,)](
            g, x, x if weight is None else weight, rstd, c2,
            m, n, g.stride(0), g.stride(1), x.stride(0), x.stride(1), off_hi, off_lo,
            HAS_W=weight is not None, ACC=acc, BLOCK_M=1, BLOCK_N=_CHUNK, num_warps=_warps(_CHUNK))
    reduce = row_groups > 1 and need_dw
    dw_part = _common.empty((row_groups, n), ct, dev) if reduce else dw
    _rms_norm_bwd_kernel[(row_groups, col_blocks)](
        g, x, x if weight is None else weight, rstd, c2, dx if need_dx else x,
        dw_part if need_dw else rstd,
        m, n, g.stride(0), g.stride(1), x.stride(0), x.stride(1), off_hi, off_lo,
        HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw, ACC=acc,
        BLOCK_M=block_m, BLOCK_N=block_n, WHOLE_ROW=whole_row, num_warps=warps)
    if reduce:
        block_n = max(32, min(256, _common.next_pow2(_common.cdiv(n, _max_programs(dev, 1)))))
        block_p = max(1, min(_common.next_pow2(row_groups), _TILE // block_n))
        _layer_norm_bwd_reduce_kernel[(_common.cdiv(n, block_n),)](
            dw_part, rstd, dw, x, row_groups, n,
            NEED_DW=True, NEED_DB=False, ACC=acc, BLOCK_P=block_p, BLOCK_N=block_n,
            num_warps=_warps(block_p * block_n))
    return dx, dw


def supports(x: torch.Tensor, *_) -> Optional[str]:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the Triton RMSNorm takes float16, bfloat16, float32 or float64 input, got {x.dtype}"
    if x.dim() == 2 and x.shape[1] == 0:
        return "a row of zero features has no mean square to normalise by"
    return None
