"""Autotune rules of the InfoNCE kernels: the config lists, the pruner that filters them per
launch, and the autotuned kernel handles that triton/infonce.py launches."""
import triton

from . import _common
from .infonce_kernels import _infonce_bwd_tile_kernel, _infonce_fwd_kernel, _infonce_gemm_kernel


def _pruner(stage_bytes, tunable_tile):
    """Autotuner pre-filter: the tuner never compiles a config that cannot launch or that
    spilled registers when every config was compiled for sm_90 offline (Triton 3.6, ptxas
    resource usage). Kept: pipelined tiles (stage_bytes a stage) within shared memory; 8 warps
    for 128×128 output tiles; and where the dot runs on CUDA cores with every operand in
    registers (fp64, fp32 without TF32), 8 warps for tiles of 64×128 and up, BK = 32 in fp32
    and, when the tile is tunable (the GEMM), no tile above 64×128. The smallest config stays
    when none survives."""
    def prune(configs, named_args, **kwargs):
        esize = named_args["A" if tunable_tile else "I"].element_size()
        fma = esize >= 4 and kwargs.get("PREC", "ieee") == "ieee"

        def smem(c):
            return stage_bytes(c.kwargs, named_args, kwargs) * c.num_stages

        def ok(c):
            meta = {**kwargs, **c.kwargs}
            area = meta["BM"] * meta["BN"]
            if smem(c) > _common.SMEM_BYTES or (c.num_warps < 8 and area >= (64 * 128 if fma else 128 * 128)):
                return False
            return not fma or ((esize > 4 or meta["BK"] <= 32) and (not tunable_tile or area <= 64 * 128))
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
_GEMM_CONFIGS = _cfgs([({"BM": bm, "BN": bn, "BK": bk}, w, s)
                       for bm, bn in ((128, 128), (64, 128), (128, 64), (64, 64))
                       for bk, w, s in ((32, 4, 4), (64, 4, 3), (64, 8, 3), (32, 8, 4))])

_TILE_PRUNE, _GEMM_PRUNE = _pruner(_tile_stage, tunable_tile=False), _pruner(_gemm_stage, tunable_tile=True)
fwd = _autotuned(_infonce_fwd_kernel, _TILE_CONFIGS, ["M", "NC", "D"], _TILE_PRUNE)
# These two read-modify-write buffers across launches (Σ Ĝ⊙S/c per column, the dT accumulator):
# the tuner's trial runs must not apply their update several times.
bwd_tile = _autotuned(_infonce_bwd_tile_kernel, _TILE_CONFIGS, ["M_s", "NC", "D"], _TILE_PRUNE,
                       restore_value=["SIG_PART"])
gemm = _autotuned(_infonce_gemm_kernel, _GEMM_CONFIGS, ["M", "N", "K"], _GEMM_PRUNE, restore_value=["OUT"])
