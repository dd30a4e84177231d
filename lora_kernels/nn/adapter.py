"""BottleneckAdapter: x + scale·up(act(down(x))), the Houlsby/Pfeiffer adapter, run by the fused op."""
import torch
from torch import nn

from ..ops import _validate as check
from ..ops.adapter import adapter
from ..reference.adapter import ACTIVATIONS


class BottleneckAdapter(nn.Module):
    """Down-projection to ``bottleneck`` features, activation, up-projection, residual add.

    The up-projection starts at zero, so a fresh adapter is the identity.
    """

    def __init__(self, d_model, bottleneck=64, activation="gelu", scale=1.0, *, device=None, dtype=None):
        super().__init__()
        d_model, bottleneck = check.positive_int("d_model", d_model), check.positive_int("bottleneck", bottleneck)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.bottleneck, self.activation = d_model, bottleneck, activation
        self.scale = check.finite_float("scale", scale)
        self.down = nn.Linear(d_model, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, d_model, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adapter(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                       activation=self.activation, scale=self.scale)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, scale={self.scale}"
