"""With a GPU and the built extension: the 16-bit InfoNCE tiles on CuTe tensor-core MMAs
(csrc/kernels/infonce_mma.cuh) at their boundaries, against the float64 reference. The op tests
and test_cuda_backend.py / test_large_shapes.py cover the common shapes; these add the edges of
the new code: D around the resident-X threshold (512: all of X's row block in shared memory
at or below, two streamed stages above), D not a multiple of 8 (plain stores instead of
cp.async), N not a multiple of the 64-row tile, the backward's slab widths (256 for D <= 256,
else 512: D = 264 one partial slab, 520 a second one 8 wide), and N past 264·64 rows with X
streamed (each forward block merges column partials over two row blocks)."""
import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import infonce as infonce_op
from lora_kernels.reference import infonce as ref_infonce

from conftest import DEVICE, check_against_reference, randn
from test_cuda_backend import _cuda_kernels_run, needs_cuda

HALF = [torch.float16, torch.bfloat16]
# (N, D, normalize): D = 504 and 512 resident (8 chunks of 64, the last partial at 504), 520
# streamed (a partial 9th chunk; two 512-wide backward slabs, the second 8 wide); 129 unaligned
# rows (plain stores, a partial chunk, one 256-wide slab); 264 one partial 512-wide slab; 256 the
# largest D with X resident in the backward too (4 chunks), 129 also resident there.
# N = 70, 100, 130, 300: partial row and column tiles.
BOUNDARIES = [(100, 504, True), (300, 512, False), (100, 520, True), (70, 129, False), (300, 264, True),
              (130, 256, False)]


def _args(n, d, normalize):
    scale = 10.0 if normalize else 10.0 / math.sqrt(d)
    return [randn(n, d, requires_grad=True), randn(n, d, requires_grad=True),
            torch.tensor(scale, dtype=torch.float64, device=DEVICE, requires_grad=True)]


@needs_cuda
@pytest.mark.parametrize("n,d,normalize", BOUNDARIES, ids=[f"n{n}-d{d}-{'norm' if z else 'raw'}"
                                                           for n, d, z in BOUNDARIES])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_infonce_mma_boundaries(dtype, n, d, normalize):
    """Loss and all three gradients against the float64 reference, bitwise reproducible, and the
    16-bit tile kernels (fwd_kernel, grad_kernel) ran."""
    args = _args(n, d, normalize)
    with lk.use_backend("cuda"):
        low, _ = check_against_reference(lambda *a: lk.infonce(*a, lambda_=0.3, normalize=normalize),
                                         lambda *a: ref_infonce.infonce(*a, 0.3, normalize), args, dtype,
                                         f"infonce N={n} D={d} normalize={normalize}")
        low = [a.detach().requires_grad_() for a in low]

        def step():
            loss = lk.infonce(*low, lambda_=0.3, normalize=normalize)
            return (loss, *torch.autograd.grad(loss, low))

        once, again = step(), step()
        names = _cuda_kernels_run(step)
    for a, b in zip(once, again):
        assert torch.equal(a, b), "not bitwise reproducible"
    if names is None:
        pytest.skip("results matched; the profiler recorded no CUDA kernel (no CUPTI), so which kernels ran is unknown")
    elem = "__half" if dtype == torch.float16 else "__nv_bfloat16"
    # D > 256: slabs of 512 (half the S recomputes of 256-wide ones).
    for kernel in (f"fwd_kernel<{elem}>", f"grad_kernel<{elem}, {512 if d > 256 else 256}>"):
        assert any(f"infonce_detail::{kernel}" in name for name in names), f"{kernel} did not run: {names}"


@needs_cuda
@pytest.mark.parametrize("d", [512, 520], ids=["resident", "streamed"])
def test_infonce_rows_mma(d):
    """The rows op (distributed block) shares fwd_kernel: 200 queries against 700 keys at offset
    450 (the diagonal crosses column tiles), on both sides of the resident-X threshold."""
    m, n, offset = 200, 700, 450
    args = [randn(m, d, requires_grad=True), randn(n, d, requires_grad=True),
            torch.tensor(10.0 / math.sqrt(d), dtype=torch.float64, device=DEVICE, requires_grad=True)]

    def spec(q, k, c):
        logits = c * q @ k.T
        targets = offset + torch.arange(m, device=q.device)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / n

    with lk.use_backend("cuda"):
        check_against_reference(lambda *a: infonce_op.infonce_rows(*a, offset, False), spec, args, torch.float16,
                                f"infonce_rows m={m} n={n} offset={offset} d={d}")


@needs_cuda
def test_infonce_mma_large_streamed():
    """N = 17000 > 264·64: forward blocks own two row blocks and merge their column partials; D =
    520 streams X (test_large_shapes.py's D = 320 keeps it resident) and gives 2 backward slabs."""
    n, d = 17000, 520
    args = _args(n, d, True)
    with lk.use_backend("cuda"):
        check_against_reference(lambda *a: lk.infonce(*a, lambda_=0.3, normalize=True),
                                lambda *a: ref_infonce.infonce(*a, 0.3, True), args, torch.float16,
                                f"infonce N={n} D={d}")
