"""Bottleneck adapter: y = x + s (gelu(x W_dᵀ + b_d) W_uᵀ + b_u), x [M, d], W_d [r, d], W_u [d, r].

Memory-bound (≈ r FLOP/byte): the goal is one read of x and one write of y. Providers:
lk-<backend> (``lk.adapter``), eager (Linear → GELU → Linear → add, as ``nn.Module``s run it),
copy (``y.copy_(x)``: the bandwidth floor, forward only) and, on a GPU, compile (torch.compile
of eager). Modes: fwd (no_grad), bwd (dx and every weight gradient of one recorded forward),
fwd+bwd.
"""
import pytest
import torch
import torch.nn.functional as F

import floors
from lk_bench import SHAPES, Case, compiled, default_dtype, providers, randn, rows, run_row, step
from lora_kernels.ops.adapter import IMPLS

import lora_kernels as lk

if SHAPES == "full":
    SHAPE_LIST = [dict(M=m, d=d, r=r) for m in (128, 4096, 32768) for d in (768, 1024, 4096)
                  for r in (16, 64, 256)]
elif SHAPES == "default":  # the target
    SHAPE_LIST = [dict(M=32768, d=1024, r=64)]
else:  # CPU: tiny
    SHAPE_LIST = [dict(M=256, d=256, r=16)]

SCALE = 1.0
PROVIDERS = providers(IMPLS, floors_=("copy",))
ROWS = rows(SHAPE_LIST, [default_dtype()], floors.MODES, PROVIDERS, fwd_only=("copy",))


def eager_adapter(x, w_down, b_down, w_up, b_up):
    """Houlsby's bottleneck as PyTorch modules run it: down Linear, GELU, up Linear, residual."""
    return x + F.linear(F.gelu(F.linear(x, w_down, b_down)), w_up, b_up) * SCALE


def build(shape, dtype, mode, provider):
    m, d, r = shape["M"], shape["d"], shape["r"]
    train = mode != "fwd"
    x = randn(m, d, dtype=dtype, requires_grad=train)
    w_down = randn(r, d, dtype=dtype, scale=d ** -0.5, requires_grad=train)
    b_down = randn(r, dtype=dtype, scale=0.02, requires_grad=train)
    w_up = randn(d, r, dtype=dtype, scale=0.02, requires_grad=train)  # not the zero init: real work
    b_up = randn(d, dtype=dtype, scale=0.02, requires_grad=train)
    inputs = [x, w_down, b_down, w_up, b_up]
    g = randn(m, d, dtype=dtype) if train else None
    if provider == "copy":
        out = torch.empty_like(x)
        forward = lambda x, *weights: out.copy_(x)  # noqa: E731
    elif provider == "eager":
        forward = eager_adapter
    elif provider == "compile":
        forward = compiled(eager_adapter)
    else:
        forward = lambda *args: lk.adapter(*args, activation="gelu", scale=SCALE)  # noqa: E731
    return Case(step(mode, forward, inputs, inputs, g), floors.adapter(m, d, r, mode, dtype))


@pytest.mark.parametrize("shape, dtype, mode, provider", ROWS)
def test_adapter(benchmark, shape, dtype, mode, provider):
    cost = floors.adapter(shape["M"], shape["d"], shape["r"], mode, dtype)
    run_row(benchmark, "adapter", shape, dtype, mode, provider, build, cost)
