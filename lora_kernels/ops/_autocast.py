"""The ops under ``torch.autocast``.

Autocast casts the inputs of the aten ops it knows; it leaves custom ops (and the direct path of
``_direct``) alone, yet stays on inside them, so the torch reference would be cast half-way (its
out-of-place matmuls to bf16, its in-place ``addmm_`` not) and fail on mixed dtypes. So each op
casts its own inputs once, by the rule of the eager code it replaces, and runs with autocast off:
  * lora_linear: every tensor to the autocast dtype, as ``F.linear`` under autocast;
  * adapter and layer_norm: the parameters to x's dtype. Eager ``x + up(act(down(x)))`` keeps x's
    dtype (fp32 residual + bf16 update is fp32), and the op works in one dtype, so an fp32 x is
    computed in fp32 and a half x in half. (torch's CUDA autocast runs ``layer_norm`` in fp32:
    here a half x stays half, which the next linear would cast to anyway);
  * infonce: the features to the autocast dtype, as open_clip's ``image @ text.T`` under
    autocast; the log-sum-exps and the loss stay fp32 inside the kernels.
"""
import contextlib
from typing import Optional

import torch

# One cheap global check first (~0.3 µs on CPU; the per-device query costs several times that),
# skipped under torch.compile, which traces the public per-device query.
_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)
# Device types autocast knows; asking about another (meta) raises.
_DEVICES = frozenset(getattr(torch._C, "_autocast_supported_devices", lambda: ("cpu", "cuda"))())


def dtype(t) -> Optional[torch.dtype]:
    """The autocast dtype of ``t``'s device when autocast is on there, else None."""
    if _any_enabled is not None and not torch.compiler.is_compiling() and not _any_enabled():
        return None
    device = t.device.type if isinstance(t, torch.Tensor) else None
    if device not in _DEVICES or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def cast(to: torch.dtype, *tensors):
    """``tensors`` with every floating-point tensor but float64 converted to ``to`` (autocast's own
    rule: it leaves float64 alone); autograd flows back through the conversion. Anything else is
    left for the argument checks to reject."""
    return tuple(t.to(to) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def like_matmul(*tensors):
    """``tensors`` as autocast hands them to a matmul: in the autocast dtype of the first one's
    device when autocast is on there (float64 aside), else as given."""
    to = dtype(tensors[0])
    return tensors if to is None else cast(to, *tensors)


def like_input(x, *params):
    """``params`` in x's dtype when autocast is on for x's device (ops whose output keeps x's
    dtype), else as given."""
    if dtype(x) is None or not x.is_floating_point():
        return params
    return cast(x.dtype, *params)


_NOTHING = contextlib.nullcontext()  # reusable: saves building one a call


def off(t: torch.Tensor):
    """A context with autocast off on ``t``'s device, so the backend sees the dtypes it was given."""
    return _NOTHING if dtype(t) is None else torch.autocast(t.device.type, enabled=False)
