"""from_peft: PEFT's LoRA layers become LoRALinear sharing the same tensors, and the PeftModel's
own save/merge/unload methods and adapter switches keep working on the result."""
import contextlib
import functools
import math
import os
import warnings

import torch
from torch import nn

from ..nn import LoRALinear, multi
from ..nn.lora import _is_conv1d
from ._common import _import_optional, _in_out_features, _is_linear, _set_submodule
from .mha import LoRAMultiheadAttention, lora_layers
from .batching import adapter_batch
from .peft_format import save_adapter
from . import peft_status


def _is_peft_lora_layer(module: nn.Module) -> bool:
    """Duck-typed ``peft.tuners.lora.LoraLayer`` (any of its Linear/Embedding/Conv variants)."""
    return (hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(module, "scaling", None), dict)
            and isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict))


def _alpha_for_scaling(r: int, alpha: float, use_rslora: bool, scaling: float, name: str) -> float:
    """An alpha whose LoRALinear.scaling equals PEFT's ``scaling`` bit for bit.

    PEFT computes scaling = alpha / r (or / sqrt(r)) like LoRALinear, but ``set_scale`` and
    friends may change it afterwards; then alpha = scaling·r, nudged by an ulp if rounding bites.
    """
    denom = math.sqrt(r) if use_rslora else r
    candidate = alpha if alpha / denom == scaling else scaling * denom
    for _ in range(8):
        got = candidate / denom
        if got == scaling:
            return candidate
        candidate = math.nextafter(candidate, math.inf if got < scaling else -math.inf)
    raise ValueError(f"{name}: no alpha reproduces PEFT's scaling {scaling!r} with r={r}")


def _lora_from_peft_layer(name: str, layer: nn.Module):
    """A LoRALinear sharing ``layer``'s tensors, all its adapters (the active one first, and
    active; a layer the active adapter does not touch gets none active, as in PEFT), or None
    for an nn.MultiheadAttention the active adapter does not touch."""
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{name}: from_peft converts exactly one active adapter, this layer has {active}")
    adapter = active[0]
    base = layer.base_layer
    mha = isinstance(base, nn.MultiheadAttention)
    if not (_is_linear(base) or mha):
        raise TypeError(f"{name}: PEFT LoRA on {type(base).__name__} is not supported by from_peft; "
                        f"only nn.Linear, transformers Conv1D and nn.MultiheadAttention base layers are")
    held = list(layer.lora_A)
    if not held or (mha and adapter not in held):
        return None
    if layer.merged:
        raise ValueError(f"{name}: the PEFT adapter is merged; unmerge it before from_peft")
    inactive = adapter not in held  # the layer gives its base output until set_adapter picks one it holds
    adapter = held[0] if inactive else adapter
    others = [a for a in held if a != adapter]
    if mha:
        if others:
            raise ValueError(f"{name}: LoRA on nn.MultiheadAttention with several adapters ({[adapter] + others}) "
                             f"is not supported by from_peft (one adapter there)")
        _adapter_tensors(name, layer, adapter)  # the same checks
        return _mha_from_peft_layer(name, layer, adapter)
    A, B, magnitude, settings = _adapter_tensors(name, layer, adapter)
    in_f, out_f = _in_out_features(base)
    use_dora = magnitude is not None
    lora = LoRALinear(in_f, out_f, r=settings["r"], alpha=settings["alpha"], dropout=settings["dropout"], bias=False,
                      use_rslora=settings["use_rslora"], fan_in_fan_out=_is_conv1d(base), use_dora=use_dora,
                      device="meta", dtype=base.weight.dtype)
    multi.rename(lora, "default", adapter)
    # The very same Parameter objects: optimizer state and requires_grad flags carry over.
    lora.weight, lora.bias, lora.lora_A, lora.lora_B = base.weight, base.bias, A, B
    if use_dora:
        lora.lora_magnitude_vector = magnitude
    for other in others:
        A, B, magnitude, settings = _adapter_tensors(name, layer, other)
        if (magnitude is not None) != use_dora:
            raise ValueError(f"{name}: adapters {adapter!r} and {other!r} differ in use_dora; one LoRALinear "
                             f"holds DoRA adapters only or plain LoRA adapters only")
        multi.adopt(lora, other, A, B, magnitude, **settings)
    lora.train(layer.lora_dropout[adapter].training)  # PEFT's dropout module decides whether its dropout is active
    lora.enable_adapters(not layer.disable_adapters)
    if inactive:
        lora.set_adapter(None)
    return lora


