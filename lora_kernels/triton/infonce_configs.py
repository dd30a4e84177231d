"""Autotune rules of the InfoNCE kernels: the config lists, the pruner that filters them per
launch, and the autotuned kernel handles that triton/infonce.py launches."""
import triton

from . import _common
from .infonce_kernels import _infonce_bwd_tile_kernel, _infonce_fwd_kernel, _infonce_gemm_kernel


# Rules from what ptxas made of every config for sm_90 (Triton 3.6, ptxas 12.8:
# benchmarks/triton_sm90.py; rerun `python benchmarks/triton_sm90.py --ops infonce`, the table for all
# shapes is benchmarks/results/triton-sm90-3.6.0.md). The S tiles are 128 x 128 (BM = BN, fixed by
# the launcher) and need 8 warps.
# - The forward keeps that tile, its exponentials and the row and column statistics live and sits
#   at 255 registers, hence its own list (_FWD_CONFIGS). On tensor cores it keeps BK x element size
#   x stages within FWD_TC_BYTES = 192 (16-bit BK64 s3 and BK32 s4, tf32 BK32 s2/s3 and BK16 s4
#   spilled 16-68 B a thread; 16-bit BK32 s3 and tf32 BK16 s3 did not); in fp32 on CUDA cores only
#   BK = 32 with 3 stages stayed clean (BK16 s3/s4 and BK32 s2 spilled 4-12 B).
# - With misaligned rows (d = 100) 128 x 128 tiles spilled 64-640 B in fp32 whatever BK, so the
#   launcher takes 64 x 64 there (infonce._tile_block).
# - Where the dot runs on CUDA cores (fp32 without TF32, fp64) every operand tile is in registers:
#   the GEMM keeps its accumulator and operand tiles (B's twice when HAS_SCALE rescales it) within
#   FMA_GEMM_LIVE = 56 values a thread; at 64 and more fp32 spilled 420-592 B (BM64 BN128 BK32 w8
#   with HAS_SCALE).
# - Misaligned GEMM operands (N = 300, d = 100: sizes or strides not a multiple of 16) are loaded
#   element by element, each with its own address: on tensor cores the output tile plus one stage of
#   operand tiles then stays within MISALIGNED_GEMM_LIVE = 80 values a thread (96 and up spilled
#   24-364 B).
FMA_GEMM_LIVE, MISALIGNED_GEMM_LIVE, FWD_TC_BYTES = 56, 80, 192


def _pruner(stage_bytes, tunable_tile, forward=False):
    """Autotuner pre-filter: pipelined tiles (stage_bytes a stage) within shared memory; 8 warps for
    128×128 output tiles; the forward's FWD_TC_BYTES on tensor cores; on CUDA cores, 8 warps for
    tiles of 64×128 and up, BK = 32 in fp32, the forward's BK32 s3 and, for the GEMM (tunable tile),
    no tile above 64×128 and the live-values rules above. The smallest config stays when none
    survives (fp64 only)."""
    def prune(configs, named_args, **kwargs):
        esize = named_args["A" if tunable_tile else "I"].element_size()
        fma = esize >= 4 and kwargs.get("PREC", "ieee") == "ieee"
        loose = tunable_tile and _common.misaligned(named_args, ("M", "N", "K", "s_am", "s_ak", "s_bk", "s_bn"))

        def smem(c):
            return stage_bytes(c.kwargs, named_args, kwargs) * c.num_stages

        def ok(c):
            meta = {**kwargs, **c.kwargs}
            area = meta["BM"] * meta["BN"]
            if smem(c) > _common.SMEM_BYTES or (c.num_warps < 8 and area >= (64 * 128 if fma else 128 * 128)):
                return False
            if not fma:
                if forward and meta["BK"] * esize * c.num_stages > FWD_TC_BYTES:
                    return False
                return not (tunable_tile and loose) or (
                    area + meta["BK"] * (meta["BM"] + meta["BN"]) <= MISALIGNED_GEMM_LIVE * 32 * c.num_warps)
            if esize == 4 and (meta["BK"] > 32 or (forward and (meta["BK"], c.num_stages) != (32, 3))):
                return False
            if not tunable_tile:
                return True
            live = area + meta["BK"] * (meta["BM"] + meta["BN"] * (2 if meta["HAS_SCALE"] else 1))
            return area <= 64 * 128 and live <= FMA_GEMM_LIVE * 32 * c.num_warps
        return [c for c in configs if ok(c)] or [min(configs, key=smem)]
    return prune


def _tile_stage(cfg, args, kwargs):   # an image and a text tile
    return (kwargs["BM"] + kwargs["BN"]) * cfg["BK"] * args["I"].element_size()


def _gemm_stage(cfg, args, kwargs):   # an A and a B tile
    return cfg["BK"] * (cfg["BM"] * args["A"].element_size() + cfg["BN"] * args["B"].element_size())


def _autotuned(kernel, configs, key, prune, restore_value=None):
    """The same kernel body everywhere: autotuned on a GPU, one fixed config when interpreted
    (the autotuner needs a GPU driver)."""
    if _common.INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=key, restore_value=restore_value,
                           prune_configs_by=_common.prune_by(prune))(kernel)


def _cfgs(space):
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in space]


_TILE_CONFIGS = _cfgs([({"BK": bk}, w, s) for bk in (32, 64) for w in (4, 8) for s in (3, 4)])
_FWD_CONFIGS = _cfgs([({"BK": 32}, 8, 3), ({"BK": 32}, 8, 2), ({"BK": 16}, 8, 4), ({"BK": 16}, 8, 3)])
_GEMM_CONFIGS = _cfgs([({"BM": bm, "BN": bn, "BK": bk}, w, s)
                       for bm, bn in ((128, 128), (64, 128), (128, 64), (64, 64))
                       for bk, w, s in ((32, 4, 4), (64, 4, 3), (64, 8, 3), (32, 8, 4))])

_TILE_PRUNE, _GEMM_PRUNE = _pruner(_tile_stage, tunable_tile=False), _pruner(_gemm_stage, tunable_tile=True)
fwd = _autotuned(_infonce_fwd_kernel, _FWD_CONFIGS, ["M", "NC", "D"],
                 _pruner(_tile_stage, tunable_tile=False, forward=True))
# These two read-modify-write buffers across launches (Σ Ĝ⊙S/c per column, the dT accumulator):
# the tuner's trial runs must not apply their update several times.
bwd_tile = _autotuned(_infonce_bwd_tile_kernel, _TILE_CONFIGS, ["M_s", "NC", "D"], _TILE_PRUNE,
                       restore_value=["SIG_PART"])
gemm = _autotuned(_infonce_gemm_kernel, _GEMM_CONFIGS, ["M", "N", "K"], _GEMM_PRUNE, restore_value=["OUT"])
