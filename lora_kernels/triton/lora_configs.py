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
        # few rows (decode): thin tiles that stream the weight, one program per few columns
        cfg(16, 32, 256, 4, 4), cfg(16, 64, 256, 4, 4), cfg(16, 64, 128, 4, 5), cfg(16, 128, 128, 4, 4),
        cfg(32, 64, 128, 4, 4), cfg(32, 32, 64, 4, 2), cfg(16, 32, 32, 4, 2), cfg(64, 64, 128, 4, 3),
    ]


def _stream_configs(shapes):
    return [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in shapes]


_STREAM_TILES = [(16, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3),
                 (16, 64, 4, 3), (128, 128, 8, 3), (32, 256, 4, 3), (32, 32, 4, 2)]
_GB_TILES = [_config(4, 3, BLOCK_M=32), _config(4, 3, BLOCK_M=64), _config(8, 3, BLOCK_M=64),
             _config(8, 3, BLOCK_M=128), _config(4, 3, BLOCK_M=16)]


def _pruner(first_arg, stage_elems, tall, out=None, accumulators=None):
    """Autotuner pre-filter. stage_elems(blocks, kwargs): elements one pipeline stage holds.
    Keeps configs that fit in shared memory, whose row tile suits the row count (``tall``:
    GEMMs, where many rows want tiles of 64+ rows) and, for fp64 (no tensor cores, 8-byte
    accumulators), a small output tile ``out``. accumulators(kwargs): how many [BLOCK_M, out]
    accumulators the kernel holds; above 128 registers a thread for them, sm_90 builds spill."""
    def prune(configs, named_args, **kwargs):
        esize, m = named_args[first_arg].element_size(), named_args["M_BUCKET"]

        def ok(c):
            bm = c.kwargs["BLOCK_M"]
            rows = bm >= 64 if (tall and m > 64) else bm <= max(16, m)
            small = esize < 8 or out is None or c.kwargs["BLOCK_M"] * c.kwargs[out] <= 64 * 64
            regs = accumulators is None or (accumulators(kwargs) * bm * c.kwargs[out] * max(1, esize // 4)
                                            <= 128 * 32 * c.num_warps)
            return rows and small and regs and stage_elems(c.kwargs, kwargs) * esize * c.num_stages <= _SMEM_BUDGET
        kept = [c for c in configs if ok(c)]
        return kept or [min(configs, key=lambda c: stage_elems(c.kwargs, kwargs) * c.num_stages)]
    return prune


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
            tall=True, out="BLOCK_N"))
dx = _autotuned(  # stage: g and W tiles
    _lora_bwd_dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"), _TUNE_KEY,
    _pruner("G", lambda b, k: (b["BLOCK_M"] + b["BLOCK_K"]) * b["BLOCK_N"], tall=True, out="BLOCK_K",
            accumulators=lambda k: 2 if k["HAS_DROPOUT"] else 1))
down = _autotuned(  # stage: x and Aᵀ tiles
    _lora_down_kernel, _stream_configs(_STREAM_TILES), ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: (b["BLOCK_M"] + k["BLOCK_R"]) * b["BLOCK_K"], tall=False))
da = _autotuned(  # stage: x and v tiles (v in fp32)
    _lora_bwd_da_kernel, _stream_configs(_STREAM_TILES), ["M_BUCKET", "K", "R", "HAS_DROPOUT"],
    _pruner("X", lambda b, k: b["BLOCK_M"] * (b["BLOCK_K"] + 2 * k["BLOCK_R"]), tall=False))
gb = _autotuned(  # stage: g and u tiles (u in fp32)
    _lora_bwd_gb_kernel, _GB_TILES, ["M_BUCKET", "N", "R", "BLOCK_N"],
    _pruner("G", lambda b, k: b["BLOCK_M"] * (k["BLOCK_N"] + 2 * k["BLOCK_R"]), tall=False))
