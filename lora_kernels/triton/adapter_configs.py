"""Autotune rules of the adapter kernels: the config lists, the pruners that filter them per
launch, and the autotuned kernel handles that triton/adapter.py launches."""
import functools

import triton

from . import _common, adapter_kernels


# Register and shared-memory rules, from what ptxas made of every config for sm_90 (Triton 3.6,
# ptxas 12.8: benchmarks/triton_sm90.py; rerun `python benchmarks/triton_sm90.py --ops adapter`, the
# table for all shapes is benchmarks/results/triton-sm90-3.6.0.md). Counted in 4-byte values a
# thread keeps live:
# - rows kernels, 16-bit (tensor cores): the [BLOCK_M, BLOCK_R] accumulator within 32 a thread
#   (none spilled up to bottleneck 1024), and 8 warps at BLOCK_R = 256 with BLOCK_M >= 32 (BM16 w8
#   spilled 12 B with gelu_tanh, held at 128 registers). fp32 (CUDA cores, operands in registers): the accumulator
#   within 8 and accumulator + weight tile + output chunk within 48; 64 and up spilled 4-3940 B a
#   thread (BM32 BK64 w4, BM64 BK64 w4/w8 at bottleneck 64-256), and so did an accumulator of 16 at
#   BLOCK_R = 128 (BM32 BK32 w8: 20 B, ptxas held it at 128 registers).
# - weights kernel, 16-bit: its two [BLOCK_R, BLOCK_K] accumulators plus a [BLOCK_M, BLOCK_R + BLOCK_K]
#   operand share within 192 (200 spilled 64 B at M = 1: BR256 BK32 BM32 w4; 272 spilled 8-372 B:
#   BR256 BK32 BM64 w4, BR64 BK128 BM128 w4). fp32: 4 warps only (with 8, ptxas held the kernel to
#   128 registers and spilled 4-128 B). 2 stages: 3 spilled 4-8 B, held at 128 registers (BR16 BK128
#   BM32 w4 s3, BR32 BK128 BM32 w8 s3 in bf16).
# - all adapter kernels are memory-bound (~r FLOP a byte): pipelined tiles within MEMORY_BOUND_SMEM,
#   so that two blocks share an SM (BR256 BM16 BK128 took 141 KB, one block per SM).
# - misaligned rows (the width or a row stride not a multiple of 16: d = 1000) are loaded element by
#   element, each with its own address: on tensor cores the rows kernels then keep accumulator plus
#   one stage of x and weight tiles within 80 values a thread (112 spilled 112-128 B: BM32 BK64 w4
#   at BR128), and the weights kernel takes 8 warps with g, x, act(h) and dh tiles within 48 (4 warps
#   spilled 100-1184 B).
MEMORY_BOUND_SMEM = 96 << 10


def _rows_configs(block_r: int, itemsize: int):
    """Configs of the two rows kernels (fixed BLOCK_R: one autotuner per block_r and input size),
    within the register and shared-memory rules above."""
    configs = []
    for bm in (16, 32, 64):
        for bk in (32, 64, 128):
            if bm * bk > 64 * 64 or (bm * bk + bk * block_r) * itemsize * 3 > MEMORY_BOUND_SMEM:
                continue
            for warps in (4, 8):
                threads = 32 * warps
                if itemsize < 4:
                    fits = bm * block_r <= 32 * threads and (warps == 4 or block_r < 256 or bm >= 32)
                else:
                    fits = bm * block_r <= 8 * threads and bm * block_r + bk * block_r + bm * bk <= 48 * threads
                if fits:
                    configs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=warps, num_stages=3))
    # (never empty for the block_r the launcher uses: BM16 BK32 with 8 warps fits every rule)
    return configs or [triton.Config(dict(BLOCK_M=16, BLOCK_K=32), num_warps=8, num_stages=3)]


def _prune_rows_configs(configs, named_args, **kwargs):
    """Autotuner pre-filter of the rows kernels: the misaligned-rows rule above."""
    ints = ("K", "stride_xm", "stride_gm")
    if named_args["WD"].element_size() >= 4 or not _common.misaligned(named_args, ints):
        return configs
    br = kwargs["BLOCK_R"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * br + c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + br)
            <= 80 * 32 * c.num_warps]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] / c.num_warps)]


def _weights_configs():
    return [triton.Config(dict(BLOCK_M=bm), num_warps=w, num_stages=st)
            for bm in (32, 64, 128) for w, st in ((4, 2), (8, 2))]


def _prune_weights_configs(configs, named_args, **kwargs):
    """Autotuner pre-filter of the weights kernel: the rules above; when none passes (never seen),
    the config with the least shared memory."""
    esize = named_args["G"].element_size()
    bk, br = kwargs["BLOCK_K"], kwargs["BLOCK_R"]
    stage = lambda c: c.kwargs["BLOCK_M"] * 2 * (bk + br) * esize  # noqa: E731

    loose = _common.misaligned(named_args, ("K", "stride_gm", "stride_xm"))

    def ok(c):
        threads = 32 * c.num_warps
        if loose and esize < 4:
            regs = c.num_warps == 8 and 2 * c.kwargs["BLOCK_M"] * (br + bk) <= 48 * threads
        elif esize < 4:
            regs = 2 * br * bk + c.kwargs["BLOCK_M"] * (br + bk) <= 192 * threads
        else:
            regs = c.num_warps == 4
        return regs and stage(c) * c.num_stages <= MEMORY_BOUND_SMEM
    kept = [c for c in configs if ok(c)]
    return kept or [min(configs, key=lambda c: stage(c) * c.num_stages)]


@functools.lru_cache(maxsize=None)
def tuned(kernel_name: str, block_r: int, itemsize: int):
    kernel = getattr(adapter_kernels, kernel_name)
    if kernel_name == "_adapter_bwd_weights_kernel":
        return triton.autotune(_weights_configs(), key=["K", "R", "BLOCK_K", "M_BUCKET"],
                               prune_configs_by=_common.prune_by(_prune_weights_configs))(kernel)
    return triton.autotune(_rows_configs(block_r, itemsize), key=["K", "R", "M_BUCKET"],
                           prune_configs_by=_common.prune_by(_prune_rows_configs))(kernel)
