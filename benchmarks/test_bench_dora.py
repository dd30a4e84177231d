"""DoRA linear: y = c ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ), c = m / ‖W + s·BA‖ by rows (detached), W [N, K]
frozen, no bias, no dropout.

Providers: lk-<backend> (``lk.dora_linear``), eager (PEFT's DoRA math spelled out: it builds the
N×K matrix W + s·BA every call for its norms), peft (a real PEFT layer, LoraConfig(use_dora=True),
when peft imports), lora-fused (our fused ``lk.lora_linear`` on the same shapes: the issue's
target is DoRA fwd+bwd ≤ 1.15× its time) and, on a GPU, compile (torch.compile of eager).
Modes: fwd, bwd, fwd+bwd; rows record ``peak_extra_mib`` (target: no N×K buffer, O(N·r + M·r)
beyond the output and what autograd saves).
Run on a GPU: ``pytest benchmarks/test_bench_dora.py --benchmark-json=...`` (see conftest.py).
"""
import pytest
import torch
import torch.nn.functional as F

import floors
from lk_bench import SHAPES, Case, compiled, default_dtype, providers, randn, rows, run_row, step
from lora_kernels.ops.dora import IMPLS

import lora_kernels as lk

if SHAPES == "full":
    SHAPE_LIST = [dict(M=m, K=4096, N=4096, r=r) for m in (16, 4096, 8192, 16384) for r in (8, 16, 64)]
elif SHAPES == "default":  # the targets
    SHAPE_LIST = [dict(M=m, K=4096, N=4096, r=16) for m in (4096, 8192, 16384)]
else:  # CPU: tiny
    SHAPE_LIST = [dict(M=64, K=256, N=512, r=8)]

SCALING = 2.0  # alpha / r with alpha = 2r
try:
    import peft
except ImportError:
    peft = None
PROVIDERS = providers(IMPLS, floors_=("lora-fused",)) + (["peft"] if peft is not None else [])
ROWS = rows(SHAPE_LIST, [default_dtype()], floors.MODES, PROVIDERS)


def eager_dora(x, weight, lora_A, lora_B, magnitude):
    """PEFT's DoRA Linear forward without dropout (base result reused), as PEFT computes it."""
    base = F.linear(x, weight)
    norm = torch.linalg.norm(weight + SCALING * (lora_B @ lora_A), dim=1).detach()
    c = (magnitude / norm).view(1, -1)
    return base + (c - 1) * base + c * F.linear(F.linear(x, lora_A), lora_B) * SCALING


def peft_layer(weight, lora_A, lora_B, magnitude):
    n, k = weight.shape
    r = lora_A.shape[0]
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype))
    with torch.no_grad():
        model.proj.weight.copy_(weight)
    config = peft.LoraConfig(r=r, lora_alpha=int(SCALING * r), lora_dropout=0.0, target_modules=["proj"],
                             use_dora=True)
    layer = peft.get_peft_model(model, config).base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    return layer


def build(shape, dtype, mode, provider):
    m, k, n, r = shape["M"], shape["K"], shape["N"], shape["r"]
    train = mode != "fwd"
    x = randn(m, k, dtype=dtype, requires_grad=train)
    weight = randn(n, k, dtype=dtype, scale=k ** -0.5)
    lora_A = randn(r, k, dtype=dtype, scale=k ** -0.5, requires_grad=train)
    lora_B = randn(n, r, dtype=dtype, scale=0.02, requires_grad=train)  # not zero: real work
    magnitude = (weight.float().norm(dim=1) * 1.1).to(dtype).requires_grad_(train)
    inputs, grads = [x, weight, lora_A, lora_B, magnitude], [x, lora_A, lora_B, magnitude]
    g = randn(m, n, dtype=dtype) if train else None
    cost = floors.dora(m, k, n, r, mode, dtype)
    if provider == "eager":
        forward = eager_dora
    elif provider == "compile":
        forward = compiled(eager_dora)
    elif provider == "lora-fused":
        forward = lambda x, weight, lora_A, lora_B, magnitude: lk.lora_linear(  # noqa: E731
            x, weight, None, lora_A, lora_B, SCALING)
        grads = [x, lora_A, lora_B]
    elif provider == "peft":
        layer = peft_layer(weight, lora_A, lora_B, magnitude)
        grads = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                 layer.lora_magnitude_vector["default"].weight]
        forward = lambda x, weight, lora_A, lora_B, magnitude: layer(x)  # noqa: E731
        return Case(step(mode, forward, inputs, grads, g), cost, keep=[layer])
    else:
        forward = lambda x, weight, lora_A, lora_B, magnitude: lk.dora_linear(  # noqa: E731
            x, weight, None, lora_A, lora_B, magnitude, SCALING)
    return Case(step(mode, forward, inputs, grads, g), cost)


@pytest.mark.parametrize("shape, dtype, mode, provider", ROWS)
def test_dora(benchmark, shape, dtype, mode, provider):
    cost = floors.dora(shape["M"], shape["K"], shape["N"], shape["r"], mode, dtype)
    # lora-fused computes plain LoRA, a reference time, not the same function
    run_row(benchmark, "dora", shape, dtype, mode, provider, build, cost, check_fwd=provider != "lora-fused")