def _adapter_tensors(name: str, layer: nn.Module, adapter: str):
    """(lora_A, lora_B, DoRA magnitude or None, settings) of one PEFT adapter, checked; the
    settings' alpha reproduces PEFT's scaling bit for bit."""
    base = layer.base_layer
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    use_dora = bool(getattr(layer, "use_dora", {}).get(adapter, False))
    if variant is not None and not (use_dora and type(variant).__name__ == "DoraLinearVariant"):
        raise ValueError(f"{name}: LoRA variant {type(variant).__name__} is not supported by from_peft "
                         "(plain LoRA and DoRA on Linear/Conv1D only)")
    magnitude = layer.lora_magnitude_vector[adapter].weight if use_dora else None
    lin_A, lin_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if not isinstance(lin_A, nn.Linear) or lin_A.bias is not None or lin_B.bias is not None:
        raise ValueError(f"{name}: only bias-free nn.Linear lora_A/lora_B are supported (lora_bias=False)")
    drop = layer.lora_dropout[adapter]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        raise TypeError(f"{name}: unsupported lora_dropout module {type(drop).__name__}")
    w = base.in_proj_weight if isinstance(base, nn.MultiheadAttention) else base.weight
    A, B = lin_A.weight, lin_B.weight
    if any((t.dtype, t.device) != (w.dtype, w.device) for t in (A, B) + ((magnitude,) if use_dora else ())):
        raise ValueError(f"{name}: LoRA weights are {A.dtype} on {A.device} but the base weight is {w.dtype} on "
                         f"{w.device}; the fused layer needs one dtype (create the PEFT model with "
                         f"autocast_adapter_dtype=False, or cast the model)")
    r, use_rslora = layer.r[adapter], bool(layer.use_rslora.get(adapter, False))
    alpha = _alpha_for_scaling(r, layer.lora_alpha[adapter], use_rslora, layer.scaling[adapter], name)
    settings = {"r": r, "alpha": alpha, "dropout": drop.p if isinstance(drop, nn.Dropout) else 0.0,
                "use_rslora": use_rslora}
    return A, B, magnitude, settings


