"""LoRA on nn.MultiheadAttention, laid out as PEFT's ``lora.MultiheadAttention``.

``nn.MultiheadAttention`` computes q/k/v from its ``in_proj_weight`` Parameter and reads
``out_proj.weight``/``.bias`` directly, calling no linear module, so a LoRALinear cannot sit on
its path. ``LoRAMultiheadAttention`` keeps the MHA as ``base_layer`` (its ``out_proj`` a
LoRALinear that holds the output projection's LoRA) and runs the MHA's own forward with
``W_in + s·B·A`` and ``W_out + s·B_o·A_o`` substituted for the two weights
(``torch.func.functional_call``: differentiable, nothing written in place). Parameter names
are PEFT's (``<mha>.lora_A``, ``<mha>.lora_B``, ``<mha>.base_layer.out_proj.lora_A``...), so
adapter files move between the two. As in PEFT, the low-rank updates are merged into the
weights for each call, so no LoRA dropout applies here.
"""
import math

import torch
from torch import nn

from ..nn import LoRALinear


class LoRAMultiheadAttention(nn.Module):
    """``base_layer`` (an ``nn.MultiheadAttention`` with q/k/v of one width) plus LoRA on its
    stacked in-projection (``lora_A`` [r, E], ``lora_B`` [3E, r]) and on ``base_layer.out_proj``."""

    def __init__(self, base_layer: nn.MultiheadAttention, r=8, alpha=16, use_rslora=False, *, _out_proj=None):
        super().__init__()
        if not isinstance(base_layer, nn.MultiheadAttention):
            raise TypeError(f"base_layer must be an nn.MultiheadAttention, got {type(base_layer).__name__}")
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim (one in_proj_weight), "
                             "as PEFT's does")
        w = base_layer.in_proj_weight
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.lora_A = nn.Parameter(torch.empty(r, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        for p in (base_layer.in_proj_weight, base_layer.in_proj_bias):
            if p is not None:
                p.requires_grad_(False)
        if _out_proj is None:
            _out_proj = LoRALinear.from_linear(base_layer.out_proj, r=r, alpha=alpha, use_rslora=use_rslora)
            _out_proj.train(base_layer.out_proj.training)
        base_layer.out_proj = _out_proj
        self.merged = False
        self.disable_adapters = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def __getattr__(self, name):
        # Model code reads MHA attributes (batch_first, embed_dim, in_proj_weight...): delegate.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def delta_weight(self) -> torch.Tensor:
        """scaling·B A for the stacked in-projection, [3E, E], in float32 at least."""
        ct = torch.promote_types(self.lora_A.dtype, torch.float32)
        return self.scaling * (self.lora_B.to(ct) @ self.lora_A.to(ct))

    def enable_adapters(self, enabled: bool = True) -> None:
        self.disable_adapters = not enabled
        self.base_layer.out_proj.enable_adapters(enabled)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.in_proj_weight
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight()).to(w.dtype))
            self.base_layer.out_proj.merge()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.in_proj_weight
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) - self.delta_weight()).to(w.dtype))
            self.base_layer.out_proj.unmerge()
            self.merged = False

    def forward(self, *args, **kwargs):
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged:
            return self.base_layer(*args, **kwargs)
        w_in, out_proj = self.base_layer.in_proj_weight, self.base_layer.out_proj
        weights = {"in_proj_weight": w_in + self.delta_weight().to(w_in.dtype),
                   "out_proj.weight": out_proj.weight + out_proj.delta_weight().to(out_proj.weight.dtype)}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, use_rslora={self.use_rslora}, merged={self.merged}"


def lora_layers(model: nn.Module) -> list:
    """Every LoRA-carrying module (LoRALinear, LoRAMultiheadAttention), in model order."""
    return [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAMultiheadAttention))]
