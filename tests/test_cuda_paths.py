"""With a GPU and the built extension: which path each CUDA launcher takes at shapes chosen to reach
every one (the one-pass norm backward and its fallbacks, the single-pass adapter and its GEMMs or
CUTLASS, the LoRA forward's CUTLASS / one-launch / split paths), each against the float64
reference and bitwise reproducible. Moved out of test_cuda_backend.py, which keeps the wiring
tests and the shared helpers (needs_cuda, _cuda_kernels_run)."""
import re

import pytest
import torch

import lora_kernels as lk
from lora_kernels.reference import adapter as ref_adapter

from conftest import randn, rel_err, tolerance
from test_cuda_backend import _cuda_kernels_run, needs_cuda


# ---- with a GPU: the one-pass norm backward (dx and the dγ/dβ partials from one read of g, x) ----

# (dtype, M, N) -> the path csrc/kernels/norm_common.cuh's fused_launch picks (V = 16 / element
# size on the aligned path, 1 when N % V != 0; packs per thread p; tx threads per row, ty rows):
NORM_PATHS = [
    (torch.float32, 5000, 64, "one pass, V=4 p=1 tx=32 ty=8: 313 blocks of 16 rows, lanes added in smem"),
    (torch.bfloat16, 37, 129, "one pass, scalar p=1 tx=256 ty=1"),
    (torch.float16, 1, 37, "one pass, scalar p=1 tx=64 ty=4, one row"),
    (torch.float32, 300, 3000, "one pass, V=4 p=2 tx=512"),
    (torch.float32, 300, 6000, "one pass, V=4 p=4 tx=512"),
    (torch.bfloat16, 300, 777, "one pass, scalar p=2 tx=512"),
    (torch.float16, 300, 1999, "one pass, scalar p=4 tx=512"),
    (torch.bfloat16, 3000, 8192, "one pass, V=8 p=2 tx=512: 188 blocks of 16 rows"),
    (torch.float32, 300, 8196, "two passes + column-tiled partials: 2049 vectors > 512·4"),
    (torch.bfloat16, 300, 8200, "two passes + column-tiled partials: 1025 vectors > 512·2"),
    (torch.float64, 300, 2049, "two passes + column-tiled partials: scalar, 2049 > 512·4"),
]
# (need_dx, need_dw, need_db): all; dx alone (no partials); partials alone (column-tiled kernel);
# one of dγ/dβ with dx (the other partial pointer null).
NORM_GRADS = [(True, True, True), (True, False, False), (False, True, True), (True, True, False), (True, False, True)]


def _norm_case(dtype, m, n):
    x = randn(m, n, dtype=dtype, scale=2.0) + 3.0
    return x, randn(n, dtype=dtype), randn(n, dtype=dtype), randn(m, n, dtype=dtype)


def _check_norm_grads(got, want, dtype, needs, what):
    for name, need, a, b in zip(("dx", "dw", "db"), needs, got, want):
        if need:
            assert a.dtype == dtype, f"{what} {name}: {a.dtype}"
            err = rel_err(a, b)
            assert err <= tolerance(dtype), f"{what} {name}: relative error {err:.2e} > {tolerance(dtype):.0e}"
        else:
            assert a.numel() == 0, f"{what} {name} was not asked for, got shape {tuple(a.shape)}"


@needs_cuda
@pytest.mark.parametrize("needs", NORM_GRADS, ids=str)
@pytest.mark.parametrize("dtype,m,n,path", NORM_PATHS, ids=[f"{d}-{m}x{n}" for d, m, n, _ in NORM_PATHS])
def test_layer_norm_backward_paths(dtype, m, n, path, needs):
    from lora_kernels.reference.layer_norm import layer_norm as spec
    lib = torch.ops.lora_kernels
    x, w, b, g = _norm_case(dtype, m, n)
    _, mean, rstd = lib.layer_norm_fwd_cuda(x, w, b, 1e-5)
    got = lib.layer_norm_bwd_cuda(g, x, w, mean, rstd, *needs)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(spec(*leaves, 1e-5), leaves, g.double())
    _check_norm_grads(got, want, dtype, needs, f"layer_norm {m}x{n} {dtype} ({path})")
    again = lib.layer_norm_bwd_cuda(g, x, w, mean, rstd, *needs)
    assert all(torch.equal(a, c) for a, c in zip(got, again)), f"{path}: not bitwise reproducible"


