"""LayerNorm for LN-tuning as a custom op: dγ/dβ always, dx only when x requires grad."""
import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..reference import compute_dtype
from ..reference import layer_norm as ref
from . import _autocast, _direct, _validate as check

IMPLS = {"torch": backend.Impl(ref.forward, ref.backward)}
IMPLS["triton"] = backend.lazy_impl("lora_kernels.triton.layer_norm")
IMPLS["cuda"] = backend.lazy_impl("lora_kernels.cuda.layer_norm")


def _forward(x, weight, bias, eps):
    return backend.select("layer_norm", IMPLS, x).forward(x, weight, bias, eps)


def _infer(x, weight, bias, eps):
    """_forward when no graph is recorded: nothing will read mean and rstd, so a backend may skip
    them (two allocations and stores a call, which count at batch 1)."""
    return backend.select("layer_norm", IMPLS, x).forward(x, weight, bias, eps, stats=False)


@torch.library.custom_op("lora_kernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, weight, bias, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


def _backward_impl(g, x, weight, mean, rstd, need_dx, need_dw, need_db):
    impl = backend.select("layer_norm", IMPLS, x)
    return impl.backward(g.contiguous(), x, weight, mean, rstd, need_dx, need_dw, need_db)


@torch.library.custom_op("lora_kernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(g: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   need_dx: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(g, x, weight, mean, rstd, need_dx, need_dw, need_db)


@layer_norm_bwd.register_fake
def _(g, x, weight, mean, rstd, need_dx, need_dw, need_db):
    empty, width = (lambda: x.new_empty(0)), x.shape[1]  # fresh each: outputs must not alias
    return (x.new_empty(x.shape) if need_dx else empty(), x.new_empty(width) if need_dw else empty(),
            x.new_empty(width) if need_db else empty())


def _setup(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.backend = backend.get_backend()


def _backward(ctx, gy, _gmean, _grstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need = [check.needs(ctx, i) for i in (0, 1, 2)]
    grads = _direct.backward(ctx, layer_norm_bwd, _backward_impl, (gy, x, weight, mean, rstd, *need), n_tensors=5)
    return (*(check.grad_or_none(gr, n) for gr, n in zip(grads, need)), None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup)
_FUNCTION = _direct.autograd_function("LayerNormFunction", _forward, _setup, _backward)


def layer_norm(x, weight, bias, eps=1e-5):
    """y = weight ⊙ (x − mean)·rstd + bias, normalised over the last ``weight.ndim`` dims
    of x (the last dim when weight is None). weight/bias may be None (no affine).
    Under autocast weight and bias are cast to x's dtype, and y keeps x's dtype."""
    weight, bias = _autocast.like_input(x, weight, bias)
    check.tensor("x", x, min_ndim=1)
    norm_shape = tuple(weight.shape) if weight is not None else (
        tuple(bias.shape) if bias is not None else tuple(x.shape[-1:]))
    if len(norm_shape) == 0 or tuple(x.shape[x.ndim - len(norm_shape):]) != norm_shape:
        raise ValueError(f"weight/bias must have the shape of x's trailing dims (normalized_shape); "
                         f"x has shape {list(x.shape)}, normalized_shape is {list(norm_shape)}")
    check.shape("weight", weight, norm_shape, "normalized_shape")
    check.shape("bias", bias, norm_shape, "normalized_shape")
    check.same_device_and_dtype(x=x, weight=weight, bias=bias)
    eps = check.finite_float("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    width = math.prod(norm_shape)
    flat = lambda t: t if t is None or t.ndim == 1 else t.reshape(width)  # noqa: E731
    args = (check.rows(x, width, len(norm_shape)), flat(weight), flat(bias), eps)
    y, _, _ = _direct.run(layer_norm_fwd, _infer, _FUNCTION, args, n_tensors=3)
    return y if y.shape == x.shape else y.reshape(x.shape)
