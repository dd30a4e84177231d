"""FusedLayerNorm: an nn.LayerNorm drop-in (a subclass: same attributes, state_dict keys and
isinstance checks, e.g. Trainer's no-weight-decay rule) run by the fused op."""
import numbers

import torch
from torch import nn

from ..ops.layer_norm import layer_norm


class FusedLayerNorm(nn.LayerNorm):
    """Like ``nn.LayerNorm``; its backward computes dx only when the input needs it.

    As with ``nn.LayerNorm``, γ/β may be kept in float32 under a half-precision input: they are
    then cast to the input's dtype for the call (their gradients come back in float32), and
    the output has the input's dtype.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, device=None, dtype=None):
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
        if not shape or min(int(d) for d in shape) < 1:
            raise ValueError(f"normalized_shape must be non-empty with sizes >= 1, got {normalized_shape}")
        super().__init__(tuple(int(d) for d in shape), eps=float(eps), elementwise_affine=elementwise_affine,
                         bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> "FusedLayerNorm":
        """A FusedLayerNorm sharing ``ln``'s parameters (no copy)."""
        module = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=False)
        module.elementwise_affine = ln.elementwise_affine
        module.weight, module.bias = ln.weight, ln.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[x.ndim - len(self.normalized_shape):]) != self.normalized_shape:
            raise ValueError(f"input's trailing dims must be normalized_shape {list(self.normalized_shape)}, "
                             f"got input of shape {list(x.shape)}")
        weight, bias = self.weight, self.bias
        if x.is_floating_point():
            weight = weight if weight is None or weight.dtype == x.dtype else weight.to(x.dtype)
            bias = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        return layer_norm(x, weight, bias, self.eps)
