"""Many LoRA adapters in one batch as a custom op: rows routed to their adapter by adapter_ids.
Forward and backward are separate ops, each dispatched to a backend (the layout and the math
are in reference/lora_multi.py)."""
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..reference import compute_dtype
from ..reference import lora_multi as ref
from . import _autocast, _direct, _validate as check
from .lora import _seed  # the same draw as lora_linear: torch.manual_seed gives both the same mask

IMPLS = {"torch": backend.Impl(ref.forward, ref.backward)}
IMPLS["triton"] = backend.lazy_impl("lora_kernels.triton.lora_multi")


def _forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, seed):
    impl = backend.select("lora_linear_multi", IMPLS, x)
    return impl.forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, int(seed))


@torch.library.custom_op("lora_kernels::lora_multi_fwd", mutates_args=())
def lora_multi_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   scalings: Tensor, adapter_ids: Tensor, dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, seed)


@lora_multi_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, seed):
    m = x.shape[0]
    return x.new_empty(m, weight.shape[0]), x.new_empty(m, lora_A.shape[1], dtype=compute_dtype(x.dtype))


def _backward_impl(g, x, weight, lora_A, lora_B, u, scalings, adapter_ids, dropout_p, seed, need_dx, need_dW,
                   need_db):
    impl = backend.select("lora_linear_multi", IMPLS, x)
    return impl.backward(g.contiguous(), x, weight, lora_A, lora_B, u, scalings, adapter_ids, dropout_p, int(seed),
                         need_dx, need_dW, need_db)


@torch.library.custom_op("lora_kernels::lora_multi_bwd", mutates_args=())
def lora_multi_bwd(g: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
                   scalings: Tensor, adapter_ids: Tensor, dropout_p: float, seed: Tensor, need_dx: bool,
                   need_dW: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(g, x, weight, lora_A, lora_B, u, scalings, adapter_ids, dropout_p, seed,
                          need_dx, need_dW, need_db)


@lora_multi_bwd.register_fake
def _(g, x, weight, lora_A, lora_B, u, scalings, adapter_ids, dropout_p, seed, need_dx, need_dW, need_db):
    empty = lambda: x.new_empty(0)  # noqa: E731  (fresh each: outputs must not alias)
    return (x.new_empty(x.shape) if need_dx else empty(), torch.empty_like(lora_A), torch.empty_like(lora_B),
            weight.new_empty(weight.shape) if need_dW else empty(),
            weight.new_empty(weight.shape[0]) if need_db else empty())


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scalings, adapter_ids, seed)
    ctx.dropout_p, ctx.backend = dropout_p, backend.get_backend()


def _backward(ctx, gy, _gu):
    x, weight, lora_A, lora_B, u, scalings, adapter_ids, seed = ctx.saved_tensors
    need_dx, need_dW, need_db = (check.needs(ctx, i) for i in (0, 1, 2))
    args = (gy, x, weight, lora_A, lora_B, u, scalings, adapter_ids, ctx.dropout_p, seed, need_dx, need_dW, need_db)
    dx, dA, dB, dW, db = _direct.backward(ctx, lora_multi_bwd, _backward_impl, args, n_tensors=8)
    return (check.grad_or_none(dx, need_dx), check.grad_or_none(dW, need_dW), check.grad_or_none(db, need_db),
            dA, dB, None, None, None, None)


lora_multi_fwd.register_autograd(_backward, setup_context=_setup)
_FUNCTION = _direct.autograd_function("LoRALinearMultiFunction", _forward, _setup, _backward)


def _scalings(scalings, n: int, like: Tensor) -> Tensor:
    """scalings as a [n] tensor in the compute dtype on x's device (a list or tuple of floats is
    accepted too). They receive no gradient, so one that requires grad is refused, not ignored."""
    if isinstance(scalings, (list, tuple)):
        scalings = torch.tensor([check.finite_float("scalings", s) for s in scalings], dtype=torch.float64)
    if not isinstance(scalings, Tensor):
        raise TypeError(f"scalings must be a 1-D float tensor of length n (or a list of floats), "
                        f"got {type(scalings).__name__}")
    if not scalings.is_floating_point():
        raise TypeError(f"scalings must be a floating-point tensor, got {scalings.dtype}")
    if tuple(scalings.shape) != (n,):
        raise ValueError(f"scalings must have shape [n] = [{n}] (one per adapter of lora_A), "
                         f"got {list(scalings.shape)}")
    if scalings.requires_grad:
        raise ValueError("scalings must not require grad: lora_linear_multi gives them no gradient "
                         "(pass scalings.detach() if that is intended)")
    if not torch.compiler.is_compiling() and scalings.device.type == "cpu" and not torch.isfinite(scalings).all():
        raise ValueError(f"scalings must be finite, got {scalings.tolist()}")
    return scalings.to(device=like.device, dtype=compute_dtype(like.dtype), non_blocking=True)


