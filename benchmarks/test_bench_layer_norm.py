"""LayerNorm for LN-tuning: y = γ (x − μ) rstd + β over rows of x [M, d].

Modes: fwd (no_grad); bwd-params: dγ, dβ only (x.requires_grad False: the first LayerNorm of
an LN-tuned model, whose input is frozen); bwd: dγ, dβ and dx; fwd+bwd: forward and full
backward. Providers: lk-<backend> (``lk.layer_norm``), eager (``F.layer_norm``), copy
(``y.copy_(x)``: the bandwidth floor, forward only), on a GPU compile (torch.compile of
``F.layer_norm``, which Inductor turns into its own fused kernel) and, when liger_kernel is
installed, liger (Liger-Kernel's Triton LayerNorm, which always computes dx as well).
"""
import pytest
import torch
import torch.nn.functional as F

import floors
from lk_bench import (SHAPES, Case, compiled, default_dtype, liger_unavailable, providers, randn, rows,
                      run_row, step)
from lora_kernels.ops.layer_norm import IMPLS

import lora_kernels as lk

GPU_SHAPES = [dict(M=m, d=d) for m, d in ((32768, 768), (32768, 1024), (8192, 4096), (4096, 16384),
                                          (1024, 65536), (256, 131072))]
if SHAPES == "full":
    SHAPE_LIST, DTYPES = GPU_SHAPES, [torch.bfloat16, torch.float32]
elif SHAPES == "default":  # the targets, bf16
    SHAPE_LIST, DTYPES = GPU_SHAPES, [torch.bfloat16]
else:  # CPU: tiny, one many-rows and one wide shape
    SHAPE_LIST, DTYPES = [dict(M=256, d=256), dict(M=8, d=4096)], [default_dtype()]

EPS = 1e-5
PROVIDERS = providers(IMPLS, floors_=("copy",)) + (["liger"] if liger_unavailable() is None else [])
ROWS = rows(SHAPE_LIST, DTYPES, floors.LN_MODES, PROVIDERS, fwd_only=("copy",),
            compile_modes=None if SHAPES == "full" else ("fwd", "fwd+bwd"))


def eager_layer_norm(x, weight, bias):
    return F.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def build(shape, dtype, mode, provider):
    m, d = shape["M"], shape["d"]
    train = mode != "fwd"
    x = randn(m, d, dtype=dtype, shift=1.0, requires_grad=train and mode != "bwd-params")
    weight = randn(d, dtype=dtype, scale=0.1, shift=1.0, requires_grad=train)
    bias = randn(d, dtype=dtype, scale=0.1, requires_grad=train)
    inputs = [x, weight, bias]
    grads = [weight, bias] if mode == "bwd-params" else inputs
    g = randn(m, d, dtype=dtype) if train else None
    if provider == "copy":
        out = torch.empty_like(x)
        forward = lambda x, weight, bias: out.copy_(x)  # noqa: E731
    elif provider == "eager":
        forward = eager_layer_norm
    elif provider == "compile":
        forward = compiled(eager_layer_norm)
    elif provider == "liger":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        forward = lambda x, weight, bias: LigerLayerNormFunction.apply(x, weight, bias, EPS)  # noqa: E731
    else:
        forward = lambda x, weight, bias: lk.layer_norm(x, weight, bias, EPS)  # noqa: E731
    return Case(step(mode, forward, inputs, grads, g), floors.layer_norm(m, d, mode, dtype))


@pytest.mark.parametrize("shape, dtype, mode, provider", ROWS)
def test_layer_norm(benchmark, shape, dtype, mode, provider):
    cost = floors.layer_norm(shape["M"], shape["d"], mode, dtype)
    run_row(benchmark, "layer_norm", shape, dtype, mode, provider, build, cost)