def _mha_from_peft_layer(name: str, layer: nn.Module, adapter: str) -> LoRAMultiheadAttention:
    """PEFT's lora.MultiheadAttention as a LoRAMultiheadAttention sharing its tensors; its
    out_proj (a PEFT Linear) is converted on its own, as the next layer from_peft meets."""
    base, A, B = layer.base_layer, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    w = base.in_proj_weight
    if (A.dtype, A.device) != (w.dtype, w.device) or (B.dtype, B.device) != (w.dtype, w.device):
        raise ValueError(f"{name}: LoRA weights are {A.dtype} on {A.device} but the base weight is {w.dtype} on "
                         f"{w.device}; create the PEFT model with autocast_adapter_dtype=False, or cast the model")
    r, use_rslora = layer.r[adapter], bool(layer.use_rslora.get(adapter, False))
    lora = LoRAMultiheadAttention(base, r=r, alpha=layer.lora_alpha[adapter], use_rslora=use_rslora,
                                  _out_proj=base.out_proj)
    lora.alpha = _alpha_for_scaling(r, lora.alpha, use_rslora, layer.scaling[adapter], name)
    lora.lora_A, lora.lora_B = A, B
    lora.disable_adapters = bool(layer.disable_adapters)
    lora._peft_adapter = adapter  # the only adapter from_peft converts there (set_adapter checks it)
    return lora.train(layer.training)


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Swap each PEFT LoRA layer (Linear / Conv1D base) for a ``LoRALinear`` sharing its tensors.

    Outputs and gradients are those of the PEFT model. Every adapter of each layer is converted
    (the active one active; one LoRALinear holds plain LoRA adapters or DoRA ones, not both;
    an nn.MultiheadAttention only its one adapter). Works in place on a ``PeftModel`` and returns it.

    PEFT's own ``save_pretrained``, ``merge_and_unload`` and ``unload`` look for PEFT layers and,
    finding none, would write an empty adapter, or hand back a model still holding (unmerged)
    ``LoRALinear``s whose update a plain checkpoint loses, without a word. So on the returned
    model ``save_pretrained`` writes through ``save_adapter`` (PEFT's format and directory layout,
    one folder per adapter), and ``merge_and_unload`` / ``unload`` fold in (or drop) each active
    update and put back plain ``nn.Linear`` / ``Conv1D`` layers holding the same weight and bias.

    PEFT's switches act on PEFT's layers only and, finding none, raise "No adapter layers found"
    or do nothing; so ``disable_adapter()`` (context manager), ``disable_adapter_layers()`` /
    ``enable_adapter_layers()``, ``merge_adapter()`` / ``unmerge_adapter()``,
    ``set_adapter(name)`` and ``delete_adapter(name)`` are routed to the ``LoRALinear`` layers too, with PEFT's outputs; and
    PEFT's mixed batches, ``peft_model(..., adapter_names=[...])`` and ``generate(...,
    adapter_names=...)``, run through ``lk.adapter_batch`` (in training mode too, which PEFT refuses).
    ``get_layer_status()`` / ``get_model_status()`` report the LoRALinear layers as PEFT reports its
    own. PEFT cannot inject a new adapter into them: ``add_adapter`` (and ``load_adapter`` of a new
    name) raises and says what to do instead (add adapters before from_peft, or ``lk.load_adapter``).
    """
    # Without peft there is no PEFT model; say how to install it rather than "no LoRA layer found".
    _import_optional("peft", "from_peft")
    layers = [(name, m) for name, m in peft_model.named_modules() if _is_peft_lora_layer(m)]
    if not layers:
        raise ValueError(f"from_peft: no PEFT LoRA layer found in {type(peft_model).__name__}")
    replacements = [(name, _lora_from_peft_layer(name, m)) for name, m in layers]  # all checks first
    for name, lora in replacements:
        if lora is not None:
            _set_submodule(peft_model, name, lora)
    converted = [m for (_, m), (_, lora) in zip(layers, replacements) if lora is not None]
    if converted:
        _route_peft_methods(peft_model)
        _route_peft_switches(peft_model)
        peft_status.route(peft_model)
    return peft_model


def _route_peft_methods(peft_model: nn.Module) -> None:
    """Instance attributes over PEFT's methods (on the PeftModel and on its LoraModel, which
    PeftModel forwards to); a partial pickles and deep-copies with the model, the copy's
    partial pointing at the copy."""
    if callable(getattr(peft_model, "save_pretrained", None)):
        peft_model.save_pretrained = functools.partial(_save_pretrained, peft_model)
    lora_model = getattr(peft_model, "base_model", None)
    if callable(getattr(lora_model, "merge_and_unload", None)) and callable(getattr(lora_model, "unload", None)):
        for owner in (peft_model, lora_model):
            owner.merge_and_unload = functools.partial(_unload, peft_model, lora_model, True)
            owner.unload = functools.partial(_unload, peft_model, lora_model, False)


def _save_pretrained(peft_model, save_directory, *_args, is_main_process=True, selected_adapters=None, **_kwargs):
    """``PeftModel.save_pretrained`` after ``from_peft``: the LoRALinear layers in PEFT's format,
    each adapter where PEFT puts it (``default`` in save_directory, adapter ``a`` in
    ``save_directory/a``). Options about PEFT's own layers (embedding layers) have nothing to act on."""
    if not is_main_process:
        return
    configs = getattr(peft_model, "peft_config", {})
    if len(configs) <= 1:
        config = next(iter(configs.values()), None)
        save_adapter(peft_model, save_directory, getattr(config, "base_model_name_or_path", None))
        return
    held = {a for m in _loras(peft_model) if isinstance(m, LoRALinear) for a in m.adapter_names}
    for name in (selected_adapters or list(configs)):
        if name not in configs:
            raise ValueError(f"save_pretrained: unknown adapter {name!r}; the model has {list(configs)}")
        if name in held:
            path = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter(peft_model, path, configs[name].base_model_name_or_path, adapter_name=name)


