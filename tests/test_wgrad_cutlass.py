"""With a GPU and the built extension: the weight gradients reduced over the tokens on the CUTLASS
GEMM of csrc/kernels/cutlass_wgrad.cuh (LoRA's dB, db, dA; the adapter's dW_up, db_up, dW_down,
db_down), against the float64 reference, bitwise reproducible, and a profiler check that
wgrad_sm80_kernel (on H100/H200: wgrad_sm90_kernel) ran. M = 37 runs one split (the epilogue writes
the outputs); M = 4101 several (fp32 partials, the in-order finish, a last split with a partial
k-tile). The split arithmetic itself is simulated on the CPU by test_wgrad_split.py."""
import re

import pytest
import torch
from conftest import assert_close, check_against_reference, randn
from test_cuda_backend import _cuda_kernels_run, needs_cuda

import lora_kernels as lk
from lora_kernels.reference import adapter as ref_adapter
from lora_kernels.reference import lora as ref_lora

ROWS = [37, 4096 + 5]
# (R, adapter activation): R = 8 and 16 (one 16-wide r tile; 16 + the ones column: 32), 64 (64-wide)
RANKS = [(8, "gelu"), (16, "silu"), (64, "gelu_tanh")]
WIDTH = 1024  # K = N


def _wgrad_launches(names):
    """Launches of the weight-gradient GEMM: wgrad_sm90_kernel on a capability-9.0 GPU in a build with
    sm_90a code, wgrad_sm80_kernel on other sm_80+ GPUs."""
    return sum(bool(re.search(r"wgrad_sm(?:80|90)_kernel<", name)) for name in names)


def _backward_twice(fn, low):
    """Gradients of two identical backward passes (fresh leaves), for the bitwise check."""
    grads = []
    for _ in range(2):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if a is not None else None for a in low]
        fn(*leaves).sum().backward()
        grads.append([a.grad for a in leaves if a is not None and a.requires_grad])
    return grads


