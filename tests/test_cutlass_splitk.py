"""With a GPU and the built extension: split-K of the CUTLASS GEMMs at small M
(csrc/kernels/splitk_rule.h, cutlass_splitk.cuh). The rule itself and the k-ranges are checked
without a GPU in test_splitk_rule.py; here the kernels run: output and gradients against the
float64 reference, bitwise reproducibility, and (torch.profiler) that the split kernel and the
finish kernel ran with the expected epilogue."""
import re

import pytest
import torch

import lora_kernels as lk
from lora_kernels.reference import adapter as ref_adapter
from lora_kernels.reference import lora as ref_lora

from conftest import check_against_reference, randn
from test_cuda_backend import _cuda_kernels_run, needs_cuda
from test_splitk_rule import split_count

SPLIT = r"cutlass_sm(?:80|90)_splitk_kernel<"
FINISH = r"splitk_finish_kernel<"


def _ran(names, kernel, epilogue, bmn=None):
    """Whether a kernel matching `kernel` with `epilogue` (and the B-operand flag bmn) ran."""
    flag = "" if bmn is None else (r", (?:true|\(bool\)1)>" if bmn else r", (?:false|\(bool\)0)>")
    return any(re.search(kernel, n) and epilogue in n and (not flag or re.search(flag, n)) for n in names)


@needs_cuda
@pytest.mark.parametrize("size", [1024, 4096])
@pytest.mark.parametrize("m", [1, 37, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_splitk(dtype, m, size):
    """LoRA forward (x W0ᵀ + b + s·(x Aᵀ) Bᵀ) and dx (g W0 + s·(g B) A) with N = K = size at small M:
    both GEMMs split (4 splits at these shapes), r = 12 (padded to 16) in the last split."""
    n = k = size
    r = 12
    assert split_count(m, n, k) > 1 and split_count(m, k, n) > 1
    args = [randn(m, k, requires_grad=True), randn(n, k, scale=k**-0.5), randn(n),
            randn(r, k, requires_grad=True, scale=k**-0.5), randn(n, r, requires_grad=True, scale=r**-0.5)]
    with lk.use_backend("cuda"):
        check_against_reference(lambda *a: lk.lora_linear(*a, scaling=0.75),
                                lambda *a: ref_lora.lora_linear(*a, 0.75), args, dtype, f"lora split-K M={m}")
        low = [a.detach().to(dtype).requires_grad_(a.requires_grad) for a in args]
        once, again = (lk.lora_linear(*low, scaling=0.75) for _ in range(2))
        assert torch.equal(once, again), "not bitwise reproducible"
        names = _cuda_kernels_run(lambda: lk.lora_linear(*low, scaling=0.75).sum().backward())
    if names is None:
        pytest.skip("the outputs and gradients matched; the profiler recorded no CUDA kernel (no CUPTI), "
                    "so which kernels ran is unknown")
    assert _ran(names, SPLIT, "EpilogueBias<", bmn=False), f"the split-K LoRA forward did not run: {names}"
    assert _ran(names, SPLIT, "EpilogueBias<", bmn=True), f"the split-K LoRA dx did not run: {names}"
    assert _ran(names, FINISH, "EpilogueBias<"), f"the split-K finish kernel did not run: {names}"


# (M, K, R): R > 64 keeps adapter_fused.cu's single pass off. The down product ([M, R], reduced
# over K) splits; the up product ([M, K], reduced over R) splits only where R has enough k-tiles.
ADAPTER_SPLITK = [(m, k, 128) for m in (1, 37, 100) for k in (1024, 4096)] + [(37, 1024, 512), (100, 1024, 512)]


@needs_cuda
@pytest.mark.parametrize("m,k,r", ADAPTER_SPLITK, ids=[f"{m}x{k}-r{r}" for m, k, r in ADAPTER_SPLITK])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapter_splitk(dtype, m, k, r):
    """Adapter forward at small M on the CUTLASS kernels: the down product split (EpilogueBiasAct
    in the finish kernel), and with R = 512 the up product too (EpilogueResidual)."""
    up_splits = split_count(m, k, r) > 1
    assert split_count(m, r, k) > 1
    args = [randn(m, k, requires_grad=True), randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(r, requires_grad=True), randn(k, r, requires_grad=True, scale=r**-0.5),
            randn(k, requires_grad=True)]
    with lk.use_backend("cuda"):
        check_against_reference(lambda *a: lk.adapter(*a, activation="gelu", scale=0.7),
                                lambda *a: ref_adapter.adapter(*a, "gelu", 0.7), args, dtype,
                                f"adapter split-K M={m} K={k} R={r}")
        low = [a.detach().to(dtype) for a in args]
        once, again = (lk.adapter(*low, activation="gelu", scale=0.7) for _ in range(2))
        assert torch.equal(once, again), "not bitwise reproducible"
        names = _cuda_kernels_run(lambda: lk.adapter(*low, activation="gelu", scale=0.7))
    if names is None:
        pytest.skip("the outputs and gradients matched; the profiler recorded no CUDA kernel (no CUPTI), "
                    "so which kernels ran is unknown")
    assert _ran(names, SPLIT, "EpilogueBiasAct<"), f"the split-K down product did not run: {names}"
    assert _ran(names, FINISH, "EpilogueBiasAct<"), f"the down product's finish kernel did not run: {names}"
    if up_splits:
        assert _ran(names, SPLIT, "EpilogueResidual<"), f"the split-K up product did not run: {names}"
        assert _ran(names, FINISH, "EpilogueResidual<"), f"the up product's finish kernel did not run: {names}"
    else:
        assert _ran(names, r"cutlass_sm(?:80|90)_kernel<", "EpilogueResidual<"), \
            f"the one-split up product did not run: {names}"