@needs_cuda
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("dtype,m,n,path", NORM_PATHS, ids=[f"{d}-{m}x{n}" for d, m, n, _ in NORM_PATHS])
def test_rms_norm_backward_paths(dtype, m, n, path, needs):
    from lora_kernels.reference.rms_norm import rms_norm as spec
    lib = torch.ops.lora_kernels
    x, w, _, g = _norm_case(dtype, m, n)
    offset = 1.0  # Gemma's: s = 1 + γ, so a wrong offset in the one-pass kernel shows
    _, rstd = lib.rms_norm_fwd_cuda(x, w, 1e-6, offset, True)
    got = lib.rms_norm_bwd_cuda(g, x, w, rstd, offset, *needs)
    leaves = [t.double().requires_grad_() for t in (x, w)]
    want = torch.autograd.grad(spec(*leaves, 1e-6, offset), leaves, g.double())
    _check_norm_grads(got, want, dtype, needs, f"rms_norm {m}x{n} {dtype} ({path})")
    again = lib.rms_norm_bwd_cuda(g, x, w, rstd, offset, *needs)
    assert all(torch.equal(a, c) for a, c in zip(got, again)), f"{path}: not bitwise reproducible"


# ---- with a GPU: the single-pass adapter forward and backward (adapter_fused.cu), their fallback ----

# (dtype, M, K, R, activation, path by adapter_fused.cu's launch arithmetic: layout() and
# pick_rows(), with 227 KB of shared memory per block on H100/H200, 163 KB on A100). The backward
# reads the h the forward saved, so the gradients check h too; its dh and dx take the same path
# (one pass on the g tile, or the DhBwd and DxBwd GEMMs).
ADAPTER_PATHS = [
    (torch.bfloat16, 37, 129, 3, "gelu", "one pass, RP=16 BM=64 (70 KB smem) WMMA, scalar x loads (129 % 8)"),
    (torch.float16, 1, 256, 16, "silu", "one pass, RP=16 WMMA, 16-byte x loads, one row; BM=64 (84 KB) on H100, 16 on A100"),
    (torch.float32, 100, 256, 24, "gelu_tanh", "one pass, RP=32 BM=64 (129 KB) CUDA cores"),
    (torch.bfloat16, 300, 768, 64, "relu", "one pass, RP=64 WMMA; BM=64 (184 KB) on H100, 16 on A100"),
    (torch.float64, 50, 200, 40, "gelu", "one pass, RP=64 BM=16 CUDA cores (64 rows: 282 KB)"),
    (torch.bfloat16, 64, 1600, 8, "gelu", "one pass, RP=16 BM=16 (64 rows: 252 KB)"),
    (torch.bfloat16, 40, 8192, 8, "silu", "two GEMMs: even a 16-row x tile takes 278 KB"),
    (torch.float32, 40, 96, 65, "gelu", "two GEMMs: R = 65 > 64"),
    (torch.bfloat16, 300, 264, 96, "gelu_tanh", "CUTLASS: R = 96 > 64, 16-bit, K and R % 8 == 0"),
    (torch.float16, 127, 264, 96, "silu", "CUTLASS at M = 127 < 128 (one split: 5 k-tiles)"),
    (torch.float16, 300, 264, 100, "relu", "two GEMMs: R = 100 not a multiple of 8"),
]


@needs_cuda
@pytest.mark.parametrize("dtype,m,k,r,activation,path", ADAPTER_PATHS,
                         ids=[f"{d}-{m}x{k}-r{r}" for d, m, k, r, *_ in ADAPTER_PATHS])
def test_adapter_fused_paths(dtype, m, k, r, activation, path):
    from conftest import check_against_reference
    args = [randn(m, k, requires_grad=True), randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(r, requires_grad=True), randn(k, r, requires_grad=True, scale=r**-0.5), randn(k, requires_grad=True)]
    with lk.use_backend("cuda"):
        check_against_reference(lambda *a: lk.adapter(*a, activation=activation, scale=0.7),
                                lambda *a: ref_adapter.adapter(*a, activation, 0.7), args, dtype,
                                f"adapter {m}x{k} r={r} {activation} ({path})")
        x = randn(m, k, dtype=dtype)
        w = [a.detach().to(dtype) for a in args[1:]]
        once, again = (lk.adapter(x, *w, activation=activation, scale=0.7) for _ in range(2))
        # Backward twice with dx, once without (the fused pass then skips its dx phase).
        up, grads = randn(m, k, dtype=dtype), []
        for need_dx in (True, True, False):
            xi, wi = x.clone().requires_grad_(need_dx), [a.clone().requires_grad_(True) for a in w]
            lk.adapter(xi, *wi, activation=activation, scale=0.7).backward(up)
            grads.append([a.grad for a in wi] + ([xi.grad] if need_dx else []))
    assert torch.equal(once, again), f"{path}: not bitwise reproducible"
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1])), f"{path}: backward not bitwise reproducible"
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[2])), \
        f"{path}: the weight gradients change when dx is not asked for"


# ---- with a GPU: the LoRA forward's paths: CUTLASS (lora_cutlass.cuh), one launch (lora_fused.cu), lora.cu ----

