"""FusedRMSNorm: a drop-in for torch.nn.RMSNorm and the Hugging Face ``*RMSNorm`` modules (state_dict
key ``weight``) run by the fused op."""
import numbers
from typing import Optional

import torch
from torch import nn

from ..ops.rms_norm import rms_norm


class FusedRMSNorm(nn.Module):
    """y = x·rsqrt(mean(x²) + eps)·(offset + weight) over the trailing ``normalized_shape`` dims;
    its backward computes dx only when the input needs it.

    ``offset=1`` is Gemma's convention (the weight stores the scale minus one): the weight starts
    at ``1 − offset``, so a fresh module is the identity scale either way. ``eps=None`` means
    ``torch.finfo(x.dtype).eps``, as in torch.nn.RMSNorm. The weight may be kept in float32 under a
    half-precision input (how HF models hold it in mixed precision): it is then cast to the input's
    dtype for the call (its gradient comes back in float32), and the output has the input's dtype.
    """

    def __init__(self, hidden_size, eps: Optional[float] = 1e-6, offset: float = 0.0, elementwise_affine=True,
                 *, device=None, dtype=None):
        super().__init__()
        shape = (hidden_size,) if isinstance(hidden_size, numbers.Integral) else tuple(hidden_size)
        if not shape or min(int(d) for d in shape) < 1:
            raise ValueError(f"hidden_size must be a positive int or a non-empty shape of sizes >= 1, "
                             f"got {hidden_size}")
        self.normalized_shape = tuple(int(d) for d in shape)
        self.eps = None if eps is None else float(eps)
        self.offset = float(offset)
        if not elementwise_affine and self.offset != 0.0:
            raise ValueError(f"offset={offset} needs a weight; pass elementwise_affine=True or offset=0")
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.weight = nn.Parameter(torch.full(self.normalized_shape, 1.0 - self.offset, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @classmethod
    def from_module(cls, norm: nn.Module, eps: Optional[float], offset: float = 0.0) -> "FusedRMSNorm":
        """A FusedRMSNorm sharing ``norm.weight`` (no copy; None for no affine), with the given eps
        and offset (``ln_tuning`` reads them from the known norm classes)."""
        weight = getattr(norm, "weight", None)
        shape = tuple(weight.shape) if weight is not None else tuple(norm.normalized_shape)
        if weight is None:
            return cls(shape, eps=eps, offset=offset, elementwise_affine=False)
        module = cls(shape, eps=eps, offset=offset, device="meta")  # its own weight is replaced
        module.weight = weight
        return module

    @property
    def variance_epsilon(self) -> Optional[float]:
        """HF's LLaMA-style name for eps (some HF code reads it)."""
        return self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[x.ndim - len(self.normalized_shape):]) != self.normalized_shape:
            raise ValueError(f"input's trailing dims must be normalized_shape {list(self.normalized_shape)}, "
                             f"got input of shape {list(x.shape)}")
        weight = self.weight
        if weight is not None and x.is_floating_point() and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if weight is None and len(self.normalized_shape) > 1:  # the op reads the shape off the weight
            return rms_norm(x.flatten(x.ndim - len(self.normalized_shape)), None, eps).reshape(x.shape)
        return rms_norm(x, weight, eps, self.offset)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, offset={self.offset}, "
                f"elementwise_affine={self.elementwise_affine}")
