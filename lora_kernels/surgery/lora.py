"""apply_lora: wrap targeted nn.Linear / GPT-2 Conv1D layers in LoRALinear."""
from torch import nn

from ..nn import LoRALinear
from ._common import (_check_rank, _check_targets, _freeze_all_but, _is_linear, _lora_parameters,
                      _matching_names, _set_submodule, _some_names)
from .mha import LoRAMultiheadAttention
from .structure import check_on_forward_path, keep_fast_paths_off, off_path_reason


def apply_lora(model: nn.Module, target_modules, r=8, alpha=16, dropout=0.0, use_rslora=False,
               use_dora=False, freeze_others=True) -> nn.Module:
    """Replace each targeted ``nn.Linear`` / ``Conv1D`` by a ``LoRALinear`` sharing its weight.

    ``target_modules="all-linear"`` targets every one of them but the output head, as PEFT's keyword.
    Afterwards only the ``lora_A`` / ``lora_B`` parameters of the model are trainable (and, with
    ``use_dora``, the DoRA magnitudes ``lora_magnitude_vector``). An
    ``nn.MultiheadAttention`` target becomes a ``LoRAMultiheadAttention`` (LoRA on its in- and
    out-projections, PEFT's layout; no dropout and no DoRA there, so those are refused for it).
    An MHA's ``out_proj`` alone is refused with a ValueError: the MHA reads its weight directly
    and never calls it, so a LoRALinear there would never run. ``freeze_others=False`` leaves the
    flags of the model's other parameters as they were (the frozen base weights stay frozen).
    """
    _check_rank(r)
    _check_targets(target_modules)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    names = _all_linear_names(model) if all_linear else _matching_names(model, target_modules)
    if not names:
        linear = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
                         f"its linear layers include: {_some_names(linear)}")
    mha = [n for n in names if isinstance(model.get_submodule(n), nn.MultiheadAttention)]
    if dropout and mha:
        raise ValueError(f"dropout={dropout}: LoRA on nn.MultiheadAttention ({_some_names(mha)}) is merged into "
                         f"its weights for each call and takes no dropout (as PEFT's); use dropout=0.0")
    if use_dora and mha:
        raise ValueError(f"use_dora=True: DoRA on nn.MultiheadAttention ({_some_names(mha)}) is not supported; "
                         f"target its linear layers or use plain LoRA there")
    _inject_lora(model, {name: (r, alpha) for name in names}, dropout, use_rslora, use_dora)
    _freeze_all_but(model, _lora_parameters(model), freeze_others)
    return model


ALL_LINEAR = "all-linear"


def _all_linear_names(model: nn.Module) -> list:
    """PEFT's "all-linear": every nn.Linear / Conv1D except the module a transformers model returns
    from ``get_output_embeddings()`` (the LM head; PEFT skips it likewise), and except the layers
    inside a LoRALinear, and except those their parent never calls (an nn.MultiheadAttention's
    out_proj: a LoRA there would never run; target the MHA itself for that)."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    inside = {f"{prefix}.{sub}" for prefix, m in model.named_modules() if isinstance(m, LoRALinear)
              for sub, _ in m.named_modules() if sub}
    return [name for name, m in model.named_modules()
            if name and _is_linear(m) and m is not head and name not in inside
            and off_path_reason(model, name) is None]


def _inject_lora(model: nn.Module, plan: dict, dropout: float, use_rslora: bool, use_dora: bool = False) -> None:
    """``plan``: {qualified name: (r, alpha)}. Checks every target before replacing any (atomic)."""
    for name in plan:
        module = model.get_submodule(name)
        check_on_forward_path(model, name, "apply_lora")
        if isinstance(module, (LoRALinear, LoRAMultiheadAttention)):
            raise ValueError(f"module '{name}' is already a {type(module).__name__}")
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise ValueError(f"LoRA target '{name}': nn.MultiheadAttention with kdim/vdim != embed_dim "
                                 f"(separate q/k/v weights) is not supported")
            continue
        if not _is_linear(module):
            raise TypeError(f"LoRA target '{name}' is a {type(module).__name__}; only nn.Linear, "
                            f"transformers Conv1D and nn.MultiheadAttention can be targeted")
    for name, (r, alpha) in plan.items():
        base = model.get_submodule(name)
        if isinstance(base, nn.MultiheadAttention):
            lora = LoRAMultiheadAttention(base, r=r, alpha=alpha, use_rslora=use_rslora)
        else:
            lora = LoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                          use_dora=use_dora)
        lora.train(base.training)
        _set_submodule(model, name, lora)
    keep_fast_paths_off(model, plan)
