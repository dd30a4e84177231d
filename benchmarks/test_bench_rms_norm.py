"""RMSNorm for LN-tuning of LLaMA-family models: y = x rstd (offset + γ) over rows of x [M, d].

Modes: fwd (no_grad); bwd-params: dγ only (x.requires_grad False: LN-tuning's first norm, whose
input is frozen); bwd: dγ and dx; fwd+bwd: forward and full backward. Providers: lk-<backend>
(``lk.rms_norm``), eager (``F.rms_norm``), copy (``y.copy_(x)``: the bandwidth floor, forward only),
on a GPU compile (torch.compile of ``F.rms_norm``) and, when liger_kernel is installed, liger
(Liger-Kernel's Triton RMSNorm, which always computes dx with dγ).
Targets on H100/H200 (issue 15): fwd ≥ 90% of copy bandwidth; bwd-params ≥ 85% of its byte floor
and ≥ 1.5× eager's full backward. GPU figures await a GPU run: ``make bench`` or
``pytest benchmarks/test_bench_rms_norm.py`` on one.
"""
import pytest
import torch
import torch.nn.functional as F

import floors
from lk_bench import (SHAPES, Case, compiled, default_dtype, liger_unavailable, providers, randn, rows, run_row,
                      step)
from lora_kernels.ops.rms_norm import IMPLS

import lora_kernels as lk

GPU_SHAPES = [dict(M=m, d=d) for m, d in ((32768, 2048), (16384, 4096), (8192, 8192), (4096, 16384),
                                          (32768, 4096))]
if SHAPES == "full":
    SHAPE_LIST, DTYPES = GPU_SHAPES, [torch.bfloat16, torch.float32]
elif SHAPES == "default":  # the targets, bf16
    SHAPE_LIST, DTYPES = GPU_SHAPES, [torch.bfloat16]
else:  # CPU: tiny, one many-rows and one wide shape
    SHAPE_LIST, DTYPES = [dict(M=256, d=256), dict(M=8, d=4096)], [default_dtype()]

EPS = 1e-6
PROVIDERS = providers(IMPLS, floors_=("copy",)) + (["liger"] if liger_unavailable() is None else [])
ROWS = rows(SHAPE_LIST, DTYPES, floors.LN_MODES, PROVIDERS, fwd_only=("copy",),
            compile_modes=None if SHAPES == "full" else ("fwd", "fwd+bwd"))


def eager_rms_norm(x, weight):
    return F.rms_norm(x, x.shape[-1:], weight, EPS)


def build(shape, dtype, mode, provider):
    m, d = shape["M"], shape["d"]
    train = mode != "fwd"
    x = randn(m, d, dtype=dtype, requires_grad=train and mode != "bwd-params")
    weight = randn(d, dtype=dtype, scale=0.1, shift=1.0, requires_grad=train)
    inputs = [x, weight]
    grads = [weight] if mode == "bwd-params" else inputs
    g = randn(m, d, dtype=dtype) if train else None
    if provider == "copy":
        out = torch.empty_like(x)
        forward = lambda x, weight: out.copy_(x)  # noqa: E731
    elif provider == "eager":
        forward = eager_rms_norm
    elif provider == "compile":
        forward = compiled(eager_rms_norm)
    elif provider == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        # (X, W, eps, offset, casting_mode, in_place): not in place, as the step's backward repeats.
        forward = lambda x, weight: LigerRMSNormFunction.apply(x, weight, EPS, 0.0, "llama", False)  # noqa: E731
    else:
        forward = lambda x, weight: lk.rms_norm(x, weight, EPS)  # noqa: E731
    return Case(step(mode, forward, inputs, grads, g), floors.rms_norm(m, d, mode, dtype))


@pytest.mark.parametrize("shape, dtype, mode, provider", ROWS)
def test_rms_norm(benchmark, shape, dtype, mode, provider):
    cost = floors.rms_norm(shape["M"], shape["d"], mode, dtype)
    run_row(benchmark, "rms_norm", shape, dtype, mode, provider, build, cost)