@needs_cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("r", [r for r, _ in RANKS], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"m{m}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_weight_gradients_cutlass(dtype, m, r, dropout):
    """LoRA backward: dB (and db, from the ones column beside u) on the CUTLASS weight-gradient GEMM,
    dA too without dropout; with dropout dA stays on colsum (the mask sits inside its sum). The
    reference has no mask to share, so with dropout only db (= Σ of the upstream gradient, the ones
    column's sum) is checked against float64, and dB for being finite."""
    k = n = WIDTH
    args = [randn(m, k, requires_grad=True), randn(n, k, scale=k**-0.5), randn(n, requires_grad=True),
            randn(r, k, requires_grad=True, scale=k**-0.5), randn(n, r, requires_grad=True, scale=r**-0.5)]
    fn = lambda *a: lk.lora_linear(*a, scaling=0.75, dropout_p=dropout, training=True)
    with lk.use_backend("cuda"):
        if dropout == 0.0:
            check_against_reference(fn, lambda *a: ref_lora.lora_linear(*a, 0.75), args, dtype,
                                    f"lora wgrad m={m} r={r}")
        low = [a.detach().to(dtype).requires_grad_(a.requires_grad) for a in args]
        if dropout:
            leaves = [a.detach().clone().requires_grad_(a.requires_grad) for a in low]
            upstream = randn(m, n).to(dtype)
            fn(*leaves).backward(upstream)
            assert_close(leaves[2].grad, upstream.double().sum(0), dtype, f"lora db with dropout m={m} r={r}")
            assert torch.isfinite(leaves[4].grad).all(), "dB with dropout is not finite"
        once = _backward_twice(fn, low) if dropout == 0.0 else None
        names = _cuda_kernels_run(lambda: fn(*low).sum().backward())
    if once is not None:
        assert all(torch.equal(a, b) for a, b in zip(*once)), "gradients not bitwise reproducible"
    if names is None:
        pytest.skip("the gradients matched; the profiler recorded no CUDA kernel (no CUPTI), so which kernels "
                    "ran is unknown")
    want = 1 if dropout else 2  # dB (+ db), and dA without dropout
    assert _wgrad_launches(names) == want, f"expected {want} wgrad_sm*_kernel launches; kernels: {names}"
    if dropout:
        assert any("colsum_kernel<" in name for name in names), f"dA with dropout left colsum: {names}"


@needs_cuda
@pytest.mark.parametrize("r,activation", RANKS, ids=[f"r{r}-{a}" for r, a in RANKS])
@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"m{m}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapter_weight_gradients_cutlass(dtype, m, r, activation):
    """Adapter backward: dW_up = s·gᵀ act(h) with db_up as its ones column, dW_down = dhᵀ x with db_down
    summed from the fp32 dh, on the CUTLASS weight-gradient GEMM (two launches)."""
    k = WIDTH
    args = [randn(m, k, requires_grad=True), randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(r, requires_grad=True), randn(k, r, requires_grad=True, scale=r**-0.5),
            randn(k, requires_grad=True)]
    fn = lambda *a: lk.adapter(*a, activation=activation, scale=0.7)
    with lk.use_backend("cuda"):
        check_against_reference(fn, lambda *a: ref_adapter.adapter(*a, activation, 0.7), args, dtype,
                                f"adapter wgrad m={m} r={r} {activation}")
        low = [a.detach().to(dtype).requires_grad_(True) for a in args]
        once = _backward_twice(fn, low)
        names = _cuda_kernels_run(lambda: fn(*low).sum().backward())
    assert all(torch.equal(a, b) for a, b in zip(*once)), "gradients not bitwise reproducible"
    if names is None:
        pytest.skip("the gradients matched; the profiler recorded no CUDA kernel (no CUPTI), so which kernels "
                    "ran is unknown")
    assert _wgrad_launches(names) == 2, f"expected 2 wgrad_sm*_kernel launches (dW_up, dW_down); kernels: {names}"


# (M, N, K): M = 4104 (a multiple of 8: CUTLASS; 64 output tiles, 2 splits), 512 at N = K = 256 (4 tiles, 8 k-tiles:
# 2 splits), 37 (not a multiple of 8: lora_gemm.cu's WMMA GEMM keeps it)
DW_SHAPES = [(4104, 1024, 1024), (512, 256, 256), (37, 264, 264)]


@needs_cuda
@pytest.mark.parametrize("m,n,k", DW_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in DW_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_frozen_weight_gradient_cutlass(dtype, m, n, k):
    """dW = gᵀx when the base weight requires grad: a transposed copy of g, then the forward's CUTLASS
    GEMM (B = x N-major) where M, K and x's row stride are multiples of 8, else the WMMA GEMM; all
    gradients against float64, bitwise reproducible, and (profiler) which path ran."""
    r = 16
    args = [randn(m, k, requires_grad=True), randn(n, k, requires_grad=True, scale=k**-0.5), randn(n),
            randn(r, k, requires_grad=True, scale=k**-0.5), randn(n, r, requires_grad=True, scale=r**-0.5)]
    fn = lambda *a: lk.lora_linear(*a, scaling=0.5)  # noqa: E731
    with lk.use_backend("cuda"):
        check_against_reference(fn, lambda *a: ref_lora.lora_linear(*a, 0.5), args, dtype, f"lora dW m={m}")
        low = [a.detach().to(dtype).requires_grad_(a.requires_grad) for a in args]
        once = _backward_twice(fn, low)
        names = _cuda_kernels_run(lambda: fn(*low).sum().backward())
    assert all(torch.equal(a, b) for a, b in zip(*once)), "gradients not bitwise reproducible"
    if names is None:
        pytest.skip("the gradients matched; the profiler recorded no CUDA kernel (no CUPTI), so which kernels "
                    "ran is unknown")
    transposed = any("transpose16_kernel" in name for name in names)
    assert transposed == (m % 8 == 0), f"dW's CUTLASS path {'did not run' if m % 8 == 0 else 'ran'}: {names}"
