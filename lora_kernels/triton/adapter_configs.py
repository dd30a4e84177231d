"""Autotune rules of the adapter kernels: the config lists, the pruners that filter them per
launch, and the autotuned kernel handles that triton/adapter.py launches."""
import functools

import triton

from . import _common, adapter_kernels


def _rows_configs(block_r: int, itemsize: int):
    """Configs of the two rows kernels: the [BLOCK_M, BLOCK_R] accumulators must fit in registers.
    Per thread, an accumulator may take 32 registers with 16-bit inputs and 64 otherwise: in
    offline sm_90 builds (Triton 3.6, bottleneck 512) the 16-bit backward spilled 240 to 3056
    bytes a thread above that, the fp32 one nothing at 64."""
    per_thread = 32 if itemsize < 4 else 64
    configs = []
    for bm in (16, 32, 64):
        for bk in (32, 64, 128):
            if bm * block_r * max(itemsize, 4) > 64 * 1024 or bm * bk > 64 * 64:
                continue
            for warps in (4, 8):
                if bm * block_r <= per_thread * 32 * warps:
                    configs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=warps, num_stages=3))
    return configs


def _weights_configs():
    return [triton.Config(dict(BLOCK_M=bm), num_warps=w, num_stages=st)
            for bm in (32, 64, 128) for w in (4, 8) for st in (2, 3)]


def _prune_weights_configs(configs, named_args, **kwargs):
    """Autotuner pre-filter: drops configs whose g, x, act(h) and dh tiles times num_stages
    exceed shared memory (at or above what sm_90 builds allocate, so the configs that cannot
    launch go, and a few that could); BLOCK_M = 32 with 2 stages always fits."""
    esize = named_args["G"].element_size()
    stage = lambda c: c.kwargs["BLOCK_M"] * 2 * (kwargs["BLOCK_K"] + kwargs["BLOCK_R"]) * esize  # noqa: E731
    kept = [c for c in configs if stage(c) * c.num_stages <= _common.SMEM_BYTES]
    return kept or [min(configs, key=lambda c: stage(c) * c.num_stages)]


@functools.lru_cache(maxsize=None)
def tuned(kernel_name: str, block_r: int, itemsize: int):
    kernel = getattr(adapter_kernels, kernel_name)
    if kernel_name == "_adapter_bwd_weights_kernel":
        return triton.autotune(_weights_configs(), key=["K", "R", "BLOCK_K", "M_BUCKET"],
                               prune_configs_by=_common.prune_by(_prune_weights_configs))(kernel)
    return triton.autotune(_rows_configs(block_r, itemsize), key=["K", "R", "M_BUCKET"],
                           prune_configs_by=_common.prune_by())(kernel)
