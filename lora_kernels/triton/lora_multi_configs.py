"""Autotune rules of the lora_linear_multi kernels: short, conservative config lists (blocks <= 128,
stages <= 3), the pruner that filters them per launch, and the autotuned kernel handles that
triton/lora_multi.py launches."""
import triton

from . import _common
from .lora_configs import STREAM_ROW_BYTES, _dx_live, _gb_live, _pruner, _stream_live
from .lora_multi_kernels import (_multi_bwd_da_kernel, _multi_bwd_dx_kernel, _multi_bwd_gb_kernel,
                                 _multi_down_rows_kernel, _multi_down_seg_kernel, _multi_fwd_kernel)

def _config(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Short, conservative lists (blocks <= 128, stages <= 3; see the sm_90 spill gate): (BLOCK_M,
# output width, reduction step, warps, stages) for the forward (N, K) and dx (K, N) GEMMs.
# BK32 tall tiles: the ones that pass the rules with misaligned sizes (64x64) and at r = 64 (64x32).
# Tensor cores (16-bit, tf32) choose among _GEMM_TILES; fp32 IEEE (CUDA cores) among its own
# _FMA_TILES (below). Order matters for LORA_KERNELS_AUTOTUNE=0: the first kept tile runs.
_GEMM_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
               (64, 64, 32, 4, 3), (64, 32, 32, 4, 3),
               (32, 64, 64, 4, 2), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (16, 32, 64, 4, 3), (16, 32, 128, 4, 2)]
# fp32 IEEE on CUDA cores. Small spills here (4-48 B) mostly come from ptxas trading a few
# spilled values for a register target (64, 80, 128 or 168 registers a thread: more blocks per SM),
# not from running out of registers: for the spilling multi_fwd BM16 BN32 BK64 w4 s3 (SORTED
# STORE_U BR=16) `ptxas -v --gpu-name=sm_90a` gives 64 registers and 4 B of spill, with
# --register-usage-level=10 68 registers and none. Which tile hits such a target moves with BR,
# dropout and alignment, so the live-value rules cannot predict it. These tiles spilled in none of
# the 10 dx / 12 forward variants of the full shapes (BR 16/32/64, dropout, K = N = 1000, M = 1,
# n = 1), each tile compiled for every variant (Triton 3.6, ptxas 12.8). Left out as measured
# there: all 8 tall dx tiles tried (BM64, BK 32/64, BN 16/32, w4/w8, s2/s3) spilled 8-468 B on
# some variant (BK64 BN32 w4 s3: 12 B at r = 16, 468 B with dropout at K = 1000); the forward's
# BM16 BN32 BK64 (4 B at r = 16, s2 and s3) and BK128 w4 s2 (4-12 B at r = 32 and 64). So fp32 dx
# runs 32-row tiles on many rows (fma_tall=32): on CUDA cores each thread computes its outputs
# from registers either way, and BM32 BK128 w8 holds the 16 a thread that BM64 BK64 w8 would. The
# forward keeps its 64-row tiles for many rows (none spills where the rules keep them). Rerun:
# `python benchmarks/triton_sm90.py --full --ops lora_multi --dtypes fp32 --kernel multi_bwd_dx
# --all-configs` compiles every listed tile for every launch, the pruner off.
_FMA_TILES = {
    "fwd": [(64, 64, 32, 4, 3), (64, 32, 32, 4, 3), (32, 64, 32, 4, 2), (16, 64, 32, 4, 2), (32, 32, 32, 4, 2),
            (16, 32, 32, 4, 2)],
    "dx": [(32, 128, 32, 8, 2), (32, 64, 32, 4, 2), (32, 64, 16, 4, 2), (32, 32, 32, 4, 2), (16, 32, 128, 4, 2),
           (16, 32, 64, 4, 3)],
}
_STREAM_TILES = [(16, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (32, 64, 4, 2),
                 (16, 64, 4, 3)]


def _key(c):
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def _by_unit(tc_configs, fma_configs, prune, first_arg):
    """(configs, pruner): fp32 IEEE launches (CUDA cores) choose among fma_configs, the others
    (tensor cores; fp64 by its own rule) among tc_configs; then ``prune``'s rules apply."""
    tc_keys = [_key(c) for c in tc_configs]
    fma_keys = [_key(c) for c in fma_configs]
    configs = list(tc_configs) + [c for c in fma_configs if _key(c) not in tc_keys]

    def wrapped(configs, named_args, **kwargs):
        fma = named_args[first_arg].element_size() == 4 and kwargs.get("PRECISION", "ieee") == "ieee"
        order = fma_keys if fma else tc_keys  # the unit's own order: its first kept tile is the default
        mine = sorted((c for c in configs if _key(c) in order), key=lambda c: order.index(_key(c)))
        return prune(mine, named_args, **kwargs)
    return configs, wrapped


def _gemm_configs(out_name, red_name, tiles):
    return [_config(w, s, BLOCK_M=bm, GROUP_M=8, **{out_name: bo, red_name: br}) for bm, bo, br, w, s in tiles]


def _stream_configs(tiles):
    return [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in tiles]


def _autotuned(kernel, configs, key, prune):
    # The autotuner needs a GPU driver; under the interpreter the plain kernel runs one fixed config.
    if _common.INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=key, prune_configs_by=_common.prune_by(prune))(kernel)


# The register and shared-memory rules are LoRA's (lora_configs: LIVE_TC, LIVE_FMA, LIVE_MISALIGNED,
# MEMORY_BOUND_SMEM, STREAM_ROW_BYTES, with the measurements behind them), applied to what these
# kernels keep live. Their own rules (accumulators only, no misaligned or dropout terms) left 59
# of 1040 kept configs spilling for sm_90 under Triton 3.6 (e.g. the forward at K = N = 1000,
# 88-484 B; dx with dropout at r = 64, 60-148 B); rerun `python benchmarks/triton_sm90.py --full
# --ops lora_multi` (table: benchmarks/results/triton-sm90-3.6.0.md).
def _fwd_live(b, k, fma):  # accumulator, u and its scaled, masked copy; fp32: operand and Bᵀ tiles
    bm, bn, bk, br = b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], k["BLOCK_R"]
    if not fma:
        return 0, bm * bn + 2 * bm * br
    return bm * bn + bm * bk + bk * bn, bm * bn + 2 * bm * br + br * bn


