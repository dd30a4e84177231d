"""Symmetric InfoNCE (CLIP) loss as a custom op: forward and backward dispatched to a backend."""
import torch
from torch import Tensor

from .. import backend
from ..reference import compute_dtype
from ..reference import infonce as ref
from . import _autocast, _direct, _validate as check

IMPLS = {"torch": backend.Impl(ref.forward, ref.backward)}
IMPLS["triton"] = backend.lazy_impl("lora_kernels.triton.infonce")
IMPLS["cuda"] = backend.lazy_impl("lora_kernels.cuda.infonce")


def _forward(image, text, logit_scale, lambda_, normalize):
    return backend.select("infonce", IMPLS, image).forward(image, text, logit_scale, lambda_, normalize)


@torch.library.custom_op("lora_kernels::infonce_fwd", mutates_args=())
def infonce_fwd(image: Tensor, text: Tensor, logit_scale: Tensor, lambda_: float,
                normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(image, text, logit_scale, lambda_, normalize)


@infonce_fwd.register_fake
def _(image, text, logit_scale, lambda_, normalize):
    ct = compute_dtype(image.dtype)
    lse = image.new_empty(image.shape[0], dtype=ct)
    return image.new_empty((), dtype=ct), lse, lse.new_empty(lse.shape)


def _backward_impl(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize,
                   need_dimage, need_dtext, need_dscale):
    impl = backend.select("infonce", IMPLS, image)
    return impl.backward(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize,
                         need_dimage, need_dtext, need_dscale)


@torch.library.custom_op("lora_kernels::infonce_bwd", mutates_args=())
def infonce_bwd(gloss: Tensor, image: Tensor, text: Tensor, logit_scale: Tensor, lse_row: Tensor,
                lse_col: Tensor, lambda_: float, normalize: bool, need_dimage: bool, need_dtext: bool,
                need_dscale: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize,
                          need_dimage, need_dtext, need_dscale)


@infonce_bwd.register_fake
def _(gloss, image, text, logit_scale, lse_row, lse_col, lambda_, normalize, need_di, need_dt, need_dc):
    empty = lambda: image.new_empty(0)  # noqa: E731  (fresh each: outputs must not alias)
    return (image.new_empty(image.shape) if need_di else empty(), text.new_empty(text.shape) if need_dt else empty(),
            logit_scale.new_empty(logit_scale.shape) if need_dc else logit_scale.new_empty(0))


def _setup(ctx, inputs, output):
    image, text, logit_scale, lambda_, normalize = inputs
    ctx.save_for_backward(image, text, logit_scale, output[1], output[2])
    ctx.lambda_, ctx.normalize, ctx.backend = lambda_, normalize, backend.get_backend()


def _backward(ctx, gloss, _glse_row, _glse_col):
    image, text, logit_scale, lse_row, lse_col = ctx.saved_tensors
    need = [check.needs(ctx, i) for i in (0, 1, 2)]
    args = (gloss, image, text, logit_scale, lse_row, lse_col, ctx.lambda_, ctx.normalize, *need)
    grads = _direct.backward(ctx, infonce_bwd, _backward_impl, args, n_tensors=6)
    return (*(check.grad_or_none(gr, n) for gr, n in zip(grads, need)), None, None)


infonce_fwd.register_autograd(_backward, setup_context=_setup)
_FUNCTION = _direct.autograd_function("InfoNCEFunction", _forward, _setup, _backward)


def _scale_tensor(logit_scale, features):
    """logit_scale as one value on the features' device (a float becomes a tensor)."""
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(check.finite_float("logit_scale", logit_scale), device=features.device)
    check.tensor("logit_scale", logit_scale)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value, got shape {list(logit_scale.shape)}")
    if logit_scale.device != features.device:
        raise ValueError(f"logit_scale is on {logit_scale.device} but the features are on {features.device}")
    return logit_scale


def infonce(image, text, logit_scale, lambda_=0.5, normalize=False):
    """Symmetric InfoNCE: λ·CE(S, diag) + (1−λ)·CE(Sᵀ, diag) with S = logit_scale·image·textᵀ.

    image, text: [N, d]; logit_scale: a scalar tensor (c = 1/τ, already exponentiated, as
    open_clip passes it) or a float; ``normalize`` L2-normalises the rows first, as
    ``F.normalize`` does (a row is divided by max(‖row‖, 1e-12), so a zero row stays zero).
    Returns a 0-d loss (float32 for half inputs). Under autocast the features are cast to the
    autocast dtype, as open_clip's ``image @ text.T`` would be.
    """
    image, text = _autocast.like_matmul(image, text)
    check.tensor("image", image, ndim=2)
    check.tensor("text", text, ndim=2)
    if image.shape != text.shape:
        raise ValueError(f"image and text must both be [N, d] with the same N and d; "
                         f"got image {list(image.shape)} and text {list(text.shape)}")
    check.same_device_and_dtype(image=image, text=text)
    logit_scale = _scale_tensor(logit_scale, image)
    lambda_ = check.probability("lambda_", lambda_, allow_one=True)
    args = (image, text, logit_scale, lambda_, bool(normalize))
    loss, _, _ = _direct.run(infonce_fwd, _forward, _FUNCTION, args, n_tensors=3)
    return loss


# ---- One direction on a rectangular block (the distributed loss: local rows, gathered keys) ----

ROWS_IMPLS = {"torch": backend.Impl(ref.rows_forward, ref.rows_backward)}
ROWS_IMPLS["triton"] = backend.lazy_impl("lora_kernels.triton.infonce", prefix="rows_")
ROWS_IMPLS["cuda"] = backend.lazy_impl("lora_kernels.cuda.infonce", prefix="rows_")


def _rows_forward(queries, keys, logit_scale, offset, normalize):
    impl = backend.select("infonce_rows", ROWS_IMPLS, queries)
    return impl.forward(queries, keys, logit_scale, offset, normalize)


@torch.library.custom_op("lora_kernels::infonce_rows_fwd", mutates_args=())
def infonce_rows_fwd(queries: Tensor, keys: Tensor, logit_scale: Tensor, offset: int,
                     normalize: bool) -> tuple[Tensor, Tensor]:
    return _rows_forward(queries, keys, logit_scale, offset, normalize)


@infonce_rows_fwd.register_fake
def _(queries, keys, logit_scale, offset, normalize):
    ct = compute_dtype(queries.dtype)
    return queries.new_empty((), dtype=ct), queries.new_empty(queries.shape[0], dtype=ct)


def _rows_backward_impl(gpart, queries, keys, logit_scale, lse, offset, normalize, need_dq, need_dk, need_dc):
    impl = backend.select("infonce_rows", ROWS_IMPLS, queries)
    return impl.backward(gpart, queries, keys, logit_scale, lse, offset, normalize, need_dq, need_dk, need_dc)


@torch.library.custom_op("lora_kernels::infonce_rows_bwd", mutates_args=())
def infonce_rows_bwd(gpart: Tensor, queries: Tensor, keys: Tensor, logit_scale: Tensor, lse: Tensor,
                     offset: int, normalize: bool, need_dqueries: bool, need_dkeys: bool,
                     need_dscale: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _rows_backward_impl(gpart, queries, keys, logit_scale, lse, offset, normalize,
                               need_dqueries, need_dkeys, need_dscale)


@infonce_rows_bwd.register_fake
def _(gpart, queries, keys, logit_scale, lse, offset, normalize, need_dq, need_dk, need_dc):
    empty = lambda: queries.new_empty(0)  # noqa: E731  (fresh each: outputs must not alias)
    return (queries.new_empty(queries.shape) if need_dq else empty(), keys.new_empty(keys.shape) if need_dk else empty(),
            logit_scale.new_empty(logit_scale.shape) if need_dc else logit_scale.new_empty(0))


def _rows_setup(ctx, inputs, output):
    queries, keys, logit_scale, offset, normalize = inputs
    ctx.save_for_backward(queries, keys, logit_scale, output[1])
    ctx.offset, ctx.normalize, ctx.backend = offset, normalize, backend.get_backend()


def _rows_backward(ctx, gpart, _glse):
    queries, keys, logit_scale, lse = ctx.saved_tensors
    need = [check.needs(ctx, i) for i in (0, 1, 2)]
    args = (gpart, queries, keys, logit_scale, lse, ctx.offset, ctx.normalize, *need)
    grads = _direct.backward(ctx, infonce_rows_bwd, _rows_backward_impl, args, n_tensors=5)
    return (*(check.grad_or_none(gr, n) for gr, n in zip(grads, need)), None, None)


infonce_rows_fwd.register_autograd(_rows_backward, setup_context=_rows_setup)
_ROWS_FUNCTION = _direct.autograd_function("InfoNCERowsFunction", _rows_forward, _rows_setup, _rows_backward)


def infonce_rows(queries, keys, logit_scale, offset, normalize=False):
    """One direction of the loss on a rectangular block: Σᵢ (LSE_j S_ij − S_i,i+offset) / n_keys
    with S = logit_scale·queries·keysᵀ, queries [m, d], keys [n, d], 0 <= offset <= n − m.
    Summed over the blocks of all ranks (both directions, weighted by λ and 1−λ), it is the
    whole-batch loss. Returns a 0-d tensor (float32 for half inputs); autocast as ``infonce``."""
    queries, keys = _autocast.like_matmul(queries, keys)
    check.tensor("queries", queries, ndim=2)
    check.tensor("keys", keys, ndim=2)
    check.same_device_and_dtype(queries=queries, keys=keys)
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries [m, d] and keys [n, d] must share d; got {list(queries.shape)} "
                         f"and {list(keys.shape)}")
    offset = int(offset)
    if not 0 <= offset <= keys.shape[0] - queries.shape[0]:
        raise ValueError(f"offset must be in [0, n − m] = [0, {keys.shape[0] - queries.shape[0]}] so that "
                         f"every query row has its positive key, got {offset}")
    logit_scale = _scale_tensor(logit_scale, queries)
    args = (queries, keys, logit_scale, offset, bool(normalize))
    part, _ = _direct.run(infonce_rows_fwd, _rows_forward, _ROWS_FUNCTION, args, n_tensors=3)
    return part