def _unload(peft_model, lora_model, merge: bool, *_args, **_kwargs) -> nn.Module:
    """PEFT's ``merge_and_unload`` (merge=True) or ``unload`` after ``from_peft``: each LoRALinear
    becomes its base layer again, merged or not; then PEFT's own method unloads the layers
    from_peft left alone (no active adapter there) and returns the bare model."""
    # MHAs first: each leaves its nn.MultiheadAttention, whose out_proj LoRALinear the second pass meets.
    for kind in (LoRAMultiheadAttention, LoRALinear):
        for name, module in list(peft_model.named_modules()):
            if isinstance(module, kind):
                if merge:
                    module.merge()
                else:
                    module.unmerge()
                _set_submodule(peft_model, name, module.base_layer if kind is LoRAMultiheadAttention
                               else _base_layer(module))
    method = type(lora_model).merge_and_unload if merge else type(lora_model).unload
    return method(lora_model, *_args, **_kwargs)


def _base_layer(lora: LoRALinear) -> nn.Module:
    """An nn.Linear (GPT-2 Conv1D for the [in, out] layout) holding ``lora``'s weight and bias."""
    with torch.device("meta"):  # the Parameters are replaced at once: allocate nothing
        if lora.fan_in_fan_out:
            conv1d = _import_optional("transformers.pytorch_utils", "merge_and_unload").Conv1D
            layer = conv1d(lora.out_features, lora.in_features)
        else:
            layer = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None)
    layer.weight, layer.bias = lora.weight, lora.bias
    return layer.train(lora.training)


# --------------------------------------------------------------------------- PEFT's switches

def _route_peft_switches(peft_model: nn.Module) -> None:
    """PEFT's adapter switches as instance attributes of the LoraModel (PeftModel forwards its
    merge/enable/... calls there) and of the PeftModel (``disable_adapter``, ``set_adapter``),
    and PEFT's ``adapter_names=`` (its forward-hook context) routed to ``adapter_batch``."""
    lora_model = getattr(peft_model, "base_model", None)
    if not all(callable(getattr(lora_model, m, None)) for m in
               ("enable_adapter_layers", "disable_adapter_layers", "merge_adapter", "unmerge_adapter", "set_adapter")):
        return
    lora_model.enable_adapter_layers = functools.partial(_enable_layers, peft_model, lora_model, True)
    lora_model.disable_adapter_layers = functools.partial(_enable_layers, peft_model, lora_model, False)
    lora_model.merge_adapter = functools.partial(_merge_adapter, peft_model, lora_model)
    lora_model.unmerge_adapter = functools.partial(_unmerge_adapter, peft_model, lora_model)
    lora_model.set_adapter = functools.partial(_set_adapter, peft_model, lora_model)
    if callable(getattr(lora_model, "delete_adapter", None)):
        lora_model.delete_adapter = functools.partial(_delete_adapter, peft_model, lora_model)
    if callable(getattr(peft_model, "disable_adapter", None)) and peft_model is not lora_model:
        peft_model.disable_adapter = functools.partial(_disable_adapter, peft_model, lora_model)
    if callable(getattr(lora_model, "_enable_peft_forward_hooks", None)):
        lora_model._enable_peft_forward_hooks = functools.partial(_forward_hooks, peft_model, lora_model)


def _loras(peft_model) -> list:
    return lora_layers(peft_model)


def _peft_layers_left(peft_model) -> bool:
    """PEFT layers from_peft left alone (the active adapter does not touch them)."""
    return any(_is_peft_lora_layer(m) for m in peft_model.modules())


def _held_parameters(lora) -> dict:
    """{adapter: its parameters} of a LoRALinear or LoRAMultiheadAttention."""
    if isinstance(lora, LoRAMultiheadAttention):
        return {lora.__dict__.get("_peft_adapter", "default"): [lora.lora_A, lora.lora_B]}
    return {a: multi.adapter_parameters(lora, a) for a in lora.adapter_names}


