"""Autotune rules of the LoRA kernels: the config lists, the pruner that filters them per
launch, and the autotuned kernel handles that triton/lora.py launches."""
import triton

from . import _common
from .lora_kernels import (_lora_bwd_da_kernel, _lora_bwd_dx_kernel, _lora_bwd_gb_kernel, _lora_down_kernel,
                           _lora_fwd_kernel)

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
        cfg(64, 64, 32, 8, 3),  # fp32 on CUDA cores: the one tall tile that fits with dropout or r > 64
        # few rows (decode): thin tiles that stream the weight, one program per few columns
        cfg(16, 32, 256, 4, 4), cfg(16, 64, 256, 4, 4), cfg(16, 64, 128, 4, 5), cfg(16, 128, 128, 4, 4),
        cfg(32, 64, 128, 4, 4), cfg(32, 32, 64, 4, 2), cfg(16, 32, 32, 4, 2), cfg(64, 64, 128, 4, 3),
    ]


def _stream_configs(shapes):
    return [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in shapes]


_STREAM_TILES = [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3),
                 (16, 64, 4, 3), (128, 128, 8, 3), (32, 32, 4, 2)]
_GB_TILES = [_config(4, 3, BLOCK_M=32), _config(4, 3, BLOCK_M=64), _config(8, 3, BLOCK_M=64),
             _config(8, 3, BLOCK_M=128), _config(4, 3, BLOCK_M=16)]


# Register and shared-memory rules, from what ptxas made of every config for sm_90 (Triton 3.6,
# ptxas 12.8: benchmarks/triton_sm90.py; rerun `python benchmarks/triton_sm90.py --ops lora`, the table
# for all shapes is benchmarks/results/triton-sm90-3.6.0.md). A thread keeps its share of some tiles
# live; the rules count those tiles in 4-byte values per thread ("live") and keep a config when
# - 16-bit (and tf32, by the same rule, not measured) on tensor cores, operands in shared memory: the fp32 accumulator
#   plus the [BLOCK_M, BLOCK_R] low-rank tile fit in LIVE_TC = 144 values. The split forward
#   counts its rank tile twice (it is loaded, with a pointer tile, not accumulated): at 160 and more
#   (BM128 BN128 w4, BM256 BN128 w8) the forward spilled 224-508 B a thread, at 144 and less none.
# - fp32 on CUDA cores (IEEE, every operand in registers): the main loop's accumulator and operand
#   tiles fit in LIVE_FMA = 64 values and the epilogue's (accumulators, rank tiles) in 96: 96 in
#   the main loop spilled 40-400 B (BM128 BN128 BK32 w8, BM64 BN64 BK64 in dx), 64 none; the split
#   forward's epilogue at 128 (rank tile counted twice) spilled 12 B (BM64 BN64 w4, r = 256). Dropout
#   adds its keep-mask tile; the g pass keeps to 64 rows (BM128 w8 spilled 4-92 B, held by ptxas
#   at 128 registers).
# fp64 keeps to output tiles of at most 64 x 64. Pipelined tiles stay within _SMEM_BUDGET; the
# memory-bound kernels (down projection, dA, the g pass) within MEMORY_BOUND_SMEM, so that two
# blocks share an SM: at 110 KB and more (BM16 BK256 s4 at r = 64, g's BN256 BM64) ptxas placed
# 118-164 KB, one block per SM.
LIVE_TC, LIVE_FMA, LIVE_FMA_EPILOGUE = 144, 64, 96
# Misaligned operands (a size or stride not a multiple of 16: K = N = 1000) are loaded element by
# element, each with its own address: then the output tile plus one stage of operand tiles stays
# within LIVE_MISALIGNED = 80 values a thread on tensor cores (96 and up spilled 24-1584 B: BM64 BN64
# BK64 w4, BM128 BN128 BK64 w8 s4) and the main loop within 40 on CUDA cores (64 spilled 8 B; 48,
# dx BM64 BK64 BN16 w4 s2 at M = 37, K = N = 1000, r = 8, 4 B at 168 registers: dora's backward,
# `--full --ops dora`).
LIVE_MISALIGNED, LIVE_FMA_MISALIGNED = 80, 40
MEMORY_BOUND_SMEM = 96 << 10
# The down projection and dA read rows of BLOCK_K elements: on tensor cores 512 B of them (16-bit
# BK256, tf32 BK128) spilled 4 B at 56 registers with BLOCK_R = 32; 256 B never did.
STREAM_ROW_BYTES = 256


