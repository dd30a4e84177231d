"""RMSNorm for LN-tuning as a custom op: dγ always, dx only when x requires grad."""
import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..reference import compute_dtype
from ..reference import rms_norm as ref
from . import _autocast, _direct, _validate as check

IMPLS = {"torch": backend.Impl(ref.forward, ref.backward)}
IMPLS["triton"] = backend.lazy_impl("lora_kernels.triton.rms_norm")
IMPLS["cuda"] = backend.lazy_impl("lora_kernels.cuda.rms_norm")


def _forward(x, weight, eps, offset):
    return backend.select("rms_norm", IMPLS, x).forward(x, weight, eps, offset)


def _infer(x, weight, eps, offset):
    """_forward when no graph is recorded: nothing will read rstd, so a backend may skip it."""
    return backend.select("rms_norm", IMPLS, x).forward(x, weight, eps, offset, stats=False)


@torch.library.custom_op("lora_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float, offset: float) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, eps, offset)


@rms_norm_fwd.register_fake
def _(x, weight, eps, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


def _backward_impl(g, x, weight, rstd, offset, need_dx, need_dw):
    impl = backend.select("rms_norm", IMPLS, x)
    return impl.backward(g.contiguous(), x, weight, rstd, offset, need_dx, need_dw)


@torch.library.custom_op("lora_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(g: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, offset: float,
                 need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    return _backward_impl(g, x, weight, rstd, offset, need_dx, need_dw)


@rms_norm_bwd.register_fake
def _(g, x, weight, rstd, offset, need_dx, need_dw):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            x.new_empty(x.shape[1]) if need_dw else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, _eps, offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset = offset
    ctx.backend = backend.get_backend()


def _backward(ctx, gy, _grstd):
    x, weight, rstd = ctx.saved_tensors
    need = [check.needs(ctx, i) for i in (0, 1)]
    grads = _direct.backward(ctx, rms_norm_bwd, _backward_impl, (gy, x, weight, rstd, ctx.offset, *need),
                             n_tensors=4)
    return (*(check.grad_or_none(gr, n) for gr, n in zip(grads, need)), None, None)


rms_norm_fwd.register_autograd(_backward, setup_context=_setup)
_FUNCTION = _direct.autograd_function("RMSNormFunction", _forward, _setup, _backward)


def rms_norm(x, weight, eps=1e-6, offset=0.0):
    """y = x·rsqrt(mean(x²) + eps)·(offset + weight), normalised over the last ``weight.ndim``
    dims of x (the last dim when weight is None; then there is no scale and offset must be 0).
    offset=1 is Gemma's ``(1 + weight)``. Statistics in fp32 (fp64 for fp64), y rounded once to
    x's dtype. Under autocast weight is cast to x's dtype."""
    (weight,) = _autocast.like_input(x, weight)
    check.tensor("x", x, min_ndim=1)
    norm_shape = tuple(weight.shape) if weight is not None else tuple(x.shape[-1:])
    if len(norm_shape) == 0 or tuple(x.shape[x.ndim - len(norm_shape):]) != norm_shape:
        raise ValueError(f"weight must have the shape of x's trailing dims (normalized_shape); "
                         f"x has shape {list(x.shape)}, weight has shape {list(norm_shape)}")
    check.shape("weight", weight, norm_shape, "normalized_shape")
    check.same_device_and_dtype(x=x, weight=weight)
    eps = check.finite_float("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    offset = check.finite_float("offset", offset)
    if weight is None and offset != 0.0:
        raise ValueError(f"offset={offset} scales (offset + weight), but weight is None; pass a weight or offset=0")
    width = math.prod(norm_shape)
    flat_w = weight if weight is None or weight.ndim == 1 else weight.reshape(width)
    args = (check.rows(x, width, len(norm_shape)), flat_w, eps, offset)
    y, _ = _direct.run(rms_norm_fwd, _infer, _FUNCTION, args, n_tensors=2)
    return y if y.shape == x.shape else y.reshape(x.shape)