# (dtype, M, K, N, R, path). CUTLASS first (16-bit, no dropout, K, ldx, ldw multiples of 8,
# sm_80+, split-K where there are few tiles: splitk_rule.h; the backward's dx too where N is a
# multiple of 8); then lora_fwd_fused's rule
# (16-bit, no dropout, >= 264 64×64 tiles, R <= 16 or a single column tile); else two launches.
# An odd K keeps a case off CUTLASS. The backward reads the u the forward saved. With dropout
# lora.cu always takes two launches (the op tests cover it).
LORA_PATHS = [
    (torch.bfloat16, 300, 264, 520, 16, "CUTLASS fwd and dx: 3·5 128×128 tiles, residues in M, N and K"),
    (torch.float16, 1000, 1000, 130, 5, "CUTLASS fwd (r = 5 padded to 16, N = 130 = 128 + 2); dx: lora.cu"),
    (torch.bfloat16, 1100, 129, 1000, 16, "one launch, RP=16: 18·16 = 288 tiles"),
    (torch.float16, 17000, 73, 60, 40, "one launch, RP=64: 266 row tiles, one column tile"),
    (torch.bfloat16, 17000, 41, 64, 24, "one launch, RP=32: one column tile"),
    (torch.float16, 1100, 129, 1000, 24, "two launches: R > 16 and 16 column tiles"),
    (torch.bfloat16, 300, 129, 1000, 16, "two launches: 5·16 = 80 tiles < 264"),
    (torch.bfloat16, 127, 264, 520, 16, "CUTLASS fwd (one split: 5 k-tiles) and dx (2 splits), M < 128"),
    (torch.float32, 1100, 129, 1000, 16, "two launches: fp32"),
]


@needs_cuda
@pytest.mark.parametrize("dtype,m,k,n,r,path", LORA_PATHS,
                         ids=[f"{d}-{m}x{k}-{n}-r{r}" for d, m, k, n, r, _ in LORA_PATHS])
def test_lora_forward_paths(dtype, m, k, n, r, path):
    from conftest import check_against_reference
    from lora_kernels.reference import lora as ref_lora
    args = [randn(m, k, requires_grad=True), randn(n, k, scale=k**-0.5), randn(n),
            randn(r, k, requires_grad=True, scale=k**-0.5), randn(n, r, requires_grad=True, scale=r**-0.5)]
    with lk.use_backend("cuda"):
        check_against_reference(lambda *a: lk.lora_linear(*a, scaling=0.75),
                                lambda *a: ref_lora.lora_linear(*a, 0.75), args, dtype, f"lora ({path})")
        low = [a.detach().to(dtype) for a in args]
        once, again = (lk.lora_linear(*low, scaling=0.75) for _ in range(2))
    assert torch.equal(once, again), f"{path}: not bitwise reproducible"


@needs_cuda
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_cutlass_forward(dtype, bias):
    """The CUTLASS forward and dx at an odd shape (residues in M, N, K; r = 12 padded to 16), with
    and without bias, and a check that the CUTLASS kernels ran (cutlass_sm90_kernel on a
    capability-9.0 GPU in a build with sm_90a, cutlass_sm80_kernel on other sm_80+ GPUs) with LoRA's
    epilogue: <EpilogueBias<T>, false> for the forward, <EpilogueBias<T>, true> (W0 and A read
    N-major) for dx."""
    from conftest import check_against_reference
    from lora_kernels.reference import lora as ref_lora
    m, k, n, r = 300, 264, 520, 12
    args = [randn(m, k, requires_grad=True), randn(n, k, scale=k**-0.5), randn(n) if bias else None,
            randn(r, k, requires_grad=True, scale=k**-0.5), randn(n, r, requires_grad=True, scale=r**-0.5)]
    with lk.use_backend("cuda"):
        check_against_reference(lambda *a: lk.lora_linear(*a, scaling=0.75),
                                lambda *a: ref_lora.lora_linear(*a, 0.75), args, dtype, f"lora CUTLASS bias={bias}")
        low = [a.detach().to(dtype).requires_grad_(a.requires_grad) if a is not None else None for a in args]
        names = _cuda_kernels_run(lambda: lk.lora_linear(*low, scaling=0.75).sum().backward())
    if names is None:
        pytest.skip("the outputs and gradients matched; the profiler recorded no CUDA kernel (no CUPTI), "
                    "so which kernels ran is unknown")
    # dx here runs split-K (2 splits: 9 k-tiles of N = 520 over 3·3 tiles; splitk_rule.h)
    cutlass = [name for name in names
               if re.search(r"cutlass_sm(?:80|90)(?:_splitk)?_kernel<", name) and "EpilogueBias<" in name]
    # the bool template argument as demanglers print it: false/true or (bool)0/(bool)1
    assert any(re.search(r", (?:false|\(bool\)0)>", name) for name in cutlass), \
        f"the CUTLASS LoRA forward did not run; kernels: {names}"
    assert any(re.search(r", (?:true|\(bool\)1)>", name) for name in cutlass), \
        f"the CUTLASS LoRA dx did not run; kernels: {names}"
