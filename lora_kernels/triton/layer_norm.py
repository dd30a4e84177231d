"""LayerNorm for LN-tuning in Triton: a one-pass forward, and a backward that always yields
dγ/dβ (fp32 partials per program, then one fixed-order sum) and dx only when asked.

Rows that fit in registers are read once by a "fused" program that owns whole rows. Wider rows
(up to any width) are processed in chunks: the forward makes a statistics pass and a
normalising pass over the row inside one program (so the second read can come from L2); the
backward tiles the [M, N] plane by columns, after a row-statistics pass when dx is needed.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import compute_dtype, empty_grad
from . import _common

# Widest row (in elements) a program holds in registers; beyond it rows are chunked. The
# backward holds x, g, γ and the two column accumulators per element, hence the smaller cap.
_FWD_MAX_FUSED = 16384
_BWD_MAX_FUSED = 8192
_TILE = 4096          # elements per [BLOCK_M, BLOCK_N] tile when whole rows fit
_CHUNK = 4096         # row chunk of the wide forward and of the wide backward's row statistics
_WIDE_BWD_BLOCK_N = 1024  # column block of the wide backward's tiles
_WIDE_BWD_BLOCK_M = 4
_INTERPRETER_PROGRAMS = 4  # programs per launch standing in for the GPU's SMs × occupancy


@triton.jit
def _rsqrt(v):
    # tl.rsqrt lowers to an approximate instruction: fine for fp32 (~1 ulp), not for fp64.
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.rsqrt(v)


@triton.jit
def _layer_norm_fwd_kernel(
    X,      # [M, N] input, any strides
    Y,      # [M, N] output, contiguous, x's dtype
    W,      # [N] γ (unused when not HAS_W)
    B,      # [N] β (unused when not HAS_B)
    MEAN,   # [M] fp32 (fp64 for fp64 x); unused when not STATS
    RSTD,   # [M] same dtype as MEAN; unused when not STATS
    M, N, stride_xm, stride_xn,
    eps_hi, eps_lo,  # eps split in two fp32 scalars (Triton passes floats as fp32)
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr, STATS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = X + rows.to(tl.int64) * stride_xm
    y_rows = Y + rows.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    # Statistics are taken of x − x[row, 0]: when |mean| >> std the shifted values are small
    # and exact, so neither the mean nor the variance loses digits (x + 1e4 in fp32).
    pivot = tl.load(x_rows, mask=row_ok, other=0).to(ACC)
    if WHOLE_ROW:
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = tl.load(x_rows[:, None] + cols[None, :].to(tl.int64) * stride_xn, mask=mask, other=0).to(ACC)
        shifted_mean = tl.sum(tl.where(mask, x - pivot[:, None], 0), axis=1) / N
        centered = tl.where(mask, (x - pivot[:, None]) - shifted_mean[:, None], 0)
        var = tl.sum(centered * centered, axis=1) / N
    else:
        # Exact two-pass statistics per chunk, merged across chunks with Chan's update, so a
        # row is read once here and once more to normalise.
        shifted_mean = tl.zeros([BLOCK_M], ACC)
        m2 = tl.zeros([BLOCK_M], ACC)
        seen = tl.zeros([BLOCK_M], ACC)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(x_rows[:, None] + c[None, :].to(tl.int64) * stride_xn, mask=mask, other=0).to(ACC)
            shifted = tl.where(mask, x - pivot[:, None], 0)
            n_chunk = tl.minimum(N - start, BLOCK_N).to(ACC)
            chunk_mean = tl.sum(shifted, axis=1) / n_chunk
            d = tl.where(mask, shifted - chunk_mean[:, None], 0)
            total = seen + n_chunk
            delta = chunk_mean - shifted_mean
            shifted_mean += delta * (n_chunk / total)
            m2 += tl.sum(d * d, axis=1) + delta * delta * (seen * n_chunk / total)
            seen = total
        var = m2 / N
    rstd = _rsqrt(var + eps_hi + eps_lo)
    if STATS:
        tl.store(MEAN + rows, pivot + shifted_mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    if WHOLE_ROW:
        y = centered * rstd[:, None]
        if HAS_W:
            y *= tl.load(W + cols, mask=cols < N, other=0).to(ACC)[None, :]
        if HAS_B:
            y += tl.load(B + cols, mask=cols < N, other=0).to(ACC)[None, :]
        tl.store(y_rows[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(x_rows[:, None] + c[None, :].to(tl.int64) * stride_xn, mask=mask, other=0).to(ACC)
            y = ((x - pivot[:, None]) - shifted_mean[:, None]) * rstd[:, None]
            if HAS_W:
                y *= tl.load(W + c, mask=c < N, other=0).to(ACC)[None, :]
            if HAS_B:
                y += tl.load(B + c, mask=c < N, other=0).to(ACC)[None, :]
            tl.store(y_rows[:, None] + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_row_stats_kernel(
    G,      # [M, N] upstream gradient, any strides
    X,      # [M, N] input, any strides
    W,      # [N] γ (unused when not HAS_W)
    MEAN,   # [M] saved mean (ACC dtype)
    RSTD,   # [M] saved rstd (ACC dtype)
    C1,     # [M] out: mean over the row of γ⊙g (ACC dtype)
    C2,     # [M] out: mean over the row of γ⊙g⊙x̂ (ACC dtype)
    M, N, stride_gm, stride_gn, stride_xm, stride_xn,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = X + rows.to(tl.int64) * stride_xm
    g_rows = G + rows.to(tl.int64) * stride_gm
    mean = tl.load(MEAN + rows, mask=row_ok, other=0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0)
    cols = tl.arange(0, BLOCK_N)
    s1 = tl.zeros([BLOCK_M], ACC)
    s2 = tl.zeros([BLOCK_M], ACC)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < N)
        c64 = c[None, :].to(tl.int64)
        x = tl.load(x_rows[:, None] + c64 * stride_xn, mask=mask, other=0).to(ACC)
        wg = tl.load(g_rows[:, None] + c64 * stride_gn, mask=mask, other=0).to(ACC)
        if HAS_W:
            wg *= tl.load(W + c, mask=c < N, other=0).to(ACC)[None, :]
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0)
        s1 += tl.sum(wg, axis=1)
        s2 += tl.sum(wg * xhat, axis=1)
    tl.store(C1 + rows, s1 / N, mask=row_ok)
    tl.store(C2 + rows, s2 / N, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    G,        # [M, N] upstream gradient, any strides
    X,        # [M, N] input, any strides
    W,        # [N] γ (unused when not HAS_W)
    MEAN,     # [M] saved mean (ACC dtype)
    RSTD,     # [M] saved rstd (ACC dtype)
    C1,       # [M] row means of γ⊙g, when not WHOLE_ROW and NEED_DX (else unused)
    C2,       # [M] row means of γ⊙g⊙x̂, likewise
    DX,       # [M, N] out, contiguous, x's dtype (unused when not NEED_DX)
    DW_PART,  # [num_programs(0), N] out: this program's Σ g⊙x̂ over its rows (ACC dtype; dγ itself
              # in x's dtype when num_programs(0) == 1)
    DB_PART,  # [num_programs(0), N] out: this program's Σ g over its rows (likewise)
    M, N, stride_gm, stride_gn, stride_xm, stride_xn,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr,
):
    # Program (p, j) owns columns j·BLOCK_N.. and the row tiles p, p + P, p + 2P, ... so its
    # column partials stay in registers and are written once; WHOLE_ROW means one column block.
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols[None, :].to(tl.int64)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0).to(ACC)
    dw = tl.zeros([BLOCK_N], ACC)
    db = tl.zeros([BLOCK_N], ACC)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), n_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        g = tl.load(G + rows[:, None].to(tl.int64) * stride_gm + cols64 * stride_gn, mask=mask, other=0).to(ACC)
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + cols64 * stride_xn, mask=mask, other=0).to(ACC)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0)
        if NEED_DW:
            dw += tl.sum(g * xhat, axis=0)
        if NEED_DB:
            db += tl.sum(g, axis=0)
        if NEED_DX:
            if HAS_W:
                wg = g * w[None, :]
            else:
                wg = g
            if WHOLE_ROW:
                c1 = tl.sum(wg, axis=1) / N
                c2 = tl.sum(wg * xhat, axis=1) / N
            else:
                c1 = tl.load(C1 + rows, mask=row_ok, other=0)
                c2 = tl.load(C2 + rows, mask=row_ok, other=0)
            dx = (wg - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            tl.store(DX + rows[:, None].to(tl.int64) * N + cols64, dx.to(DX.dtype.element_ty), mask=mask)
    # With a single row group the "partials" are dγ/dβ themselves, in x's dtype.
    if NEED_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw.to(DW_PART.dtype.element_ty), mask=col_ok)
    if NEED_DB:
        tl.store(DB_PART + pid.to(tl.int64) * N + cols, db.to(DB_PART.dtype.element_ty), mask=col_ok)


@triton.jit
def _layer_norm_bwd_reduce_kernel(
    DW_PART,  # [P, N] per-program partials (ACC dtype)
    DB_PART,  # [P, N]
    DW,       # [N] out, x's dtype (unused when not NEED_DW)
    DB,       # [N] out, x's dtype (unused when not NEED_DB)
    P, N,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A fixed summation order over the partials: dγ/dβ are bit-identical from run to run.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw = tl.zeros([BLOCK_N], ACC)
    db = tl.zeros([BLOCK_N], ACC)
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts[:, None] < P) & col_ok[None, :]
        offs = parts[:, None].to(tl.int64) * N + cols[None, :]
        if NEED_DW:
            dw += tl.sum(tl.load(DW_PART + offs, mask=mask, other=0), axis=0)
        if NEED_DB:
            db += tl.sum(tl.load(DB_PART + offs, mask=mask, other=0), axis=0)
    if NEED_DW:
        tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_ok)
    if NEED_DB:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_ok)


# On a GPU the forward's warp count is tuned per (width, tile); the interpreter cannot time
# kernels, so it runs the same kernel body with the heuristic warp count. The backward is not
# tuned: a tuned warp count could change the reduction tree, and so dγ/dβ's last bits, between
# processes.
_fwd_kernel = _layer_norm_fwd_kernel if _common.INTERPRET else triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16)],
    key=["N", "BLOCK_M", "BLOCK_N", "WHOLE_ROW", "STATS"], prune_configs_by=_common.prune_by(),
)(_layer_norm_fwd_kernel)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _warps(elements: int) -> int:
    return max(2, min(16, elements // 512))


def _whole_row_tile(width: int):
    block_n = _common.next_pow2(width)
    return max(1, min(64, _TILE // block_n)), block_n


def _max_programs(device: torch.device, per_sm: int) -> int:
    """Programs that keep the GPU busy; a few under the interpreter, where each program runs
    serially and only has to show that partials from several programs are combined."""
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return _common.sm_count(device) * per_sm




def forward(x, weight, bias, eps, stats: bool = True):
    """x:[M, N] (any strides) -> (y:[M, N] in x.dtype, mean:[M], rstd:[M] in fp32, fp64 for fp64).
    ``stats=False`` (inference: no backward will read them) skips mean and rstd: None, None."""
    m, n = x.shape
    ct = compute_dtype(x.dtype)
    y = _common.empty((m, n), x.dtype, x.device)
    mean = _common.empty((m,), ct, x.device) if stats else None
    rstd = _common.empty((m,), ct, x.device) if stats else None
    if m == 0:
        return y, mean, rstd
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    whole_row = _common.next_pow2(n) <= _FWD_MAX_FUSED
    block_m, block_n = _whole_row_tile(n) if whole_row else (1, _CHUNK)
    eps_hi, eps_lo = _common.split_fp32(eps)  # fp64 needs all of eps's digits
    args = (x, y, x if weight is None else weight, x if bias is None else bias,
            y if mean is None else mean, y if rstd is None else rstd,
            m, n, x.stride(0), x.stride(1), eps_hi, eps_lo)
    meta = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACC=_tl_dtype(ct),
                BLOCK_M=block_m, BLOCK_N=block_n, WHOLE_ROW=whole_row, STATS=stats)
    grid = (_common.cdiv(m, block_m),)
    if _common.INTERPRET:
        _fwd_kernel[grid](*args, **meta, num_warps=_warps(block_m * block_n))
    else:
        _fwd_kernel[grid](*args, **meta)
    return y, mean, rstd


def backward(g, x, weight, mean, rstd, need_dx: bool, need_dw: bool, need_db: bool):
    """Gradients (dx, dγ, dβ) of forward; the ones not needed come back as empty placeholders.
    With need_dx False, x and g are read once and only the column partials are written."""
    m, n = x.shape
    ct = compute_dtype(x.dtype)
    dev = x.device
    dx = _common.empty((m, n), x.dtype, dev) if need_dx else empty_grad(x)
    dw = _common.empty((n,), x.dtype, dev) if need_dw else empty_grad(x)
    db = _common.empty((n,), x.dtype, dev) if need_db else empty_grad(x)
    if m == 0:
        dw.zero_()
        db.zero_()
        return dx, dw, db
    if not (need_dx or need_dw or need_db):
        return dx, dw, db
    weight = weight.contiguous() if weight is not None else None
    mean = mean.to(ct).contiguous()
    rstd = rstd.to(ct).contiguous()
    acc = _tl_dtype(ct)

    whole_row = _common.next_pow2(n) <= _BWD_MAX_FUSED
    if whole_row:
        block_m, block_n = _whole_row_tile(n)
    else:
        block_m, block_n = _WIDE_BWD_BLOCK_M, _WIDE_BWD_BLOCK_N
    warps = _warps(block_m * block_n)
    col_blocks = _common.cdiv(n, block_n)
    # Enough row groups to fill the GPU together with the column blocks, never more than there
    # are row tiles; every row group writes one [N] partial per needed gradient.
    target = _max_programs(dev, max(1, 32 // warps))
    row_groups = max(1, min(_common.cdiv(m, block_m), _common.cdiv(target, col_blocks)))

    c1 = c2 = rstd  # placeholders, read only when the row statistics are needed
    if need_dx and not whole_row:
        c1, c2 = _common.empty((m,), ct, dev), _common.empty((m,), ct, dev)
        _layer_norm_bwd_row_stats_kernel[(m,)](
            g, x, x if weight is None else weight, mean, rstd, c1, c2,
            m, n, g.stride(0), g.stride(1), x.stride(0), x.stride(1),
            HAS_W=weight is not None, ACC=acc, BLOCK_M=1, BLOCK_N=_CHUNK, num_warps=_warps(_CHUNK))
    # One row group writes dγ/dβ directly; several write fp32 partials summed by the reduce kernel.
    reduce = row_groups > 1 and (need_dw or need_db)
    dw_part = _common.empty((row_groups, n), ct, dev) if reduce and need_dw else dw
    db_part = _common.empty((row_groups, n), ct, dev) if reduce and need_db else db
    _layer_norm_bwd_kernel[(row_groups, col_blocks)](
        g, x, x if weight is None else weight, mean, rstd, c1, c2, dx if need_dx else x,
        dw_part if need_dw else rstd, db_part if need_db else rstd,
        m, n, g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, ACC=acc,
        BLOCK_M=block_m, BLOCK_N=block_n, WHOLE_ROW=whole_row, num_warps=warps)
    if reduce:
        # Narrow column blocks so that even a narrow row spreads the reduction over many programs.
        block_n = max(32, min(256, _common.next_pow2(_common.cdiv(n, _max_programs(dev, 1)))))
        block_p = max(1, min(_common.next_pow2(row_groups), _TILE // block_n))
        _layer_norm_bwd_reduce_kernel[(_common.cdiv(n, block_n),)](
            dw_part if need_dw else rstd, db_part if need_db else rstd,
            dw if need_dw else x, db if need_db else x, row_groups, n,
            NEED_DW=need_dw, NEED_DB=need_db, ACC=acc, BLOCK_P=block_p, BLOCK_N=block_n,
            num_warps=_warps(block_p * block_n))
    return dx, dw, db


def supports(x: torch.Tensor, *_) -> Optional[str]:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the Triton LayerNorm takes float16, bfloat16, float32 or float64 input, got {x.dtype}"
    if x.dim() == 2 and x.shape[1] == 0:
        return "a row of zero features has no mean or variance to normalise by"
    return None