def _pruner(first_arg, stage_elems, tall, live, memory_bound=False, out=None, fma_rows=None, ints=(), streamed=None,
            row_bytes=None, fma_tall=64):
    """Autotuner pre-filter. stage_elems(blocks, kwargs): elements one pipeline stage holds;
    live(blocks, kwargs, fma): (main loop, epilogue) elements the program keeps in registers.
    Keeps configs whose row tile suits the row count (``tall``: GEMMs, where many rows want tiles
    of 64+ rows), that fit the register and shared-memory rules above (fma_rows: the tallest row
    tile on CUDA cores); ints: the size and stride arguments whose misalignment
    (_common.misaligned) brings in LIVE_MISALIGNED, streamed(blocks, kwargs): the output tile plus
    one stage of operand tiles; row_bytes: the widest BLOCK_K x element size on tensor cores. When
    none passes, the one with the fewest live values among those of a suitable row tile."""
    def prune(configs, named_args, **kwargs):
        esize, m = named_args[first_arg].element_size(), named_args["M_BUCKET"]
        fma = esize >= 4 and kwargs.get("PRECISION", "ieee") == "ieee"
        smem_budget = MEMORY_BOUND_SMEM if memory_bound else _SMEM_BUDGET
        loose = _common.misaligned(named_args, ints)

        def rows(c):
            bm = c.kwargs["BLOCK_M"]
            return bm >= (fma_tall if fma else 64) if (tall and m > 64) else bm <= max(16, m)

        def cost(c):
            main, epilogue = live(c.kwargs, kwargs, fma)
            return max(main, epilogue) / (32 * c.num_warps), (main + epilogue) / (32 * c.num_warps)

        def ok(c):
            threads = 32 * c.num_warps
            main, epilogue = live(c.kwargs, kwargs, fma)
            if esize == 8:
                regs = out is None or c.kwargs["BLOCK_M"] * c.kwargs[out] <= 64 * 64
            elif fma:
                regs = (main <= (LIVE_FMA_MISALIGNED if loose else LIVE_FMA) * threads
                        and epilogue <= LIVE_FMA_EPILOGUE * threads
                        and (fma_rows is None or c.kwargs["BLOCK_M"] <= fma_rows))
            else:
                regs = max(main, epilogue) <= LIVE_TC * threads and (
                    not loose or streamed is None or streamed(c.kwargs, kwargs) <= LIVE_MISALIGNED * threads) and (
                    row_bytes is None or c.kwargs["BLOCK_K"] * esize <= row_bytes)
            return rows(c) and regs and stage_elems(c.kwargs, kwargs) * esize * c.num_stages <= smem_budget
        kept = [c for c in configs if ok(c)]
        return kept or [min(configs, key=lambda c: (not rows(c), cost(c)))]
    return prune


def _fwd_live(b, k, fma):
    bm, bn, bk, br = b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], k["BLOCK_R"]
    rank = (1 if k["FUSED"] else 2) * bm * br
    if not fma:
        return 0, bm * bn + rank
    main = bm * bn + bm * bk + bk * bn + (bm * br + bk * br if k["FUSED"] else 0)
    return main, bm * bn + rank + br * bn


def _dx_live(b, k, fma):
    bm, bo, bn, br = b["BLOCK_M"], b["BLOCK_K"], b["BLOCK_N"], k["BLOCK_R"]
    acc = (2 if k["HAS_DROPOUT"] else 1) * bm * bo
    if not fma:
        return 0, acc
    acc += bm * bo if k["HAS_DROPOUT"] else 0  # the keep-mask tile
    return bm * bo + bm * bn + bn * bo, acc + bm * br + br * bo


