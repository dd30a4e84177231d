"""PEFT's ``get_layer_status`` / ``get_model_status`` and ``add_adapter`` after ``from_peft``.

PEFT finds its layers by class; after ``from_peft`` it finds none (or only those left alone) and
``get_layer_status`` raises "No adapter layers found". Routed here, each ``LoRALinear`` and
``LoRAMultiheadAttention`` reports a ``TunerLayerStatus`` of its own, in module order beside
PEFT's for the layers from_peft left alone; ``get_model_status`` then aggregates them with
PEFT's own rules (its function, with its layer lister pointed here for the call)."""
import functools

from torch import nn

from ..nn import LoRALinear, multi
from .mha import LoRAMultiheadAttention

MODULE_TYPES = {LoRALinear: "lora_kernels.LoRALinear", LoRAMultiheadAttention: "lora_kernels.LoRAMultiheadAttention"}


def route(peft_model: nn.Module) -> None:
    """Instance attributes over the PeftModel's status methods and its ``add_adapter``."""
    peft_module = _peft_model_module()
    if peft_module is None or not isinstance(peft_model, peft_module.PeftModel):
        return
    peft_model.get_layer_status = functools.partial(layer_status, peft_model)
    peft_model.get_model_status = functools.partial(model_status, peft_model)
    if callable(getattr(peft_model, "add_adapter", None)):
        peft_model.add_adapter = functools.partial(_add_adapter_refused, peft_model)


def _peft_model_module():
    try:
        from peft import peft_model as module
    except ImportError:
        return None
    return module if hasattr(module, "TunerLayerStatus") and hasattr(module, "get_layer_status") else None


def _uniform(flags: list):
    """PEFT's rule: True or False when every flag agrees, else "irregular"."""
    return flags[0] if flags and all(f == flags[0] for f in flags) and isinstance(flags[0], bool) else "irregular"


def _status(name: str, module: nn.Module, status_cls, model_active: list):
    """A layer's TunerLayerStatus. Its active adapters are the model's, as a PEFT layer reports
    them even where it does not hold that adapter (and then gives its base output, as ours does)."""
    if isinstance(module, LoRAMultiheadAttention):
        held = {module.__dict__.get("_peft_adapter", "default"): [module.lora_A, module.lora_B]}
        running = next(iter(held))
    else:
        held = {a: multi.adapter_parameters(module, a) for a in module.adapter_names}
        running = module.active_adapter
    return status_cls(
        name=name, module_type=MODULE_TYPES[type(module)], enabled=not module.disable_adapters,
        active_adapters=list(model_active), merged_adapters=[running] if module.merged and running else [],
        requires_grad={a: _uniform([p.requires_grad for p in params]) for a, params in held.items()},
        available_adapters=sorted(held),
        devices={a: sorted({p.device.type for p in params}) for a, params in held.items()},
        quantization_backend=None)


def layer_status(peft_model: nn.Module, peft_lister=None) -> list:
    """``PeftModel.get_layer_status()`` after from_peft: one ``TunerLayerStatus`` per LoRA layer,
    ours and PEFT's (the layers from_peft left alone, listed by ``peft_lister``, PEFT's own
    function), named as PEFT names them."""
    peft_module = _peft_model_module()
    base_model = peft_model.base_model
    try:
        theirs = {s.name: s for s in (peft_lister or peft_module.get_layer_status)(peft_model)}
    except ValueError:  # PEFT's "No adapter layers found": from_peft left none of its layers
        theirs = {}
    active = getattr(base_model, "active_adapter", None)
    model_active = [] if active is None else [active] if isinstance(active, str) else list(active)
    found = []
    for name, module in base_model.named_modules():
        if type(module) in MODULE_TYPES:
            found.append(_status(name, module, peft_module.TunerLayerStatus, model_active))
        elif name in theirs:
            found.append(theirs[name])
    if not found:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model.")
    return found


def model_status(peft_model: nn.Module):
    """``PeftModel.get_model_status()`` after from_peft: PEFT's aggregation over ``layer_status``
    (PEFT's module-level lister is swapped for ours during the call; not thread-safe, like PEFT's
    other switches)."""
    peft_module = _peft_model_module()
    own = peft_module.get_layer_status
    peft_module.get_layer_status = functools.partial(layer_status, peft_lister=own)
    try:
        return peft_module.get_model_status(peft_model)
    finally:
        peft_module.get_layer_status = own


def _add_adapter_refused(peft_model, adapter_name, *_args, **_kwargs):
    held = sorted({a for m in peft_model.modules() if isinstance(m, LoRALinear) for a in m.adapter_names})
    raise NotImplementedError(
        f"add_adapter({adapter_name!r}) after from_peft: PEFT cannot inject into lora_kernels layers. Add or load "
        f"every adapter on the PEFT model before calling lk.from_peft (it converts them all; held now: {held}), "
        f"or add one to a layer directly with LoRALinear.add_adapter / lk.load_adapter(..., adapter_name=...)")
