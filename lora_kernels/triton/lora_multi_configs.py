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
# BK32 tall tiles: the ones that pass the rules with misaligned sizes (64x64) and in fp32 at r = 64
# (64x32; 64x64 BK32 w8, LoRA's fp32 tile, spilled 8-48 B here at 128 registers). Order matters for
# LORA_KERNELS_AUTOTUNE=0 (the first kept tile runs): in fp32, 16x32 BK128 as the forward (r = 64,
# M = 16) spilled 8 B where 16x32 BK64 did not. (The fp32 64x64 / 64x32 BK32 tiles each spilled 12 B
# at 128 registers on one shape and not on another: no order avoids both.)
_GEMM_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
               (64, 64, 32, 4, 3), (64, 32, 32, 4, 3),
               (32, 64, 64, 4, 2), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (16, 32, 64, 4, 3), (16, 32, 128, 4, 2)]
_STREAM_TILES = [(16, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (32, 64, 4, 2),
                 (16, 64, 4, 3), (32, 32, 4, 2)]


def _gemm_configs(out_name, red_name):
    return [_config(w, s, BLOCK_M=bm, GROUP_M=8, **{out_name: bo, red_name: br}) for bm, bo, br, w, s in _GEMM_TILES]


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


def _fp32_small_tile(prune):
    """BM32 BK32 is for fp32 with dropout at r = 64 (the one stream tile that passes there); in
    bf16 at r = 64 it spilled 4 B (72 registers), so 16-bit launches never see it."""
    def wrapped(configs, named_args, **kwargs):
        if named_args["X"].element_size() != 4:
            configs = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) != (32, 32)]
        return prune(configs, named_args, **kwargs)
    return wrapped
_TUNE_KEY = ["M_BUCKET", "N", "K", "R"]
fwd = _autotuned(  # stage: x and Wᵀ tiles
    _multi_fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"), _TUNE_KEY,
    _pruner("X", lambda b, k: (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_K"], tall=True, live=_fwd_live,
            out="BLOCK_N", ints=("K", "N", "stride_xm", "stride_xk", "stride_wn", "stride_wk"),
            streamed=lambda b, k: b["BLOCK_M"] * b["BLOCK_N"] + b["BLOCK_K"] * (b["BLOCK_M"] + b["BLOCK_N"])))
dx = _autotuned(  # stage: g and W tiles
    _multi_bwd_dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"), _TUNE_KEY + ["HAS_DROPOUT"],
    _pruner("G", lambda b, k: (b["BLOCK_M"] + b["BLOCK_K"]) * b["BLOCK_N"], tall=True, live=_dx_live_multi,
            out="BLOCK_K", ints=("N", "K", "stride_gm", "stride_gn", "stride_wn", "stride_wk"),
            streamed=lambda b, k: b["BLOCK_M"] * b["BLOCK_K"] + b["BLOCK_N"] * (b["BLOCK_M"] + b["BLOCK_K"])))
down_seg = _autotuned(  # stage: x and Aᵀ tiles
    _multi_down_seg_kernel, [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in _STREAM_TILES],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _fp32_small_tile(_pruner("X", lambda b, k: (b["BLOCK_M"] + k["BLOCK_R"]) * b["BLOCK_K"], tall=False,
                             live=_stream_live_multi, memory_bound=True, row_bytes=STREAM_ROW_BYTES,
                             ints=_STREAM_INTS, streamed=_stream_streamed)))
down_rows = _autotuned(  # one row: x and A_i tiles
    _multi_down_rows_kernel, [_config(4, 3, BLOCK_K=128), _config(2, 3, BLOCK_K=64)],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"], None)
da = _autotuned(  # stage: x and v tiles (v in fp32)
    _multi_bwd_da_kernel, [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in _STREAM_TILES],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _fp32_small_tile(_pruner("X", lambda b, k: b["BLOCK_M"] * (b["BLOCK_K"] + 2 * k["BLOCK_R"]), tall=False,
                             live=_stream_live_multi, memory_bound=True, row_bytes=STREAM_ROW_BYTES,
                             ints=_STREAM_INTS, streamed=_stream_streamed)))
gb = _autotuned(  # stage: g and u tiles (u in fp32)
    _multi_bwd_gb_kernel, [_config(4, 3, BLOCK_M=16), _config(4, 3, BLOCK_M=32), _config(4, 3, BLOCK_M=64)],
    ["M_BUCKET", "N", "R", "BLOCK_N"],
    _pruner("G", lambda b, k: b["BLOCK_M"] * (k["BLOCK_N"] + 2 * k["BLOCK_R"]), tall=False, live=_gb_live,
            memory_bound=True, fma_rows=64, ints=("N", "stride_gm", "stride_gn"),
            streamed=lambda b, k: k["BLOCK_N"] * k["BLOCK_R"] + b["BLOCK_M"] * (k["BLOCK_N"] + k["BLOCK_R"])))