def _adapter_ids(adapter_ids, lead: tuple, m: int, n: int, like: Tensor) -> Tensor:
    """adapter_ids as an [M] integer tensor on x's device. Their shape is x's leading dims or a
    prefix of them (one id per sample of a [B, T, K] batch: ids [B]), broadcast over the rest."""
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be an int32 or int64 tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be an int32 or int64 tensor, got {adapter_ids.dtype}")
    shape = tuple(adapter_ids.shape)
    if shape != lead[:len(shape)]:
        raise ValueError(f"adapter_ids must have the shape of x's leading dims {list(lead)} or a prefix of "
                         f"them, got {list(shape)}")
    # The range check reads the ids on the host: free for CPU ids (what a server holds anyway;
    # they are then copied to the device, a few bytes), one device sync for GPU ids.
    # Under torch.compile it is skipped (it would break the graph).
    if not torch.compiler.is_compiling() and adapter_ids.numel():
        lo, hi = torch.aminmax(adapter_ids)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= n:
            raise ValueError(f"adapter_ids must be in [-1, n) = [-1, {n}) (-1: base layer only), "
                             f"got values from {lo} to {hi}")
    if len(shape) < len(lead):
        adapter_ids = adapter_ids.reshape(shape + (1,) * (len(lead) - len(shape))).expand(lead)
    return adapter_ids.reshape(m).to(device=like.device, non_blocking=True)


def lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p=0.0, training=True):
    """y_m = x_m Wᵀ + b + s_i·(drop(x_m) A_iᵀ) B_iᵀ with i = adapter_ids[m], for x of shape [..., K].

    weight: [N, K] (frozen base), bias: [N] or None; lora_A: [n, r, K] and lora_B: [n, N, r] hold
    n adapters, smaller ranks zero-padded to r; scalings: [n] floats (α_i/r_i), no gradient;
    adapter_ids: int tensor of x's leading dims (or a prefix of them, broadcast), −1 = base only.
    Dropout (LoRA path only) when ``training`` and ``dropout_p > 0``: the mask lora_linear would
    draw for x with the same seed. Under autocast every float tensor but scalings is cast to the
    autocast dtype first, as ``F.linear`` would be.
    """
    x, weight, bias, lora_A, lora_B = _autocast.like_matmul(x, weight, bias, lora_A, lora_B)
    check.tensor("x", x, min_ndim=1)
    check.tensor("weight", weight, ndim=2)
    check.tensor("lora_A", lora_A, ndim=3)
    check.tensor("lora_B", lora_B, ndim=3)
    k, (n_out, kw), (n, r) = x.shape[-1], weight.shape, lora_A.shape[:2]
    if kw != k:
        raise ValueError(f"weight must have shape [N, K] with K = x.shape[-1] = {k}, got {list(weight.shape)}")
    if n == 0 or r == 0:
        raise ValueError(f"lora_A must have shape [n, r, K] with n >= 1 adapters and rank r >= 1, "
                         f"got {list(lora_A.shape)}")
    check.shape("lora_A", lora_A, (n, r, k), "[n, r, K]")
    check.shape("lora_B", lora_B, (n, n_out, r), "[n, N, r]")
    check.shape("bias", bias, (n_out,), "[N]")
    check.same_device_and_dtype(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    p = check.probability("dropout_p", dropout_p)
    p = p if training else 0.0
    lead = tuple(x.shape[:-1])
    rows = check.rows(x, k)
    scalings = _scalings(scalings, n, x)
    ids = _adapter_ids(adapter_ids, lead, rows.shape[0], n, x)
    args = (rows, weight, bias, lora_A, lora_B, scalings, ids, p, _seed(p))
    y, _ = _direct.run(lora_multi_fwd, _forward, _FUNCTION, args, n_tensors=7)
    return y if x.ndim == 2 else y.reshape(*lead, n_out)