def _dx_live_multi(b, k, fma):
    """LoRA's, plus the [BM, BR] tile of v the adapter loop holds: with dropout at r = 64,
    BM128 BK64 w4 (192) and BM64 BK128 w4 (160) spilled 148 / 60 B in 16-bit."""
    main, epilogue = _dx_live(b, k, fma)
    return main, epilogue + (0 if fma else b["BLOCK_M"] * k["BLOCK_R"])


def _stream_live_multi(b, k, fma):
    """LoRA's, half again: the segment bookkeeping (row permutation, adapter ids, partial-sum
    stores in row order) spilled 12 B at BM32 BK128 and BM64 BK64 (fp32, r = 8 and 16), which
    LoRA's rule keeps."""
    main, epilogue = _stream_live(b, k, fma)
    return main * 3 // 2, epilogue


def _stream_streamed(b, k):
    """Misaligned x (element-by-element loads): x tile (three times with dropout: its keep-mask
    and counters), rank tile and accumulator: BM32 BK128 and BM64 BK64 at r = 64 (112 / 96)
    spilled 308 / 12 B, with dropout BM64 BK64 at r = 8 60 B."""
    bm, bk, br = b["BLOCK_M"], b["BLOCK_K"], k["BLOCK_R"]
    return (bm * (3 if k["HAS_DROPOUT"] else 1) + br) * bk + bm * br


_STREAM_INTS = ("K", "stride_xm", "stride_xk")


# Stream tiles: tensor cores take _STREAM_TILES; fp32 IEEE adds one 32x32 tile, the one that
# passes the rules with dropout at r = 64 (in bf16 at r = 64 it spilled 4 B at 72 registers, so
# 16-bit launches never see it). In down_seg it runs 8 warps: BM32 BK32 w4 s2 spilled 20 B at
# 128 registers on misaligned x at r = 64 (K = 1000, the default of that launch) and w8 s2 spilled
# in none of the 8 full-shape variants (48-106 registers); dA keeps w4 s2 (none of its kept spills).
_STREAM_FMA_TILE = {"down_seg": (32, 32, 8, 2), "da": (32, 32, 4, 2)}


def _da_misaligned_dropout(prune):
    """dA in 16-bit with dropout on misaligned x (element-wise loads plus the keep-mask of each):
    rows of 16 only. BM32 BK64 w4 s2 spilled 16 B at K = 1000, r = 8 (80 registers), where BM16
    BK64 and BK128 did not; the misaligned-x rule (_stream_streamed) counts the two alike. Rerun:
    `python benchmarks/triton_sm90.py --full --ops lora_multi --dtypes fp16 --kernel multi_bwd_da
    --all-configs` (70 compiles, that one spills)."""
    def wrapped(configs, named_args, **kwargs):
        if (kwargs.get("HAS_DROPOUT") and named_args["X"].element_size() == 2
                and _common.misaligned(named_args, _STREAM_INTS)):
            configs = [c for c in configs if c.kwargs["BLOCK_M"] <= 16] or configs
        return prune(configs, named_args, **kwargs)
    return wrapped


