"""One large case per op, so that a GPU run reaches the kernels' large-shape paths, which the op
tests' small shapes never do (issue 18). Each shape is chosen from the launch arithmetic of
csrc/kernels/<op>.cu (quoted next to it); the Triton backend runs the same cases.

GPU only: in float64 the references alone need gigabytes, and the interpreter would take hours.
"""
import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import adapter as adapter_op
from lora_kernels.ops import infonce as infonce_op
from lora_kernels.ops import layer_norm as layer_norm_op
from lora_kernels.ops import lora as lora_op
from lora_kernels.reference import adapter as ref_adapter
from lora_kernels.reference import infonce as ref_infonce
from lora_kernels.reference import layer_norm as ref_layer_norm
from lora_kernels.reference import lora as ref_lora

from conftest import DEVICE, backends_for, check_against_reference, randn

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="large-shape paths are checked on a GPU only "
                                "(float64 references of several GB; hours under the Triton interpreter)")

# fp32 takes the CUDA-core paths, bf16 the tensor-core ones.
LARGE_DTYPES = (torch.float32, torch.bfloat16)


def gpu_backends(impls):
    return [name for name in backends_for(impls) if name != "torch"]


@pytest.mark.parametrize("backend", gpu_backends(lora_op.IMPLS))
@pytest.mark.parametrize("dtype", LARGE_DTYPES, ids=str)
def test_lora_large(backend, dtype):
    # lora_gemm.cu: y (fp32; bf16 takes the CUTLASS forward of lora_cutlass.cuh on sm_80+: M >= 128, K
    # and the row strides multiples of 8, 8·9 tiles of 128×128, K = 1000 = 15·64 + 40) and dW get
    # the wide GEMM tiles (ceil(1024/64)·ceil(1056/64) = 272 and
    # ceil(1056/64)·ceil(1000/64) = 272 tiles >= kWideTilesWanted = 264), dx the narrow ones
    # (256 tiles); the colsums of dB, dA and db split M = 1024 into 8 chunks of 128 rows, so
    # colsum_finish_kernel runs. W and b require grad: dW and db are computed too.
    m, k, n, r = 1024, 1000, 1056, 16
    args = [randn(m, k, requires_grad=True), randn(n, k, requires_grad=True, scale=k**-0.5),
            randn(n, requires_grad=True), randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(n, r, requires_grad=True, scale=r**-0.5)]
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.lora_linear(*a, scaling=0.75), lambda *a: ref_lora.lora_linear(*a, 0.75),
                                args, dtype, f"{backend} lora {m}x{k}->{n} r={r}")


@pytest.mark.parametrize("backend", gpu_backends(adapter_op.IMPLS))
@pytest.mark.parametrize("dtype", LARGE_DTYPES, ids=str)
def test_adapter_large(backend, dtype):
    # adapter_bwd.cu bwd_layout: r = 24 > 16 takes the square tiles, ceil(384/64)·ceil(24/64) = 6
    # tiles, so the weight-gradient GEMMs split M = 2048 into S = min(ceil(512/6), 2048/256) = 8
    # row ranges whose partials sum_splits_kernel adds up. The forward, and the backward's dh and dx,
    # are adapter_fused.cu's single passes (RP = 32, BM = 64: 32 row blocks, 384 = 3 chunks of 128
    # columns).
    m, k, r = 2048, 384, 24
    args = [randn(m, k, requires_grad=True), randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(r, requires_grad=True), randn(k, r, requires_grad=True, scale=r**-0.5), randn(k, requires_grad=True)]
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.adapter(*a, activation="gelu_tanh", scale=0.7),
                                lambda *a: ref_adapter.adapter(*a, "gelu_tanh", 0.7), args, dtype,
                                f"{backend} adapter {m}x{k} r={r}")


@pytest.mark.parametrize("backend", gpu_backends(layer_norm_op.IMPLS))
@pytest.mark.parametrize("dtype", LARGE_DTYPES, ids=str)
def test_layer_norm_large(backend, dtype):
    # Many rows: the one-pass backward (norm_common.cuh fused_launch; 257 is odd: scalar, 512
    # threads a row) gives 256 blocks 274 rows each, whose dγ/dβ partials the fixed-order sum adds.
    m, width = 70000, 257
    args = [randn(m, width, requires_grad=True, scale=2.0), randn(width, requires_grad=True),
            randn(width, requires_grad=True)]
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.layer_norm(*a, eps=1e-5), lambda *a: ref_layer_norm.layer_norm(*a, 1e-5),
                                args, dtype, f"{backend} layer_norm {m}x{width}")


@pytest.mark.parametrize("backend", gpu_backends(infonce_op.IMPLS))
@pytest.mark.parametrize("dtype", LARGE_DTYPES, ids=str)
def test_infonce_large(backend, dtype):
    # infonce_*.cu: N = 17000 > 264·64 row blocks, so each forward block owns two row blocks and
    # merges its column partials (the not-first path); d = 320 > 256 gives the fp32 backward two
    # D slabs of 256, each recomputing S, and 16-bit one partial slab of 512 (X resident in the
    # 16-bit forward: D <= 512).
    n, d = 17000, 320
    args = [randn(n, d, requires_grad=True), randn(n, d, requires_grad=True),
            torch.tensor(10.0, dtype=torch.float64, device=DEVICE, requires_grad=True)]
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.infonce(*a, lambda_=0.3, normalize=True),
                                lambda *a: ref_infonce.infonce(*a, 0.3, True), args, dtype,
                                f"{backend} infonce N={n} d={d}")


@pytest.mark.parametrize("backend", gpu_backends(infonce_op.ROWS_IMPLS))
@pytest.mark.parametrize("dtype", LARGE_DTYPES, ids=str)
def test_infonce_rows_large(backend, dtype):
    # The distributed block: 600 local rows against 20000 gathered keys at offset 19000 (the
    # diagonal crosses column tiles away from the row tiles), d = 320: two D slabs (fp32; 16-bit: one of 512).
    m, n, offset, d = 600, 20000, 19000, 320
    args = [randn(m, d, requires_grad=True), randn(n, d, requires_grad=True),
            torch.tensor(10.0 / math.sqrt(d), dtype=torch.float64, device=DEVICE, requires_grad=True)]

    def spec(q, k, c):
        logits = c * q @ k.T
        targets = offset + torch.arange(m, device=q.device)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / n

    with lk.use_backend(backend):
        check_against_reference(lambda *a: infonce_op.infonce_rows(*a, offset, False), spec, args, dtype,
                                f"{backend} infonce_rows m={m} n={n} offset={offset} d={d}")