def _enable_layers(peft_model, lora_model, enabled: bool) -> None:
    """PEFT's layer switch, requires_grad included: disabled freezes every adapter; enabled makes
    the active adapter trainable and the others frozen (PEFT's layer-level set_adapter)."""
    for lora in _loras(peft_model):
        lora.enable_adapters(enabled)
        active = getattr(lora, "active_adapter", None) if isinstance(lora, LoRALinear) else \
            lora.__dict__.get("_peft_adapter", "default")
        for adapter, params in _held_parameters(lora).items():
            for p in params:
                p.requires_grad_(enabled and adapter == active)
    method = type(lora_model).enable_adapter_layers if enabled else type(lora_model).disable_adapter_layers
    method(lora_model)  # PEFT's own: its warnings (bias) and the layers left alone


@contextlib.contextmanager
def _disable_adapter(peft_model, lora_model):
    """``PeftModel.disable_adapter()`` with PEFT's rule: the base model inside; after, every layer
    enabled (active adapter trainable) unless all were disabled before."""
    enabled = peft_model.get_model_status().enabled
    if enabled == "irregular":
        warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                      "After exiting the disable_adapter context, all adapters will be enabled")
    was_disabled = getattr(peft_model, "_adapters_disabled", False)
    try:
        lora_model.disable_adapter_layers()
        peft_model._adapters_disabled = True
        yield
    finally:
        if enabled is not False:
            lora_model.enable_adapter_layers()
        peft_model._adapters_disabled = was_disabled


def _active(lora_model) -> str:
    active = lora_model.active_adapter
    return active if isinstance(active, str) else active[0]


def _merge_adapter(peft_model, lora_model, adapter_names=None, safe_merge=False) -> None:
    adapter = _active(lora_model)
    if adapter_names is not None and list(adapter_names) != [adapter]:
        raise ValueError(f"merge_adapter(adapter_names={adapter_names!r}): after from_peft the model merges "
                         f"only adapter {adapter!r}, the active one")
    getattr(lora_model, "_check_merge_allowed", lambda: None)()
    loras = [m for m in _loras(peft_model) if not m.merged]
    if safe_merge:
        for lora in loras:
            if getattr(lora, "active_adapter", adapter) is not None and not torch.isfinite(
                    lora.base_weight().float() + lora.delta_weight()).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
    for lora in loras:
        lora.merge()
    if _peft_layers_left(peft_model):
        type(lora_model).merge_adapter(lora_model, adapter_names=adapter_names, safe_merge=safe_merge)


def _unmerge_adapter(peft_model, lora_model) -> None:
    for lora in _loras(peft_model):
        lora.unmerge()
    if _peft_layers_left(peft_model):
        type(lora_model).unmerge_adapter(lora_model)


