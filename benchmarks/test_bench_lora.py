"""LoRA linear: y = x Wᵀ + s (x Aᵀ) Bᵀ, W [N, K] frozen, no bias (Llama-style projections).

Providers: lk-<backend> (``lk.lora_linear``), eager (PEFT's ``base(x) + lora_B(lora_A(x)) * s``),
peft (a real PEFT LoRA layer from ``get_peft_model`` with its defaults, which keep the adapter
weights in fp32 under a 16-bit base; when peft imports), merged (``F.linear(x, W + s B A)``: the
floor an unmerged layer chases, forward only) and, on a GPU, compile (torch.compile of eager).
Modes: fwd (no_grad), bwd (dx, dA, dB of one recorded forward), fwd+bwd.
"""
import pytest
import torch
import torch.nn.functional as F

import floors
from lk_bench import SHAPES, Case, compiled, default_dtype, providers, randn, rows, run_row, step
from lora_kernels.ops.lora import IMPLS

import lora_kernels as lk

if SHAPES == "full":
    SHAPE_LIST = [dict(M=m, K=k, N=n, r=r) for m in (1, 16, 512, 8192)
                  for k, n in ((4096, 4096), (4096, 11008), (1024, 1024)) for r in (8, 16, 64)]
elif SHAPES == "default":  # the targets
    SHAPE_LIST = [dict(M=m, K=4096, N=4096, r=16) for m in (1, 16, 8192)]
else:  # CPU: tiny
    SHAPE_LIST = [dict(M=1, K=256, N=512, r=8), dict(M=64, K=256, N=512, r=8)]

SCALING = 2.0  # alpha / r with alpha = 2r
try:
    import peft
except ImportError:
    peft = None
PROVIDERS = providers(IMPLS, floors_=("merged",)) + (["peft"] if peft is not None else [])
ROWS = rows(SHAPE_LIST, [default_dtype()], floors.MODES, PROVIDERS, fwd_only=("merged",))


def eager_lora(x, weight, lora_A, lora_B):
    """PEFT's LoRA Linear forward: base layer, then the low-rank path added, scaled."""
    result = F.linear(x, weight)
    return result + F.linear(F.linear(x, lora_A), lora_B) * SCALING


def peft_layer(weight, lora_A, lora_B):
    """PEFT's own LoRA layer over a bias-free nn.Linear holding ``weight``, its adapter weights
    copied from lora_A and lora_B (in the dtype PEFT chose for them)."""
    n, k = weight.shape
    r = lora_A.shape[0]
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype))
    with torch.no_grad():
        model.proj.weight.copy_(weight)
    config = peft.LoraConfig(r=r, lora_alpha=int(SCALING * r), lora_dropout=0.0, target_modules=["proj"])
    layer = peft.get_peft_model(model, config).base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return layer


def build(shape, dtype, mode, provider):
    m, k, n, r = shape["M"], shape["K"], shape["N"], shape["r"]
    train = mode != "fwd"
    x = randn(m, k, dtype=dtype, requires_grad=train)
    weight = randn(n, k, dtype=dtype, scale=k ** -0.5)
    lora_A = randn(r, k, dtype=dtype, scale=k ** -0.5, requires_grad=train)
    lora_B = randn(n, r, dtype=dtype, scale=0.02, requires_grad=train)  # not zero: real work
    inputs, grads = [x, weight, lora_A, lora_B], [x, lora_A, lora_B]
    g = randn(m, n, dtype=dtype) if train else None
    if provider == "merged":
        merged = (weight.float() + SCALING * lora_B.detach().float() @ lora_A.detach().float()).to(dtype)
        forward = lambda x, weight, lora_A, lora_B: F.linear(x, merged)  # noqa: E731
    elif provider == "eager":
        forward = eager_lora
    elif provider == "compile":
        forward = compiled(eager_lora)
    elif provider == "peft":
        layer = peft_layer(weight, lora_A, lora_B)
        grads = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        forward = lambda x, weight, lora_A, lora_B: layer(x)  # noqa: E731
        return Case(step(mode, forward, inputs, grads, g), floors.lora(m, k, n, r, mode, dtype), keep=[layer])
    else:
        forward = lambda x, weight, lora_A, lora_B: lk.lora_linear(  # noqa: E731
            x, weight, None, lora_A, lora_B, SCALING)
    return Case(step(mode, forward, inputs, grads, g), floors.lora(m, k, n, r, mode, dtype))


@pytest.mark.parametrize("shape, dtype, mode, provider", ROWS)
def test_lora(benchmark, shape, dtype, mode, provider):
    cost = floors.lora(shape["M"], shape["K"], shape["N"], shape["r"], mode, dtype)
    run_row(benchmark, "lora", shape, dtype, mode, provider, build, cost)
