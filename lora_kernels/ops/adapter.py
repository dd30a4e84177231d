"""Bottleneck adapter as a custom op: forward and backward are separate ops, each dispatched to a backend."""
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..reference import adapter as ref
from ..reference import compute_dtype
from . import _autocast, _direct, _validate as check

IMPLS = {"torch": backend.Impl(ref.forward, ref.backward)}
IMPLS["triton"] = backend.lazy_impl("lora_kernels.triton.adapter")
IMPLS["cuda"] = backend.lazy_impl("lora_kernels.cuda.adapter")


def _forward(x, w_down, b_down, w_up, b_up, activation, scale):
    impl = backend.select("adapter", IMPLS, x)
    return impl.forward(x, w_down, b_down, w_up, b_up, activation, scale)


@torch.library.custom_op("lora_kernels::adapter_fwd", mutates_args=())
def adapter_fwd(x: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                activation: str, scale: float) -> tuple[Tensor, Tensor]:
    return _forward(x, w_down, b_down, w_up, b_up, activation, scale)


@adapter_fwd.register_fake
def _(x, w_down, b_down, w_up, b_up, activation, scale):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], w_down.shape[0], dtype=compute_dtype(x.dtype))


def _backward_impl(g, x, w_down, w_up, h, activation, scale, need_dx, need_dbd, need_dbu):
    impl = backend.select("adapter", IMPLS, x)
    return impl.backward(g.contiguous(), x, w_down, w_up, h, activation, scale, need_dx, need_dbd, need_dbu)


@torch.library.custom_op("lora_kernels::adapter_bwd", mutates_args=())
def adapter_bwd(g: Tensor, x: Tensor, w_down: Tensor, w_up: Tensor, h: Tensor, activation: str, scale: float,
                need_dx: bool, need_dbd: bool, need_dbu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(g, x, w_down, w_up, h, activation, scale, need_dx, need_dbd, need_dbu)


@adapter_bwd.register_fake
def _(g, x, w_down, w_up, h, activation, scale, need_dx, need_dbd, need_dbu):
    empty = lambda: x.new_empty(0)  # noqa: E731  (fresh each: outputs must not alias)
    return (x.new_empty(x.shape) if need_dx else empty(), w_down.new_empty(w_down.shape),
            w_down.new_empty(w_down.shape[0]) if need_dbd else empty(), w_up.new_empty(w_up.shape),
            w_up.new_empty(w_up.shape[0]) if need_dbu else empty())


def _setup(ctx, inputs, output):
    x, w_down, _b_down, w_up, _b_up, activation, scale = inputs
    ctx.save_for_backward(x, w_down, w_up, output[1])
    ctx.activation, ctx.scale, ctx.backend = activation, scale, backend.get_backend()


def _backward(ctx, gy, _gh):
    x, w_down, w_up, h = ctx.saved_tensors
    need_dx, need_dbd, need_dbu = (check.needs(ctx, i) for i in (0, 2, 4))
    args = (gy, x, w_down, w_up, h, ctx.activation, ctx.scale, need_dx, need_dbd, need_dbu)
    dx, dwd, dbd, dwu, dbu = _direct.backward(ctx, adapter_bwd, _backward_impl, args, n_tensors=5)
    return (check.grad_or_none(dx, need_dx), dwd, check.grad_or_none(dbd, need_dbd), dwu,
            check.grad_or_none(dbu, need_dbu), None, None)


adapter_fwd.register_autograd(_backward, setup_context=_setup)
_FUNCTION = _direct.autograd_function("AdapterFunction", _forward, _setup, _backward)


def adapter(x, w_down, b_down, w_up, b_up, activation="gelu", scale=1.0):
    """y = x + scale·(act(x W_dᵀ + b_d) W_uᵀ + b_u) for x of shape [..., K].

    w_down: [r, K], b_down: [r] or None, w_up: [K, r], b_up: [K] or None,
    activation: "gelu" (erf) | "gelu_tanh" | "relu" | "silu".
    Under autocast the weights are cast to x's dtype (the output keeps x's dtype, as eager's does).
    """
    w_down, b_down, w_up, b_up = _autocast.like_input(x, w_down, b_down, w_up, b_up)
    check.tensor("x", x, min_ndim=1)
    check.tensor("w_down", w_down, ndim=2)
    check.tensor("w_up", w_up, ndim=2)
    k, r = x.shape[-1], w_down.shape[0]
    if r == 0:
        raise ValueError("adapter bottleneck r must be >= 1, got w_down of shape [0, K]")
    check.shape("w_down", w_down, (r, k), "[r, K]")
    check.shape("w_up", w_up, (k, r), "[K, r]")
    check.shape("b_down", b_down, (r,), "[r]")
    check.shape("b_up", b_up, (k,), "[K]")
    check.same_device_and_dtype(x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    if activation not in ref.ACTIVATIONS:
        raise ValueError(f"activation must be one of {ref.ACTIVATIONS}, got {activation!r}")
    scale = check.finite_float("scale", scale)
    args = (check.rows(x, k), w_down, b_down, w_up, b_up, activation, scale)
    y, _ = _direct.run(adapter_fwd, _forward, _FUNCTION, args, n_tensors=5)
    return y if x.ndim == 2 else y.reshape(x.shape)
