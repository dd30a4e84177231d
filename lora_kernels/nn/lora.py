"""LoRALinear: a frozen linear layer plus a trainable low-rank update, run by the fused op."""
import math

import torch
from torch import nn

from ..ops import _validate as check
from . import dora
from ..ops.lora import lora_linear
from . import multi


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils.Conv1D) stores its weight as [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class LoRALinear(nn.Module):
    """y = x Wᵀ + b + scaling·B(A·dropout(x)), with W and b frozen.

    ``scaling`` is alpha / r, or alpha / sqrt(r) with ``use_rslora``. ``lora_A`` ([r, in]) gets
    Kaiming-uniform init and ``lora_B`` ([out, r]) zeros, so a new layer equals its base.
    ``fan_in_fan_out=True`` keeps the weight in GPT-2 Conv1D's [in, out] layout.
    ``merge()`` folds the update into the weight (one GEMM per call, no LoRA gradients
    while merged); ``unmerge()`` takes it out again. ``enable_adapters(False)`` (PEFT's switch)
    sets ``disable_adapters``: the layer then runs its base product only, and, as PEFT's
    layers do, unmerges itself first if it was merged.
    ``use_dora=True``: DoRA (PEFT's), with a trainable magnitude ``lora_magnitude_vector`` ([out]).

    Several named adapters (``add_adapter`` / ``set_adapter`` / ``delete_adapter``, nn/multi.py):
    the first (``"default"``) keeps the ``lora_A``/``lora_B`` keys, the others live under
    ``lora_adapters.<name>``; ``lora_A``, ``lora_B``, ``r``, ``alpha``, ``dropout`` and
    ``use_rslora`` always read and write the active adapter's. ``lk.adapter_batch`` runs a batch
    whose samples use different adapters.
    """

    disable_adapters = False  # class default: instances pickled before the switch existed load enabled
    _batch_names = None  # set by lk.adapter_batch
    r = multi.per_adapter("r")
    alpha = multi.per_adapter("alpha")
    dropout = multi.per_adapter("dropout")
    use_rslora = multi.per_adapter("use_rslora")
    add_adapter, set_adapter, delete_adapter = multi.add_adapter, multi.set_adapter, multi.delete_adapter
    adapter_names = property(multi.adapter_names, doc="The adapters' names, the first one's first.")
    active_adapter = property(lambda self: self._active, doc="The active adapter's name (None: base only).")

    def __init__(self, in_features, out_features, r=8, alpha=16, dropout=0.0, bias=True,
                 use_rslora=False, *, fan_in_fan_out=False, use_dora=False, device=None, dtype=None):
        super().__init__()
        in_features, out_features = check.positive_int("in_features", in_features), check.positive_int(
            "out_features", out_features)
        r, alpha = check.positive_int("r", r), check.finite_number("alpha", alpha)
        if not 0.0 <= check.finite_float("dropout", dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        multi.init_adapters(self, r=r, alpha=alpha, dropout=float(dropout), use_rslora=use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.merged, self.use_dora = False, bool(use_dora)
        if self.use_dora:
            dora.new_magnitude(self, **factory)
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_parameters(self, base: bool = True) -> None:
        if base and self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if getattr(self, "use_dora", False):
            dora.reset_magnitude(self)

    @classmethod
    def from_linear(cls, linear: nn.Module, r=8, alpha=16, dropout=0.0, use_rslora=False,
                    use_dora=False) -> "LoRALinear":
        """Wrap an ``nn.Linear`` (or GPT-2 ``Conv1D``), sharing — not copying — its weight and bias."""
        conv1d = _is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"from_linear expects nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        w = linear.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        module = cls(in_f, out_f, r=r, alpha=alpha, dropout=dropout, bias=False, use_rslora=use_rslora,
                     fan_in_fan_out=conv1d, use_dora=use_dora, device="meta", dtype=w.dtype)
        w.requires_grad_(False)
        module.weight = w
        module.bias = linear.bias
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        module.lora_A = nn.Parameter(torch.empty(r, in_f, device=w.device, dtype=w.dtype))
        module.lora_B = nn.Parameter(torch.empty(out_f, r, device=w.device, dtype=w.dtype))
        if use_dora:
            dora.new_magnitude(module, device=w.device, dtype=w.dtype)
        module.reset_parameters(base=False)
        return module

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [out, in] (a transposed view for the Conv1D layout)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling·B A as [out, in], computed in float32 at least."""
        ct = torch.promote_types(self.lora_A.dtype, torch.float32)
        return self.scaling * (self.lora_B.to(ct) @ self.lora_A.to(ct))

    __getattr__, __setattr__, __setstate__ = multi.getattr_, multi.setattr_, multi.setstate

    @torch.no_grad()
    def merge(self) -> None:
        if self._active is None:  # no adapter active: nothing to fold in
            return
        if not self.merged and self.use_dora:
            dora.merge(self)
            self.merged = True
        if not self.merged:
            w = self.base_weight()
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and self.use_dora:
            dora.unmerge(self)
            self.merged = False
        if self.merged:
            w = self.base_weight()
            w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) - self.delta_weight()).to(w.dtype))
            self.merged = False

    def enable_adapters(self, enabled: bool = True) -> None:
        self.disable_adapters = not enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._batch_names is not None:  # inside lk.adapter_batch: one adapter per sample
            return multi.mixed_forward(self, x, self._batch_names)
        if self.disable_adapters or self._active is None:
            if self.merged:
                self.unmerge()
            return nn.functional.linear(x, self.base_weight(), self.bias)
        if self.merged:
            return nn.functional.linear(x, self.base_weight(), self.bias)
        if self.use_dora:
            return dora.forward(self, x)
        return lora_linear(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.dropout, training=self.training)

    def extra_repr(self) -> str:
        names = self.adapter_names
        return ((f"adapters={names}, active={self._active!r}, " if names != ["default"] else "") +
                f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
                f"use_rslora={self.use_rslora}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
                + (", use_dora=True" if self.use_dora else ""))