def _stream_live(b, k, fma):  # down projection and dA: x tile (and its keep-mask), rank tile, accumulator
    bm, bk, br = b["BLOCK_M"], b["BLOCK_K"], k["BLOCK_R"]
    return (bm * bk * (2 if k["HAS_DROPOUT"] else 1) + bk * br + bm * br, 0) if fma else (0, 0)


def _gb_live(b, k, fma):  # g tile, u and v tiles, B's tile and the dB accumulator (held throughout)
    bm, bn, br = b["BLOCK_M"], k["BLOCK_N"], k["BLOCK_R"]
    return (bm * bn + 2 * bm * br + 2 * bn * br, 0) if fma else (0, 0)


def _autotuned(kernel, configs, key, prune):
    # The autotuner needs a GPU driver; under the interpreter the plain kernel runs one fixed
    # config, so both paths execute the same kernel body.
    if _common.INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=key, prune_configs_by=_common.prune_by(prune))(kernel)


_TUNE_KEY = ["M_BUCKET", "N", "K", "R", "HAS_DROPOUT"]
fwd = _autotuned(  # stage: x, Wᵀ and (fused) Aᵀ tiles
    _lora_fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"), _TUNE_KEY + ["FUSED"],
    _pruner("X", lambda b, k: (b["BLOCK_M"] + b["BLOCK_N"] + (k["BLOCK_R"] if k["FUSED"] else 0)) * b["BLOCK_K"],
            tall=True, live=_fwd_live, out="BLOCK_N",
            ints=("K", "N", "stride_xm", "stride_xk", "stride_wn", "stride_wk"),
            streamed=lambda b, k: b["BLOCK_M"] * b["BLOCK_N"] + b["BLOCK_K"] * (b["BLOCK_M"] + b["BLOCK_N"])))
dx = _autotuned(  # stage: g and W tiles
    _lora_bwd_dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"), _TUNE_KEY,
    _pruner("G", lambda b, k: (b["BLOCK_M"] + b["BLOCK_K"]) * b["BLOCK_N"], tall=True, live=_dx_live,
            out="BLOCK_K", ints=("N", "K", "stride_gm", "stride_gn", "stride_wn", "stride_wk"),
            streamed=lambda b, k: b["BLOCK_M"] * b["BLOCK_K"] + b["BLOCK_N"] * (b["BLOCK_M"] + b["BLOCK_K"])))
down = _autotuned(  # stage: x and Aᵀ tiles
    _lora_down_kernel, _stream_configs(_STREAM_TILES), ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: (b["BLOCK_M"] + k["BLOCK_R"]) * b["BLOCK_K"], tall=False, live=_stream_live,
            memory_bound=True, row_bytes=STREAM_ROW_BYTES))
da = _autotuned(  # stage: x and v tiles (v in fp32)
    _lora_bwd_da_kernel, _stream_configs(_STREAM_TILES), ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: b["BLOCK_M"] * (b["BLOCK_K"] + 2 * k["BLOCK_R"]), tall=False, live=_stream_live,
            memory_bound=True, row_bytes=STREAM_ROW_BYTES))
gb = _autotuned(  # stage: g and u tiles (u in fp32)
    _lora_bwd_gb_kernel, _GB_TILES, ["M_BUCKET", "N", "R", "BLOCK_N"],
    _pruner("G", lambda b, k: b["BLOCK_M"] * (k["BLOCK_N"] + 2 * k["BLOCK_R"]), tall=False, live=_gb_live,
            memory_bound=True, fma_rows=64, ints=("N", "stride_gm", "stride_gn"),
            streamed=lambda b, k: k["BLOCK_N"] * k["BLOCK_R"] + b["BLOCK_M"] * (k["BLOCK_N"] + k["BLOCK_R"])))
