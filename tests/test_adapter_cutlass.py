"""With a GPU and the built extension: the 16-bit adapter forward on LoRA's CUTLASS kernels
(csrc/kernels/adapter_cutlass.cu), where adapter_fused.cu's single pass does not apply (R > 64)
and M >= 128, K and R are multiples of 8. Which path other shapes take: test_cuda_backend.py's
ADAPTER_PATHS."""
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
    cutlass = [name for name in names if re.search(r"cutlass_sm(?:80|90)_kernel<", name)]
    assert any("EpilogueBiasAct<" in name for name in cutlass), f"the CUTLASS down product did not run: {names}"
    assert any("EpilogueResidual<" in name for name in cutlass), f"the CUTLASS up product did not run: {names}"
