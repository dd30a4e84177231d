"""Shared test harness: the device, the backends that can run here, one tolerance table.

Kernel issues add a backend by registering it in ``ops/<op>.py``'s IMPLS: every op test
parametrised with ``backends_for(IMPLS)`` then runs it too, whenever it is runnable here
(triton: a CUDA GPU or TRITON_INTERPRET=1; cuda: lora_kernels._C and a GPU).
"""
import os
import zlib

import pytest
import torch

from lora_kernels import backend

# Kernels fill their outputs with NaN before running, so an unwritten element fails loudly.
os.environ.setdefault("LORA_KERNELS_POISON", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Relative error ‖out − ref‖ / ‖ref‖ against the float64 reference (DESIGN.md).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
TF32_TOLERANCE = 1e-3


def tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def backends_for(impls) -> list:
    """Backend names that implement an op and can run on this machine."""
    return [name for name in ("torch", "triton", "cuda")
            if name in impls and backend.why_unavailable(name) is None]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output holds NaN or Inf"
    denom = ref.norm()
    diff = (out - ref).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def assert_close(out, ref, dtype, what=""):
    err, tol = rel_err(out, ref), tolerance(dtype)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} for {dtype}"


def randn(*shape, dtype=torch.float64, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float64) * scale
    return t.to(dtype).requires_grad_(requires_grad)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws the same random inputs whatever ran before it (no order-dependent flakes).
    LORA_KERNELS_TEST_SEED=n shifts every seed, to search for marginal tolerances."""
    params = getattr(request.node, "callspec", None)
    params = {k: v for k, v in params.params.items() if k != "backend"} if params else {}
    # The backend is left out of the key: every backend of a test case sees the same inputs.
    key = f"{request.node.path.name}::{request.node.originalname}{sorted(params.items(), key=str)}"
    torch.manual_seed(zlib.crc32(key.encode()) + int(os.environ.get("LORA_KERNELS_TEST_SEED", "0")))


@pytest.fixture(autouse=True)
def _fresh_backend_choice():
    """Each test starts from the default backend choice."""
    token, default = backend._chosen.set(None), backend._default
    backend._default = None
    yield
    backend._chosen.reset(token)
    backend._default = default


def _cast(a, dtype):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().to(dtype).requires_grad_(a.requires_grad)
    return a


def check_against_reference(fn, ref_fn, args, dtype, what="", cast=None, grad_tol=None):
    """Run ``fn`` on ``args`` cast to ``dtype`` and ``ref_fn`` on the same values upcast to
    float64; compare the output and the gradient of every input that requires grad.

    ``cast(i, arg, dtype)`` may override the cast of argument ``i`` (e.g. keep logit_scale fp32);
    ``grad_tol`` overrides the gradients' tolerance where the problem itself is ill-conditioned.
    Returns (low-precision args, reference args) for further checks.
    """
    low = [cast(i, a, dtype) if cast else _cast(a, dtype) for i, a in enumerate(args)]
    ref = [_cast(a, torch.float64) for a in low]
    out, expected = fn(*low), ref_fn(*ref)
    assert out.dtype in (dtype, torch.float32), f"{what}: output dtype {out.dtype} for {dtype} inputs"
    assert_close(out, expected, dtype, f"{what} output")
    # Both sides get the same (rounded) upstream gradient: otherwise its rounding error,
    # amplified by cancellation in short sums, would be charged to the kernel.
    grad = torch.randn(expected.shape, dtype=torch.float64, device=expected.device).to(out.dtype)
    out.backward(grad)
    expected.backward(grad.double())
    for i, (a, r) in enumerate(zip(low, ref)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert a.grad is not None, f"{what}: argument {i} got no gradient"
            assert a.grad.dtype == a.dtype, f"{what}: grad of argument {i} is {a.grad.dtype}, not {a.dtype}"
            if grad_tol is None:
                assert_close(a.grad, r.grad, dtype, f"{what} grad of argument {i}")
            else:
                err = rel_err(a.grad, r.grad)
                assert err <= grad_tol, f"{what} grad of argument {i}: relative error {err:.3e} > {grad_tol:.0e}"
    return low, ref
