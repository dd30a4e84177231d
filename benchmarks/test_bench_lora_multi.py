"""Many LoRA adapters in one batch: y_m = x_m Wᵀ + s_i (x_m A_iᵀ) B_iᵀ, i = adapter of row m, no bias.

Rows (issue 17): decode, M = 1, 16, 64 rows over 16 loaded adapters (row m uses adapter m % 16),
forward only; prefill/training, M = 8192 rows in contiguous runs over 4, 16 or 64 adapters,
fwd and fwd+bwd. K = N = 4096, r = 16, bf16 on a GPU; tiny shapes on a CPU.
Providers: lk-<backend> (``lk.lora_linear_multi``, ids and scalings handed over as CPU tensors,
as a server holds them: no device sync), eager (PEFT's mixed-batch loop written out: base GEMM,
then per adapter its sub-batch through lora_A, lora_B, added at its rows), peft (a real PEFT
LoRA layer holding the adapters, called with ``adapter_names=``; forward only, as PEFT allows
mixed batches for inference only; when peft imports), per-adapter (one fused ``lk.lora_linear``
call per adapter on its rows, scattered back) and single (one ``lk.lora_linear`` with one adapter
on all M rows: the issue's targets are ratios to it — decode with 16 adapters <= 1.3x it,
training fwd+bwd of 4 adapters <= 1.2x it).
"""
import pytest
import torch
import torch.nn.functional as F

import floors
from lk_bench import SHAPES, Case, default_dtype, providers, randn, rows, run_row, step
from lora_kernels.ops.lora_multi import IMPLS

import lora_kernels as lk

if SHAPES == "full":
    DECODE = [dict(M=m, K=k, N=k, r=16, n=16) for m in (1, 4, 16, 64) for k in (4096, 1024)]
    PREFILL = [dict(M=8192, K=k, N=k, r=16, n=n) for n in (4, 16, 64) for k in (4096, 1024)]
elif SHAPES == "default":  # the targets
    DECODE = [dict(M=m, K=4096, N=4096, r=16, n=16) for m in (1, 16, 64)]
    PREFILL = [dict(M=8192, K=4096, N=4096, r=16, n=n) for n in (4, 16, 64)]
else:  # CPU: tiny
    DECODE = [dict(M=4, K=256, N=512, r=8, n=4)]
    PREFILL = [dict(M=64, K=256, N=512, r=8, n=4)]

SCALING = 2.0  # alpha / r with alpha = 2r
try:
    import peft
except ImportError:
    peft = None
PROVIDERS = providers(IMPLS, floors_=("per-adapter", "single")) + (["peft"] if peft is not None else [])
# torch.compile of the eager loop is left out: it recompiles for every new set of sub-batch sizes.
PROVIDERS = [p for p in PROVIDERS if p != "compile"]
ROWS = (rows(DECODE, [default_dtype()], ("fwd",), PROVIDERS)
        + rows(PREFILL, [default_dtype()], ("fwd", "fwd+bwd"), PROVIDERS, fwd_only=("peft",)))


def adapter_ids(shape) -> torch.Tensor:
    """Decode: row m uses adapter m % n; prefill: n contiguous runs of rows (CPU tensor)."""
    m, n = shape["M"], shape["n"]
    if m <= 64:
        return torch.arange(m) % n
    return torch.arange(m) * n // m


def eager_multi(x, weight, lora_A, lora_B, groups):
    """PEFT's _mixed_batch_forward for vanilla LoRA: the base layer, then per adapter its rows."""
    result = F.linear(x, weight)
    for i, rows_i in groups:
        result[rows_i] += F.linear(F.linear(x[rows_i], lora_A[i]), lora_B[i]) * SCALING
    return result


def per_adapter(x, weight, lora_A, lora_B, groups):
    """One fused lora_linear call per adapter on its rows, scattered back into the output."""
    y = x.new_empty(x.shape[0], weight.shape[0])
    for i, rows_i in groups:
        y = y.index_copy(0, rows_i, lk.lora_linear(x[rows_i], weight, None, lora_A[i], lora_B[i], SCALING))
    return y


def peft_layer(weight, lora_A, lora_B):
    """A PEFT LoRA layer over a bias-free nn.Linear holding ``weight``, adapters "a0".."a{n-1}"."""
    n_out, k = weight.shape
    n, r = lora_A.shape[:2]
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(k, n_out, bias=False, device=weight.device, dtype=weight.dtype))
    with torch.no_grad():
        model.proj.weight.copy_(weight)
    config = lambda: peft.LoraConfig(r=r, lora_alpha=int(SCALING * r), lora_dropout=0.0,  # noqa: E731
                                     target_modules=["proj"])
    peft_model = peft.get_peft_model(model, config(), adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", config())
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        for i in range(n):
            layer.lora_A[f"a{i}"].weight.copy_(lora_A[i])
            layer.lora_B[f"a{i}"].weight.copy_(lora_B[i])
    return layer.eval()


def build(shape, dtype, mode, provider):
    m, k, n_out, r, n = shape["M"], shape["K"], shape["N"], shape["r"], shape["n"]
    train = mode != "fwd"
    x = randn(m, k, dtype=dtype, requires_grad=train)
    weight = randn(n_out, k, dtype=dtype, scale=k ** -0.5)
    lora_A = randn(n, r, k, dtype=dtype, scale=k ** -0.5, requires_grad=train)
    lora_B = randn(n, n_out, r, dtype=dtype, scale=0.02, requires_grad=train)  # not zero: real work
    ids = adapter_ids(shape)
    used = sorted(set(ids.tolist()))
    groups = [(i, (ids == i).nonzero().squeeze(1).to(x.device)) for i in used]
    cost = floors.lora_multi(m, k, n_out, r, len(used), mode, dtype)
    inputs, grads = [x, weight, lora_A, lora_B], [x, lora_A, lora_B]
    g = randn(m, n_out, dtype=dtype) if train else None
    if provider == "eager":
        forward = lambda x, weight, lora_A, lora_B: eager_multi(x, weight, lora_A, lora_B, groups)  # noqa: E731
    elif provider == "per-adapter":
        forward = lambda x, weight, lora_A, lora_B: per_adapter(x, weight, lora_A, lora_B, groups)  # noqa: E731
    elif provider == "single":
        forward = lambda x, weight, lora_A, lora_B: lk.lora_linear(  # noqa: E731
            x, weight, None, lora_A[0], lora_B[0], SCALING)
    elif provider == "peft":
        layer = peft_layer(weight, lora_A, lora_B)
        names = [f"a{i}" for i in ids.tolist()]
        forward = lambda x, weight, lora_A, lora_B: layer(x, adapter_names=names)  # noqa: E731
        return Case(step(mode, forward, inputs, grads, g), cost, keep=[layer])
    else:
        scalings = torch.full((n,), SCALING)
        forward = lambda x, weight, lora_A, lora_B: lk.lora_linear_multi(  # noqa: E731
            x, weight, None, lora_A, lora_B, scalings, ids)
    return Case(step(mode, forward, inputs, grads, g), cost)


@pytest.mark.parametrize("shape, dtype, mode, provider", ROWS)
def test_lora_multi(benchmark, shape, dtype, mode, provider):
    used = len(set(adapter_ids(shape).tolist()))
    cost = floors.lora_multi(shape["M"], shape["K"], shape["N"], shape["r"], used, mode, dtype)
    # "single" computes one adapter on every row: its output differs from the mixed batch's
    run_row(benchmark, "lora_multi", shape, dtype, mode, provider, build, cost, check_fwd=provider != "single")
