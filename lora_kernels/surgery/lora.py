"""apply_lora: wrap targeted nn.Linear / GPT-2 Conv1D layers in LoRALinear."""
from torch import nn

from ..nn import LoRALinear
from ._common import (_check_rank, _check_targets, _freeze_all_but, _is_linear, _lora_parameters,
                      _matching_names, _set_submodule, _some_names)


def apply_lora(model: nn.Module, target_modules, r=8, alpha=16, dropout=0.0, use_rslora=False) -> nn.Module:
    """Replace each targeted ``nn.Linear`` / ``Conv1D`` by a ``LoRALinear`` sharing its weight.

    ``target_modules="all-linear"`` targets every one of them but the output head, as PEFT's keyword.
    Afterwards only the ``lora_A`` / ``lora_B`` parameters of the model are trainable.
    """
    _check_rank(r)
    _check_targets(target_modules)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    names = _all_linear_names(model) if all_linear else _matching_names(model, target_modules)
    if not names:
        linear = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
                         f"its linear layers include: {_some_names(linear)}")
    _inject_lora(model, {name: (r, alpha) for name in names}, dropout, use_rslora)
    _freeze_all_but(model, _lora_parameters(model))
    return model


ALL_LINEAR = "all-linear"


def _all_linear_names(model: nn.Module) -> list:
    """PEFT's "all-linear": every nn.Linear / Conv1D except the module a transformers model returns
    from ``get_output_embeddings()`` (the LM head; PEFT skips it likewise), and except the layers
    inside a LoRALinear."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    inside = {f"{prefix}.{sub}" for prefix, m in model.named_modules() if isinstance(m, LoRALinear)
              for sub, _ in m.named_modules() if sub}
    return [name for name, m in model.named_modules()
            if name and _is_linear(m) and m is not head and name not in inside]


def _inject_lora(model: nn.Module, plan: dict, dropout: float, use_rslora: bool) -> None:
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
        lora = LoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        lora.train(base.training)
        _set_submodule(model, name, lora)
