"""Shared test harness: the device, the backends that can run here, one tolerance table.

Kernel issues add a backend by registering it in ``ops/<op>.py``'s IMPLS: every op test
parametrised with ``backends_for(IMPLS)`` then runs it too, whenever it is runnable here
(triton: a CUDA GPU or TRITON_INTERPRET=1; cuda: lora_kernels._C and a GPU).
"""
import pytest
import torch

from lora_kernels import backend

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


def randn(*shape, dtype=torch.float32, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float64) * scale
    return t.to(dtype).requires_grad_(requires_grad)


@pytest.fixture(autouse=True)
def _fresh_backend_choice():
    """Each test starts from the default backend choice."""
    token = backend._chosen.set(None)
    yield
    backend._chosen.reset(token)
