"""Methods that train a subset of the model's own parameters: LN-tuning and BitFit."""
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..nn import FusedLayerNorm, FusedRMSNorm
from ._common import _freeze_all_but, _set_submodule


@dataclass(frozen=True)
class _RMSRule:
    offset: float     # added to the weight: 1 for Gemma's (1 + w), else 0
    eps_attr: str     # the attribute holding eps (None there means torch.finfo(dtype).eps)


# Hugging Face RMSNorm classes, recognised by class name inside the ``transformers`` package (no
# import of it needed). Each computes x·rsqrt(mean(x²) + eps)·(offset + w) in fp32; they differ
# in where they round to the input dtype, which FusedRMSNorm does once, at the end (tests/
# test_llama_family.py checks each class within 2× of its own rounding error).
_HF_RMS_NORMS = {
    **{name: _RMSRule(0.0, "variance_epsilon") for name in (
        "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
        "Qwen3MoeRMSNorm", "Phi3RMSNorm", "Olmo2RMSNorm", "T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm",
        "LongT5LayerNorm")},
    **{name: _RMSRule(1.0, "eps") for name in ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")},
}
_REGISTERED = {nn.RMSNorm: _RMSRule(0.0, "eps")}


def register_rms_norm(cls: type, offset: float = 0.0, eps_attr: str = "variance_epsilon") -> None:
    """Let ``ln_tuning`` swap instances of ``cls`` (and its subclasses) for ``FusedRMSNorm``.

    ``cls`` must compute ``x·rsqrt(mean(x², -1) + eps)·(offset + weight)`` with its scale in the
    Parameter ``weight`` and its eps in the attribute ``eps_attr``; ``offset=1.0`` for a Gemma-style
    ``(1 + weight)`` scale.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(eps_attr, str) or not eps_attr:
        raise TypeError(f"eps_attr must be an attribute name, got {eps_attr!r}")
    _REGISTERED[cls] = _RMSRule(float(offset), eps_attr)


def _rms_rule(module: nn.Module) -> Optional[_RMSRule]:
    for klass in type(module).__mro__:
        if klass in _REGISTERED:
            return _REGISTERED[klass]
        if klass.__module__.startswith("transformers.") and klass.__name__ in _HF_RMS_NORMS:
            return _HF_RMS_NORMS[klass.__name__]
    return None


def _fused_rms_norm(name: str, module: nn.Module, rule: _RMSRule) -> FusedRMSNorm:
    weight = getattr(module, "weight", None)
    if weight is not None and not isinstance(weight, nn.Parameter):
        raise TypeError(f"ln_tuning: '{name}' ({type(module).__name__}) has no Parameter 'weight' to tune")
    if not hasattr(module, rule.eps_attr):
        raise TypeError(f"ln_tuning: '{name}' ({type(module).__name__}) has no attribute {rule.eps_attr!r} "
                        f"holding its eps (see register_rms_norm's eps_attr)")
    return FusedRMSNorm.from_module(module, eps=getattr(module, rule.eps_attr), offset=rule.offset)


def ln_tuning(model: nn.Module, freeze_others=True) -> nn.Module:
    """Replace every ``nn.LayerNorm`` by a ``FusedLayerNorm`` and every RMSNorm (``torch.nn.RMSNorm``,
    the Hugging Face classes above, any registered with ``register_rms_norm``) by a ``FusedRMSNorm``,
    each sharing the original's Parameter objects and eps, and train only those parameters.
    ``freeze_others=False`` leaves the other parameters' flags as they were (LiLT: adapters + LNs)."""
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, (FusedLayerNorm, FusedRMSNorm)):
            continue
        if isinstance(module, nn.LayerNorm):
            fused = FusedLayerNorm.from_layer_norm(module)  # shares the Parameter objects
        else:
            rule = _rms_rule(module)
            if rule is None:
                continue
            fused = _fused_rms_norm(name, module, rule)
        fused.train(module.training)
        _set_submodule(model, name, fused)
    norms = [m for m in model.modules() if isinstance(m, (FusedLayerNorm, FusedRMSNorm))]
    if not norms:
        raise ValueError(f"ln_tuning: {type(model).__name__} has no nn.LayerNorm or RMSNorm submodule "
                         f"(another RMSNorm class can be registered with lora_kernels.surgery.register_rms_norm)")
    _freeze_all_but(model, [p for m in norms for p in (m.weight, getattr(m, "bias", None)) if p is not None],
                    freeze_others)
    return model


def bitfit(model: nn.Module, freeze_others=True) -> nn.Module:
    """Train only the parameters whose name ends in 'bias' (``freeze_others=False``: also those
    already trainable)."""
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    if not biases:
        raise ValueError(f"bitfit: {type(model).__name__} has no parameter whose name ends in 'bias'")
    _freeze_all_but(model, biases, freeze_others)
    return model
