"""DoRA linear as a custom op: forward and backward are separate ops, each dispatched to a backend
(the same structure as ops/lora.py)."""
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..reference import compute_dtype
from ..reference import dora as ref
from . import _autocast, _direct, _validate as check
from .lora import _seed

IMPLS = {"torch": backend.Impl(ref.forward, ref.backward)}
IMPLS["triton"] = backend.lazy_impl("lora_kernels.triton.dora")


def _forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed, save_z):
    impl = backend.select("dora_linear", IMPLS, x, lora_A)
    return impl.forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p,
                        int(seed), save_z)


@torch.library.custom_op("lora_kernels::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    magnitude: Tensor, weight_sq_norm: Optional[Tensor], scaling: float, dropout_p: float,
                    seed: Tensor, save_z: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed, save_z)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed, save_z):
    m, n, ct = x.shape[0], weight.shape[0], compute_dtype(x.dtype)
    return (x.new_empty(m, n), x.new_empty(m, lora_A.shape[0], dtype=ct), x.new_empty(n, dtype=ct),
            x.new_empty(n, dtype=ct), x.new_empty(m, n) if save_z else x.new_empty(0))


def _backward_impl(g, x, weight, lora_A, lora_B, u, c, rnorm, z, scaling, dropout_p, seed,
                   need_dx, need_dW, need_db, need_dm, z_is_y):
    impl = backend.select("dora_linear", IMPLS, x, lora_A)
    return impl.backward(g.contiguous(), x, weight, lora_A, lora_B, u, c, rnorm, z, scaling, dropout_p, int(seed),
                         need_dx, need_dW, need_db, need_dm, z_is_y)


@torch.library.custom_op("lora_kernels::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(g: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor, c: Tensor,
                    rnorm: Tensor, z: Tensor, scaling: float, dropout_p: float, seed: Tensor, need_dx: bool,
                    need_dW: bool, need_db: bool, need_dm: bool,
                    z_is_y: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(g, x, weight, lora_A, lora_B, u, c, rnorm, z, scaling, dropout_p, seed,
                          need_dx, need_dW, need_db, need_dm, z_is_y)


@dora_linear_bwd.register_fake
def _(g, x, weight, lora_A, lora_B, u, c, rnorm, z, scaling, dropout_p, seed, need_dx, need_dW, need_db, need_dm,
      z_is_y):
    empty = lambda: x.new_empty(0)  # noqa: E731  (fresh each: outputs must not alias)
    n = weight.shape[0]
    return (x.new_empty(x.shape) if need_dx else empty(), torch.empty_like(lora_A), torch.empty_like(lora_B),
            weight.new_empty(n) if need_dm else empty(), weight.new_empty(weight.shape) if need_dW else empty(),
            weight.new_empty(n) if need_db else empty())


def _z_from_y(bias, dropout_p) -> bool:
    """Without bias and dropout y = c⊙z: the output itself stands for z (d magnitude's input), so
    nothing M×N is saved beyond y, which the next layer often keeps anyway. (A magnitude entry of
    exactly 0 then makes its gradient NaN, loudly; magnitudes start at ‖W0_n‖ > 0.)"""
    return bias is None and dropout_p == 0.0


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed, save_z = inputs
    y, u, c, rnorm, z = output
    ctx.z_is_y = _z_from_y(bias, dropout_p)
    if ctx.z_is_y and ctx.needs_input_grad[5]:
        z = y
    ctx.save_for_backward(x, weight, lora_A, lora_B, u, c, rnorm, z, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend.get_backend()


def _backward(ctx, gy, _gu, _gc, _gr, _gz):
    x, weight, lora_A, lora_B, u, c, rnorm, z, seed = ctx.saved_tensors
    need_dx, need_dW, need_db, need_dm = (check.needs(ctx, i) for i in (0, 1, 2, 5))
    if need_dm and z.numel() != x.shape[0] * weight.shape[0]:
        raise RuntimeError("dora_linear: magnitude needs a gradient but the forward ran with save_z=False")
    args = (gy, x, weight, lora_A, lora_B, u, c, rnorm, z, ctx.scaling, ctx.dropout_p, seed,
            need_dx, need_dW, need_db, need_dm, ctx.z_is_y)
    dx, dA, dB, dm, dW, db = _direct.backward(ctx, dora_linear_bwd, _backward_impl, args, n_tensors=9)
    return (check.grad_or_none(dx, need_dx), check.grad_or_none(dW, need_dW), check.grad_or_none(db, need_db),
            dA, dB, check.grad_or_none(dm, need_dm), None, None, None, None, None)


dora_linear_fwd.register_autograd(_backward, setup_context=_setup)
_FUNCTION = _direct.autograd_function("DoRALinearFunction", _forward, _setup, _backward)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True):
    """DoRA (PEFT's semantics); see ``dora_linear_cached``, which also takes ‖W0_n‖² cached."""
    return dora_linear_cached(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training)


def dora_linear_cached(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True,
                       weight_sq_norm=None):
    """DoRA (PEFT's semantics): y = W0 x + b + (c − 1)⊙W0 drop(x) + c⊙s·(drop(x) Aᵀ) Bᵀ for x of
    shape [..., K], with c = magnitude / ‖W0 + s·BA‖ per output row, detached; without dropout
    y = c⊙(x W0ᵀ + s·(x Aᵀ) Bᵀ) + b.

    weight: [N, K] (frozen base), bias: [N] or None, lora_A: [r, K], lora_B: [N, r], magnitude: [N].
    weight_sq_norm: optional [N] ‖W0_n‖² in the compute dtype (fp32 for half inputs), which a
    module may cache since W0 is frozen; it must match ``weight`` (it is not checked).
    Dropout is active when ``training`` and ``dropout_p > 0``. Under autocast every tensor is cast
    to the autocast dtype first, as ``F.linear`` would be.
    """
    x, weight, bias, lora_A, lora_B, magnitude = _autocast.like_matmul(x, weight, bias, lora_A, lora_B, magnitude)
    k, n, r = check.lora_shapes(x, weight, bias, lora_A, lora_B)
    check.tensor("magnitude", magnitude, ndim=1)
    check.shape("magnitude", magnitude, (n,), "[N]")
    check.same_device_and_dtype(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude)
    if weight_sq_norm is not None:
        check.shape("weight_sq_norm", weight_sq_norm, (n,), "[N]")
        if weight_sq_norm.dtype != compute_dtype(x.dtype) or weight_sq_norm.device != x.device:
            raise TypeError(f"weight_sq_norm must be {compute_dtype(x.dtype)} on {x.device}, "
                            f"got {weight_sq_norm.dtype} on {weight_sq_norm.device}")
        weight_sq_norm = weight_sq_norm.detach()
    scaling = check.finite_float("scaling", scaling)
    p = check.probability("dropout_p", dropout_p)
    p = p if training else 0.0
    # z = W0 x' + s·uBᵀ only feeds d magnitude
    save_z = _direct.records_graph(magnitude) and not _z_from_y(bias, p)
    args = (check.rows(x, k), weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, p, _seed(p), save_z)
    y = _direct.run(dora_linear_fwd, _forward, _FUNCTION, args, n_tensors=7)[0]
    return y if x.ndim == 2 else y.reshape(*x.shape[:-1], n)