def _set_adapter(peft_model, lora_model, adapter_name, inference_mode=False) -> None:
    """PEFT's ``set_adapter``: each LoRALinear holding the adapter runs it (with its tensors
    trainable unless ``inference_mode``, the other adapters' frozen, as PEFT does); a layer
    without it gives its base output. Several active adapters at once are not supported."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if len(names) != 1:
        raise ValueError(f"set_adapter({adapter_name!r}): after from_peft one adapter is active at a time")
    name = names[0]
    configs = getattr(peft_model, "peft_config", {})
    if configs and name not in configs:
        raise ValueError(f"set_adapter({name!r}): the model holds no such adapter (from_peft converted "
                         f"only the adapter that was active and those loaded beside it: {list(configs)})")
    loras = _loras(peft_model)
    for mha in (m for m in loras if isinstance(m, LoRAMultiheadAttention)):
        if name != mha.__dict__.get("_peft_adapter", name):
            raise ValueError(f"set_adapter({name!r}): the model has LoRA on nn.MultiheadAttention, converted with "
                             f"adapter {mha._peft_adapter!r} only")
    if any(m.merged for m in loras):
        warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
    for lora in loras:
        lora.unmerge()
        if isinstance(lora, LoRAMultiheadAttention):
            held = {name: (lora.lora_A, lora.lora_B)}
        else:
            lora.set_adapter(name if name in lora.adapter_names else None)
            held = {a: multi.adapter_parameters(lora, a) for a in lora.adapter_names}
        for a, params in held.items():
            for p in params:
                p.requires_grad_(a == name and not inference_mode)
    type(lora_model).set_adapter(lora_model, adapter_name, inference_mode=inference_mode)


def _delete_adapter(peft_model, lora_model, adapter_name: str) -> None:
    """PEFT's ``delete_adapter``: the adapter leaves every LoRALinear (a layer left with none
    becomes its base layer again); if it was active, the first remaining adapter (sorted, as
    PEFT picks it) becomes active everywhere."""
    configs = getattr(lora_model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name} does not exist")
    if any(getattr(m, "_peft_adapter", None) == adapter_name for m in _loras(peft_model)):
        raise ValueError(f"delete_adapter({adapter_name!r}): it is the adapter of a LoRA on nn.MultiheadAttention, "
                         f"which cannot be left without one; use unload()")
    holding = [(name, m) for name, m in peft_model.named_modules()
               if isinstance(m, LoRALinear) and adapter_name in m.adapter_names]
    if any(m.merged and m.active_adapter == adapter_name for _, m in holding):
        raise ValueError(f"Cannot delete adapter {adapter_name!r}: it is merged; call unmerge_adapter() first")
    was_active = _active(lora_model) == adapter_name
    for name, lora in holding:
        if lora.adapter_names == [adapter_name]:
            lora.unmerge()
            _set_submodule(peft_model, name, _base_layer(lora))
        else:
            lora.delete_adapter(adapter_name)
    type(lora_model).delete_adapter(lora_model, adapter_name)  # the config, and PEFT layers from_peft left alone
    remaining = sorted(configs)
    if was_active and remaining:
        warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                      f"{remaining[0]}.")
        _set_adapter(peft_model, lora_model, remaining[0])


@contextlib.contextmanager
def _forward_hooks(peft_model, lora_model, *args, **kwargs):
    """PEFT's ``adapter_names=[...]`` (forward, generate) as ``adapter_batch`` over the LoRALinear
    layers; PEFT's ``"__base__"`` is None there. Unlike PEFT this also runs in training mode.
    Beam search repeats each sample ``num_beams`` times, so each name is repeated as PEFT does."""
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        with type(lora_model)._enable_peft_forward_hooks(lora_model, *args, **kwargs):
            yield
        return
    configs = getattr(peft_model, "peft_config", {})
    unknown = sorted({n for n in adapter_names if n != "__base__"} - set(configs))
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    per_sample, beams = list(adapter_names), kwargs.get("num_beams")
    if isinstance(beams, int) and beams > 1:
        adapter_names = [n for n in adapter_names for _ in range(beams)]
    # PEFT layers from_peft left alone (the active adapter does not touch them) get PEFT's own hook.
    handles = [m.register_forward_pre_hook(functools.partial(_names_hook, names=list(adapter_names)),
                                           with_kwargs=True)
               for m in peft_model.modules() if _is_peft_lora_layer(m)]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(adapter_batch(peft_model, _held_or_none(peft_model, adapter_names)))
            encoder = _encoder(lora_model)
            if adapter_names != per_sample and encoder is not None and any(
                    isinstance(m, LoRALinear) for m in encoder.modules()):
                # An encoder runs on the samples before beam search repeats them (PEFT's rule too).
                stack.enter_context(adapter_batch(encoder, _held_or_none(encoder, per_sample)))
            yield
    finally:
        for handle in handles:
            handle.remove()


def _held_or_none(model: nn.Module, names: list) -> list:
    """PEFT's names for adapter_batch: None for "__base__" and for adapters no LoRALinear of model holds."""
    held = {a for m in model.modules() if isinstance(m, LoRALinear) for a in m.adapter_names}
    return [n if n in held else None for n in names]


def _encoder(lora_model):
    model = getattr(lora_model, "model", None)
    encoder = model.get_encoder() if callable(getattr(model, "get_encoder", None)) else None
    return None if encoder is model else encoder


def _names_hook(_module, args, kwargs, names):
    kwargs["adapter_names"] = names
    return args, kwargs