_TUNE_KEY = ["M_BUCKET", "N", "K", "R"]
_fwd_configs, _fwd_prune = _by_unit(
    _gemm_configs("BLOCK_N", "BLOCK_K", _GEMM_TILES), _gemm_configs("BLOCK_N", "BLOCK_K", _FMA_TILES["fwd"]),
    _pruner("X", lambda b, k: (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_K"], tall=True, live=_fwd_live,
            out="BLOCK_N", ints=("K", "N", "stride_xm", "stride_xk", "stride_wn", "stride_wk"),
            streamed=lambda b, k: b["BLOCK_M"] * b["BLOCK_N"] + b["BLOCK_K"] * (b["BLOCK_M"] + b["BLOCK_N"])), "X")
fwd = _autotuned(_multi_fwd_kernel, _fwd_configs, _TUNE_KEY, _fwd_prune)  # stage: x and Wᵀ tiles
_dx_configs, _dx_prune = _by_unit(
    _gemm_configs("BLOCK_K", "BLOCK_N", _GEMM_TILES), _gemm_configs("BLOCK_K", "BLOCK_N", _FMA_TILES["dx"]),
    _pruner("G", lambda b, k: (b["BLOCK_M"] + b["BLOCK_K"]) * b["BLOCK_N"], tall=True, live=_dx_live_multi,
            out="BLOCK_K", ints=("N", "K", "stride_gm", "stride_gn", "stride_wn", "stride_wk"), fma_tall=32,
            streamed=lambda b, k: b["BLOCK_M"] * b["BLOCK_K"] + b["BLOCK_N"] * (b["BLOCK_M"] + b["BLOCK_K"])), "G")
dx = _autotuned(_multi_bwd_dx_kernel, _dx_configs, _TUNE_KEY + ["HAS_DROPOUT"], _dx_prune)  # stage: g and W tiles
_down_configs, _down_prune = _by_unit(
    _stream_configs(_STREAM_TILES), _stream_configs(_STREAM_TILES + [_STREAM_FMA_TILE["down_seg"]]),
    _pruner("X", lambda b, k: (b["BLOCK_M"] + k["BLOCK_R"]) * b["BLOCK_K"], tall=False,
            live=_stream_live_multi, memory_bound=True, row_bytes=STREAM_ROW_BYTES,
            ints=_STREAM_INTS, streamed=_stream_streamed), "X")
down_seg = _autotuned(  # stage: x and Aᵀ tiles
    _multi_down_seg_kernel, _down_configs, ["M_BUCKET", "K", "R", "HAS_DROPOUT"], _down_prune)
down_rows = _autotuned(  # one row: x and A_i tiles
    _multi_down_rows_kernel, [_config(4, 3, BLOCK_K=128), _config(2, 3, BLOCK_K=64)],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"], None)
_da_configs, _da_prune = _by_unit(
    _stream_configs(_STREAM_TILES), _stream_configs(_STREAM_TILES + [_STREAM_FMA_TILE["da"]]),
    _da_misaligned_dropout(_pruner("X", lambda b, k: b["BLOCK_M"] * (b["BLOCK_K"] + 2 * k["BLOCK_R"]), tall=False,
                                   live=_stream_live_multi, memory_bound=True, row_bytes=STREAM_ROW_BYTES,
                                   ints=_STREAM_INTS, streamed=_stream_streamed)), "X")
da = _autotuned(  # stage: x and v tiles (v in fp32)
    _multi_bwd_da_kernel, _da_configs, ["M_BUCKET", "K", "R", "HAS_DROPOUT"], _da_prune)
gb = _autotuned(  # stage: g and u tiles (u in fp32)
    _multi_bwd_gb_kernel, [_config(4, 3, BLOCK_M=16), _config(4, 3, BLOCK_M=32), _config(4, 3, BLOCK_M=64)],
    ["M_BUCKET", "N", "R", "BLOCK_N"],
    _pruner("G", lambda b, k: b["BLOCK_M"] * (k["BLOCK_N"] + 2 * k["BLOCK_R"]), tall=False, live=_gb_live,
            memory_bound=True, fma_rows=64, ints=("N", "stride_gm", "stride_gn"),
            streamed=lambda b, k: k["BLOCK_N"] * k["BLOCK_R"] + b["BLOCK_M"] * (k["BLOCK_N"] + k["BLOCK_R"])))

