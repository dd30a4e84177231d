"""With a GPU and the built extension: the 16-bit adapter forward (csrc/kernels/adapter_cutlass.cu) and
its backward's dz and dx (adapter_bwd_cutlass.cu) on LoRA's CUTLASS kernels, where adapter_fused.cu's
single pass does not apply (R > 64) and K and R are multiples of 8 (few output tiles: split-K,
test_cutlass_splitk.py). Which path other shapes take: test_cuda_paths.py's ADAPTER_PATHS."""
import re

import pytest
import torch

import lora_kernels as lk
from lora_kernels.reference import adapter as ref_adapter

from conftest import check_against_reference, randn
from test_cuda_backend import _cuda_kernels_run, needs_cuda

# (R, activation, bias): every activation, R = 96 (one 128-column tile, 32 columns masked) and 128.
ADAPTER_CUTLASS = [(96, "gelu", True), (128, "gelu_tanh", False), (96, "relu", False), (128, "silu", True)]


@needs_cuda
@pytest.mark.parametrize("r,activation,bias", ADAPTER_CUTLASS, ids=[f"r{r}-{a}-{'bias' if b else 'no_bias'}"
                                                                    for r, a, b in ADAPTER_CUTLASS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapter_cutlass_forward(dtype, r, activation, bias):
    """The adapter forward where adapter_fused.cu's pass does not apply (R > 64) on the CUTLASS
    kernels: M = 300 (3 row tiles, a residue of 44), K = 264 (a partial k-tile, y's 3 column tiles
    with a residue of 8). Output and gradients (the backward reads the fp32 h the down product's
    epilogue saved) against the float64 reference, and a check that both kernels ran:
    <EpilogueBiasAct<T>, false> (h, T(act(h))) and <EpilogueResidual<T>, false> (y)."""
    m, k = 300, 264
    args = [randn(m, k, requires_grad=True), randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(r, requires_grad=True) if bias else None, randn(k, r, requires_grad=True, scale=r**-0.5),
            randn(k, requires_grad=True) if bias else None]
    with lk.use_backend("cuda"):
        check_against_reference(lambda *a: lk.adapter(*a, activation=activation, scale=0.7),
                                lambda *a: ref_adapter.adapter(*a, activation, 0.7), args, dtype,
                                f"adapter CUTLASS r={r} {activation} bias={bias}")
        low = [a.detach().to(dtype) if a is not None else None for a in args]
        once, again = (lk.adapter(*low, activation=activation, scale=0.7) for _ in range(2))
        names = _cuda_kernels_run(lambda: lk.adapter(*low, activation=activation, scale=0.7))
    assert torch.equal(once, again), "not bitwise reproducible"
    if names is None:
        pytest.skip("the outputs and gradients matched; the profiler recorded no CUDA kernel (no CUPTI), "
                    "so which kernels ran is unknown")
    cutlass = [name for name in names if re.search(r"cutlass_sm(?:80|90)(?:_splitk)?_kernel<", name)]
    assert any("EpilogueBiasAct<" in name for name in cutlass), f"the CUTLASS down product did not run: {names}"
    assert any("EpilogueResidual<" in name for name in cutlass), f"the CUTLASS up product did not run: {names}"


# (M, K, R, activation, bias): every activation at M = 300 (3 row tiles, a residue of 44) with K = 264 (dz's
# partial k-tile; dx's 3 column tiles, a residue of 8) and at M = 4099 (33 row tiles, a residue of 3) with
# K = 1024 (dz in 4 splits), and at M = 37 (one row tile: dz in 4 splits), each at R = 96 (dz's one 128-column
# tile with 32 columns masked; dx's partial second k-tile) and 128.
ADAPTER_BWD_CUTLASS = [(m, k, r, a, b) for (m, k), rs in (((300, 264), (96, 128)), ((4099, 1024), (128, 96)),
                                                            ((37, 1024), (96, 128)))
                       for (a, b), r in zip([("gelu", True), ("gelu_tanh", False), ("relu", True), ("silu", False)],
                                            rs * 2)]
# the bool template argument as demanglers print it: true or (bool)1
_N_MAJOR = r", (?:true|\(bool\)1)>"


@needs_cuda
@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("m,k,r,activation,bias", ADAPTER_BWD_CUTLASS,
                         ids=[f"{m}x{k}-r{r}-{a}-{'bias' if b else 'no_bias'}" for m, k, r, a, b in ADAPTER_BWD_CUTLASS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapter_cutlass_backward(dtype, m, k, r, activation, bias, need_dx):
    """The adapter backward's dz and dx (adapter_bwd_cutlass.cu) where adapter_fused.cu's pass does not
    apply (R > 64): gradients against the float64 reference, with dx asked for or not (x requires grad or
    not); a check that the CUTLASS kernels ran, <EpilogueActGrad<T>, true> (dz) and, only when dx is asked
    for, <EpilogueResidual<T>, true> (dx), and that the tiled GEMMs they replace (DhBwd, DxBwd) did not;
    bitwise reproducible, and the weight gradients do not change when dx is not asked for."""
    args = [randn(m, k, requires_grad=need_dx), randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(r, requires_grad=True) if bias else None, randn(k, r, requires_grad=True, scale=r**-0.5),
            randn(k, requires_grad=True) if bias else None]
    fn = lambda *a: lk.adapter(*a, activation=activation, scale=0.7)  # noqa: E731

    def grads(x_grad):
        leaves = [a.detach().to(dtype).requires_grad_(a.requires_grad) if a is not None else None for a in args]
        leaves[0].requires_grad_(x_grad)
        inputs = [a for a in leaves if a is not None and a.requires_grad]
        return torch.autograd.grad(fn(*leaves), inputs, up)

    with lk.use_backend("cuda"):
        check_against_reference(fn, lambda *a: ref_adapter.adapter(*a, activation, 0.7), args, dtype,
                                f"adapter backward CUTLASS {m}x{k} r={r} {activation} bias={bias} dx={need_dx}")
        up = randn(m, k, dtype=dtype)
        once, again, other = grads(need_dx), grads(need_dx), grads(not need_dx)
        names = _cuda_kernels_run(lambda: grads(need_dx))
    assert all(torch.equal(a, b) for a, b in zip(once, again)), "backward not bitwise reproducible"
    with_dx, without_dx = (once[1:], other) if need_dx else (other[1:], once)  # dx first when asked for
    assert len(with_dx) == len(without_dx) and all(torch.equal(a, b) for a, b in zip(with_dx, without_dx)), \
        "the weight gradients change with dx asked for or not"
    if names is None:
        pytest.skip("the gradients matched; the profiler recorded no CUDA kernel (no CUPTI), so which kernels ran "
                    "is unknown")
    cutlass = [name for name in names if re.search(r"cutlass_sm(?:80|90)(?:_splitk)?_kernel<", name)]
    assert any("EpilogueActGrad<" in name for name in cutlass), f"the CUTLASS dz product did not run: {names}"
    dx_ran = any("EpilogueResidual<" in name and re.search(_N_MAJOR, name) for name in cutlass)
    assert dx_ran == need_dx, f"the CUTLASS dx product {'did not run' if need_dx else 'ran unasked'}: {names}"
    assert not any("DhBwd<" in name or "DxBwd<" in name for name in names), f"a tiled GEMM ran: {names}"
