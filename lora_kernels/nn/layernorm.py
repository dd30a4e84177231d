"""FusedLayerNorm: an nn.LayerNorm drop-in (same attributes and state_dict keys) run by the fused op."""
import numbers

import torch
from torch import nn

from ..ops.layer_norm import layer_norm


class FusedLayerNorm(nn.Module):
    """Like ``nn.LayerNorm``; its backward computes dx only when the input needs it."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(d) for d in normalized_shape)
        if not self.normalized_shape or min(self.normalized_shape) < 1:
            raise ValueError(f"normalized_shape must be non-empty with sizes >= 1, got {normalized_shape}")
        self.eps, self.elementwise_affine = float(eps), elementwise_affine
        factory = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.ones(self.normalized_shape, **factory)) if elementwise_affine else None
        bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if elementwise_affine and bias else None
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)

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
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
