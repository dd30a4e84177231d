"""LoRA linear as a custom op: forward and backward are separate ops, each dispatched to a backend."""
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..reference import compute_dtype
from ..reference import lora as ref
from . import _autocast, _direct, _validate as check

IMPLS = {"torch": backend.Impl(ref.forward, ref.backward)}
IMPLS["triton"] = backend.lazy_impl("lora_kernels.triton.lora")
IMPLS["cuda"] = backend.lazy_impl("lora_kernels.cuda.lora")


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    impl = backend.select("lora_linear", IMPLS, x)
    return impl.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, int(seed))


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                    lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    m = x.shape[0]
    return x.new_empty(m, weight.shape[0]), x.new_empty(m, lora_A.shape[0], dtype=compute_dtype(x.dtype))


def _backward_impl(g, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, need_dW, need_db):
    impl = backend.select("lora_linear", IMPLS, x)
    return impl.backward(g.contiguous(), x, weight, lora_A, lora_B, u, scaling, dropout_p, int(seed),
                         need_dx, need_dW, need_db)


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(g: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
                    scaling: float, dropout_p: float, seed: Tensor, need_dx: bool, need_dW: bool,
                    need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(g, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, need_dW, need_db)


@lora_linear_bwd.register_fake
def _(g, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, need_dW, need_db):
    empty = lambda: x.new_empty(0)  # noqa: E731  (fresh each: outputs must not alias)
    return (x.new_empty(x.shape) if need_dx else empty(), torch.empty_like(lora_A), torch.empty_like(lora_B),
            weight.new_empty(weight.shape) if need_dW else empty(),
            weight.new_empty(weight.shape[0]) if need_db else empty())


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend.get_backend()


def _backward(ctx, gy, _gu):
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    need_dx, need_dW, need_db = (check.needs(ctx, i) for i in (0, 1, 2))
    args = (gy, x, weight, lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, seed, need_dx, need_dW, need_db)
    dx, dA, dB, dW, db = _direct.backward(ctx, lora_linear_bwd, _backward_impl, args, n_tensors=6)
    return (check.grad_or_none(dx, need_dx), check.grad_or_none(dW, need_dW), check.grad_or_none(db, need_db),
            dA, dB, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup)
_FUNCTION = _direct.autograd_function("LoRALinearFunction", _forward, _setup, _backward)


def _seed(dropout_p: float) -> Tensor:
    """A CPU int64 seed drawn from torch's generator, so torch.manual_seed reproduces masks.
    Without dropout, one shared zero made outside inference_mode (a tensor born under
    inference_mode could not be saved for backward later), sparing a torch.zeros a call."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    return _NO_SEED


with torch.inference_mode(False):  # a normal tensor even if lora_kernels is imported under inference_mode
    _NO_SEED = torch.zeros((), dtype=torch.int64)  # never written: shared by every call without dropout


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True):
    """y = x Wᵀ + b + scaling·(drop(x) Aᵀ) Bᵀ for x of shape [..., K].

    weight: [N, K] (frozen base), bias: [N] or None, lora_A: [r, K], lora_B: [N, r].
    Dropout (on the LoRA path only) is active when ``training`` and ``dropout_p > 0``.
    Under autocast every tensor is cast to the autocast dtype first, as ``F.linear`` would be.
    """
    x, weight, bias, lora_A, lora_B = _autocast.like_matmul(x, weight, bias, lora_A, lora_B)
    k, n, r = check.lora_shapes(x, weight, bias, lora_A, lora_B)
    check.same_device_and_dtype(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    scaling = check.finite_float("scaling", scaling)
    p = check.probability("dropout_p", dropout_p)
    p = p if training else 0.0
    args = (check.rows(x, k), weight, bias, lora_A, lora_B, scaling, p, _seed(p))
    y, _ = _direct.run(lora_linear_fwd, _forward, _FUNCTION, args, n_tensors=5)
    return y if x.ndim == 2 else y.reshape(*x.shape[:-1], n)
