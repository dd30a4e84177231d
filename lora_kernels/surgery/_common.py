"""Helpers every kind of surgery shares: finding modules by PEFT's name rules, swapping them,
freezing everything but the method's parameters."""
import re

from torch import nn

from ..nn import LoRALinear
from ..nn.lora import _is_conv1d


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _in_out_features(module: nn.Module) -> tuple:
    """(in, out) of a Linear, a Conv1D (weight stored [in, out]) or a LoRALinear."""
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def _name_matches(name: str, targets) -> bool:
    """PEFT's rule: a str is a regex over the whole name; a list matches the name or a '.'-suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets(targets) -> None:
    ok = isinstance(targets, str) or (isinstance(targets, (list, tuple, set, frozenset))
                                      and len(targets) > 0 and all(isinstance(t, str) for t in targets))
    if not ok:
        raise TypeError(f"target_modules must be a regex str or a non-empty list of str, got {targets!r}")


def _matching_names(model: nn.Module, targets, exclude=None) -> list:
    """Qualified names of the model's submodules (never the root) selected by ``targets``."""
    return [name for name, _ in model.named_modules()
            if name and _name_matches(name, targets) and not (exclude and _name_matches(name, exclude))]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _freeze_all_but(model: nn.Module, keep, freeze_others: bool = True) -> None:
    """requires_grad = True for the parameters in ``keep`` (compared by identity); every other
    parameter of the model is frozen, unless ``freeze_others=False`` leaves its flag as it is
    (methods combined, e.g. LiLT's adapters plus unlocked LayerNorms)."""
    keep_ids = {id(p) for p in keep}
    for p in model.parameters():
        if id(p) in keep_ids:
            p.requires_grad_(True)
        elif freeze_others:
            p.requires_grad_(False)


def _lora_parameters(model: nn.Module) -> list:
    from .mha import lora_layers  # mha imports nothing from surgery; keeps _common import-light
    return [p for m in lora_layers(model) for p in (m.lora_A, m.lora_B)
            + ((m.lora_magnitude_vector,) if getattr(m, "use_dora", False) else ())]


def _some_names(names, limit=6) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _import_optional(module: str, feature: str):
    """Import an optional dependency (extra ``hf``) and say how to get it when it is missing."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise ImportError(f"lora_kernels.{feature} needs the '{module.split('.')[0]}' package: "
                          f"pip install 'lora_kernels[hf]'") from err


def _peft_root(model: nn.Module) -> nn.Module:
    """The model PEFT's key names are relative to: the wrapped model of a PeftModel, else itself."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _check_rank(r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
