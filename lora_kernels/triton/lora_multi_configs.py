"""Autotune rules of the lora_linear_multi kernels: short, conservative config lists (blocks <= 128,
stages <= 3), the pruner that filters them per launch, and the autotuned kernel handles that
triton/lora_multi.py launches."""
import triton

from . import _common
from .lora_multi_kernels import (_multi_bwd_da_kernel, _multi_bwd_dx_kernel, _multi_bwd_gb_kernel,
                                 _multi_down_rows_kernel, _multi_down_seg_kernel, _multi_fwd_kernel)

_SMEM_BUDGET = 192 << 10  # bytes of pipelined tiles per program (H100: 227 KB, minus epilogue scratch)


def _config(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Short, conservative lists (blocks <= 128, stages <= 3; see the sm_90 spill gate): (BLOCK_M,
# output width, reduction step, warps, stages) for the forward (N, K) and dx (K, N) GEMMs.
_GEMM_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
               (32, 64, 64, 4, 2), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (16, 32, 128, 4, 2)]
_STREAM_TILES = [(16, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (32, 64, 4, 2)]


def _gemm_configs(out_name, red_name):
    return [_config(w, s, BLOCK_M=bm, GROUP_M=8, **{out_name: bo, red_name: br}) for bm, bo, br, w, s in _GEMM_TILES]


def _pruner(first_arg, stage_elems, tall, out=None, live=None, fp32_fits=None):
    """Autotuner pre-filter: row tiles that suit the row count (``tall``: GEMMs, where many rows
    want 64+), a small output tile ``out`` for fp64 (no tensor cores, 8-byte accumulators), and
    pipelined tiles within shared memory. stage_elems(blocks, kwargs): elements one stage holds.
    live(blocks, kwargs): fp32 elements of accumulators held at once; they must stay under 128
    registers a thread (the forward's acc [BM, BN] plus u [BM, BR]: at BM=128, BN=64, BR=64 and
    4 warps, exactly 128, ptxas used 255 registers and spilled 136 bytes under Triton 3.6 for
    sm_90 — /work/shared/tools/triton_sm90.py with a lora_multi scenario, M=8192 r=128).
    fp32_fits(blocks, kwargs, warps): for fp32, whose dots run on CUDA cores with the operand
    tiles in registers, the tiles that did not spill in that run (the rules at each kernel)."""
    def prune(configs, named_args, **kwargs):
        esize, m = named_args[first_arg].element_size(), named_args["M_BUCKET"]

        def ok(c):
            bm = c.kwargs["BLOCK_M"]
            rows = bm >= 64 if (tall and m > 64) else bm <= max(16, m)
            small = esize < 8 or out is None or bm * c.kwargs[out] <= 64 * 64
            regs = live is None or live(c.kwargs, kwargs) * max(1, esize // 4) < 128 * 32 * c.num_warps
            fp32 = esize != 4 or fp32_fits is None or fp32_fits(c.kwargs, kwargs, c.num_warps)
            smem = stage_elems(c.kwargs, kwargs) * esize * c.num_stages <= _SMEM_BUDGET
            return rows and small and regs and fp32 and smem
        kept = [c for c in configs if ok(c)]
        return kept or [min(configs, key=lambda c: stage_elems(c.kwargs, kwargs) * c.num_stages)]
    return prune


def _autotuned(kernel, configs, key, prune):
    # The autotuner needs a GPU driver; under the interpreter the plain kernel runs one fixed config.
    if _common.INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=key, prune_configs_by=_common.prune_by(prune))(kernel)


_TUNE_KEY = ["M_BUCKET", "N", "K", "R"]
fwd = _autotuned(  # stage: x and Wᵀ tiles
    _multi_fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"), _TUNE_KEY,
    _pruner("X", lambda b, k: (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_K"], tall=True, out="BLOCK_N",
            live=lambda b, k: b["BLOCK_M"] * (b["BLOCK_N"] + k["BLOCK_R"]),
            # fp32: 128x128 (8 warps), 128x64 and 64x128 (4 warps) tiles spilled 48-388 bytes
            fp32_fits=lambda b, k, w: b["BLOCK_M"] * b["BLOCK_N"] <= 1024 * w))
dx = _autotuned(  # stage: g and W tiles
    _multi_bwd_dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"), _TUNE_KEY + ["HAS_DROPOUT"],
    _pruner("G", lambda b, k: (b["BLOCK_M"] + b["BLOCK_K"]) * b["BLOCK_N"], tall=True, out="BLOCK_K",
            # fp32: as the forward, and with dropout's second accumulator even 64x64 (4 warps) spilled
            fp32_fits=lambda b, k, w: (2 if k["HAS_DROPOUT"] else 1) * b["BLOCK_M"] * b["BLOCK_K"] <= 1024 * w))
down_seg = _autotuned(  # stage: x and Aᵀ tiles
    _multi_down_seg_kernel, [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in _STREAM_TILES],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: (b["BLOCK_M"] + k["BLOCK_R"]) * b["BLOCK_K"], tall=False,
            # fp32: the 128x64 (8 warps) and 64x64 (4 warps) x tiles spilled 12-20 bytes
            fp32_fits=lambda b, k, w: b["BLOCK_M"] * b["BLOCK_K"] <= 512 * w))
down_rows = _autotuned(  # one row: x and A_i tiles
    _multi_down_rows_kernel, [_config(4, 3, BLOCK_K=128), _config(2, 3, BLOCK_K=64)],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"], None)
da = _autotuned(  # stage: x and v tiles (v in fp32)
    _multi_bwd_da_kernel, [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in _STREAM_TILES],
    ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: b["BLOCK_M"] * (b["BLOCK_K"] + 2 * k["BLOCK_R"]), tall=False,
            # fp32 with dropout: 128x64 (8 warps), 64x64 and 32x128 (4 warps) spilled 48-264 bytes
            fp32_fits=lambda b, k, w: b["BLOCK_M"] * b["BLOCK_K"] <= 512 * w))
gb = _autotuned(  # stage: g and u tiles (u in fp32)
    _multi_bwd_gb_kernel, [_config(4, 3, BLOCK_M=16), _config(4, 3, BLOCK_M=32), _config(4, 3, BLOCK_M=64)],
    ["M_BUCKET", "N", "R", "BLOCK_N"],
    _pruner("G", lambda b, k: b["BLOCK_M"] * (k["BLOCK_N"] + 2 * k["BLOCK_R"]), tall=False,
            # fp32, r > 32: 32 and 64 rows against a 64-wide rank tile spilled 144-624 bytes
            fp32_fits=lambda b, k, w: b["BLOCK_M"] * k["BLOCK_R"] <= 1024))

