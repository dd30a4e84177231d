"""apply_lora: wrap targeted nn.Linear / GPT-2 Conv1D layers in LoRALinear."""
from torch import nn

from ..nn import LoRALinear
from ._common import (_check_rank, _check_targets, _freeze_all_but, _is_linear, _lora_parameters,
                      _matching_names, _set_submodule, _some_names)


def apply_lora(model: nn.Module, target_modules, r=8, alpha=16, dropout=0.0, use_rslora=False,
               use_dora=False) -> nn.Module:
    """Replace each targeted ``nn.Linear`` / ``Conv1D`` by a ``LoRALinear`` sharing its weight.

    Afterwards only the ``lora_A`` / ``lora_B`` parameters of the model are trainable (and, with
    ``use_dora``, the DoRA magnitudes ``lora_magnitude_vector``).
    """
    _check_rank(r)
    _check_targets(target_modules)
    names = _matching_names(model, target_modules)
    if not names:
        linear = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
                         f"its linear layers include: {_some_names(linear)}")
    _inject_lora(model, {name: (r, alpha) for name in names}, dropout, use_rslora, use_dora)
    _freeze_all_but(model, _lora_parameters(model))
    return model


def _inject_lora(model: nn.Module, plan: dict, dropout: float, use_rslora: bool, use_dora: bool = False) -> None:
    """``plan``: {qualified name: (r, alpha)}. Checks every target before replacing any (atomic)."""
    for name in plan:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"module '{name}' is already a LoRALinear")
        if not _is_linear(module):
            raise TypeError(f"LoRA target '{name}' is a {type(module).__name__}; only nn.Linear and "
                            f"transformers Conv1D can be targeted")
    for name, (r, alpha) in plan.items():
        base = model.get_submodule(name)
        lora = LoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                      use_dora=use_dora)
        lora.train(base.training)
        _set_submodule(model, name, lora)
