"""Model surgery: turn a pretrained model into a PEFT model that runs on the fused modules.

Every function edits the model in place and returns it, and leaves trainable exactly the
parameters of the method:

* ``apply_lora``   — wrap the targeted ``nn.Linear`` / GPT-2 ``Conv1D`` layers in ``LoRALinear``.
* ``add_adapters`` — insert a ``BottleneckAdapter`` after attention and/or FFN output projections.
* ``ln_tuning``    — swap every ``nn.LayerNorm`` for ``FusedLayerNorm``; train only LayerNorms.
* ``bitfit``       — train only the biases.
* ``from_peft``    — swap a PEFT model's LoRA layers for ``LoRALinear``, sharing the same tensors.
* ``save_adapter`` / ``load_adapter`` — LoRA weights in PEFT's on-disk format, so adapters move
  freely between this package and ``peft.PeftModel``.

Module names follow PEFT's conventions: a list of target names matches a module whose
qualified name equals an entry or ends with ``"." + entry``; a string is a regular expression
that must match the whole qualified name.
"""
import functools
import json
import math
import os
import re
from collections import Counter

import torch
from torch import nn

from .nn import BottleneckAdapter, FusedLayerNorm, LoRALinear
from .nn.lora import _is_conv1d

__all__ = ["apply_lora", "add_adapters", "ln_tuning", "bitfit", "from_peft", "save_adapter", "load_adapter",
           "AdapterAfter"]

# PEFT's file names and key layout (checked against peft 0.21 ``save_pretrained``).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
KEY_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}


# --------------------------------------------------------------------------- shared helpers

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


def _freeze_all_but(model: nn.Module, keep) -> None:
    """requires_grad = True exactly for the parameters in ``keep`` (compared by identity)."""
    keep_ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep_ids)


def _lora_parameters(model: nn.Module) -> list:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


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


# --------------------------------------------------------------------------- LoRA

def _check_rank(r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")


def apply_lora(model: nn.Module, target_modules, r=8, alpha=16, dropout=0.0, use_rslora=False) -> nn.Module:
    """Replace each targeted ``nn.Linear`` / ``Conv1D`` by a ``LoRALinear`` sharing its weight.

    Afterwards only the ``lora_A`` / ``lora_B`` parameters of the model are trainable.
    """
    _check_rank(r)
    _check_targets(target_modules)
    names = _matching_names(model, target_modules)
    if not names:
        linear = [n for n, m in model.named_modules() if _is_linear(m)]
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
                         f"its linear layers include: {_some_names(linear)}")
    _inject_lora(model, {name: (r, alpha) for name in names}, dropout, use_rslora)
    _freeze_all_but(model, _lora_parameters(model))
    return model


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


# --------------------------------------------------------------------------- bottleneck adapters

class AdapterAfter(nn.Module):
    """Runs ``module`` and then ``adapter`` on its output.

    Wrapping (rather than patching forwards) keeps the original projection reachable as
    ``<name>.module`` and the adapter as ``<name>.adapter``.
    """

    def __init__(self, module: nn.Module, adapter: nn.Module):
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.module(*args, **kwargs))

    def __getattr__(self, name):
        # Model code sometimes reads a projection's attributes (``.weight.dtype``, ``.nf``): delegate.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("module", "adapter"):
                raise
            return getattr(self.module, name)


# Sub-layer output projections, each added to the residual stream right after (dropout aside).
ATTENTION_OUTPUTS = ("attention.output.dense", "crossattention.output.dense",     # BERT, old ViT
                     "attn.c_proj", "crossattention.c_proj",                        # GPT-2
                     "self_attn.out_proj", "self_attn.o_proj", "attention.o_proj")  # CLIP, Llama, ViT (v5)
FFN_OUTPUTS = ("output.dense",                                                      # BERT, old ViT
               "mlp.c_proj", "mlp.fc2", "mlp.down_proj")                            # GPT-2, CLIP/ViT, Llama
PLACEMENTS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}


def _sublayer_outputs(model: nn.Module) -> dict:
    """{"attention": [names], "ffn": [names]}; attention patterns win ('attention.output.dense'
    also ends with 'output.dense')."""
    found = {"attention": [], "ffn": []}
    for name, _ in model.named_modules():
        if _name_matches(name, ATTENTION_OUTPUTS):
            found["attention"].append(name)
        elif _name_matches(name, FFN_OUTPUTS):
            found["ffn"].append(name)
    return found


def add_adapters(model: nn.Module, placement="houlsby", bottleneck=64, activation="gelu", scale=1.0) -> nn.Module:
    """Insert a ``BottleneckAdapter`` after sub-layer output projections, before the residual add.

    "houlsby": after the attention output and the FFN output of every layer; "pfeiffer": after
    the FFN output only. Afterwards only the adapters' parameters are trainable.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {placement!r}")
    found = _sublayer_outputs(model)
    for kind in PLACEMENTS[placement]:
        if not found[kind]:
            patterns = ATTENTION_OUTPUTS if kind == "attention" else FFN_OUTPUTS
            raise ValueError(f"add_adapters({placement!r}) found no {kind} output projection in "
                             f"{type(model).__name__}; looked for module names ending in {patterns}")
    names = [name for kind in PLACEMENTS[placement] for name in found[kind]]
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdapterAfter):
            raise ValueError(f"module '{name}' already has an adapter")
        if not (_is_linear(module) or isinstance(module, LoRALinear)):
            raise TypeError(f"'{name}' is a {type(module).__name__}, not a linear projection")
    adapters = []
    for name in names:
        module = model.get_submodule(name)
        w = module.weight
        adapter = BottleneckAdapter(_in_out_features(module)[1], bottleneck=bottleneck, activation=activation,
                                    scale=scale, device=w.device, dtype=w.dtype)
        adapter.train(module.training)
        _set_submodule(model, name, AdapterAfter(module, adapter))
        adapters.append(adapter)
    _freeze_all_but(model, [p for a in adapters for p in a.parameters()])
    return model


# --------------------------------------------------------------------------- LN-tuning, BitFit

def ln_tuning(model: nn.Module) -> nn.Module:
    """Replace every ``nn.LayerNorm`` by a ``FusedLayerNorm`` sharing its parameters and train only those."""
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.LayerNorm) and not isinstance(module, FusedLayerNorm):
            fused = FusedLayerNorm.from_layer_norm(module)  # shares the Parameter objects
            fused.train(module.training)
            _set_submodule(model, name, fused)
    norms = [m for m in model.modules() if isinstance(m, FusedLayerNorm)]
    if not norms:
        raise ValueError(f"ln_tuning: {type(model).__name__} has no nn.LayerNorm submodule")
    _freeze_all_but(model, [p for m in norms for p in (m.weight, m.bias) if p is not None])
    return model


def bitfit(model: nn.Module) -> nn.Module:
    """Train only the parameters whose name ends in 'bias'."""
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    if not biases:
        raise ValueError(f"bitfit: {type(model).__name__} has no parameter whose name ends in 'bias'")
    _freeze_all_but(model, biases)
    return model


# --------------------------------------------------------------------------- PEFT models

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
    """A LoRALinear sharing ``layer``'s tensors, or None when its active adapter does not touch it."""
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{name}: from_peft converts exactly one active adapter, this layer has {active}")
    adapter = active[0]
    base = layer.base_layer
    if not _is_linear(base):
        raise TypeError(f"{name}: PEFT LoRA on {type(base).__name__} is not supported by from_peft; "
                        f"only nn.Linear and transformers Conv1D base layers are")
    if adapter not in layer.lora_A:
        return None
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None or getattr(layer, "use_dora", {}).get(adapter, False):
        kind = type(variant).__name__ if variant is not None else "DoRA"
        raise ValueError(f"{name}: LoRA variant {kind} is not supported by from_peft (plain LoRA only)")
    if layer.merged or layer.disable_adapters:
        raise ValueError(f"{name}: the PEFT adapter is merged or disabled; unmerge/enable it before from_peft")
    lin_A, lin_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if not isinstance(lin_A, nn.Linear) or lin_A.bias is not None or lin_B.bias is not None:
        raise ValueError(f"{name}: only bias-free nn.Linear lora_A/lora_B are supported (lora_bias=False)")
    drop = layer.lora_dropout[adapter]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        raise TypeError(f"{name}: unsupported lora_dropout module {type(drop).__name__}")
    w, A, B = base.weight, lin_A.weight, lin_B.weight
    if (A.dtype, A.device) != (w.dtype, w.device) or (B.dtype, B.device) != (w.dtype, w.device):
        raise ValueError(f"{name}: LoRA weights are {A.dtype} on {A.device} but the base weight is {w.dtype} on "
                         f"{w.device}; the fused layer needs one dtype (create the PEFT model with "
                         f"autocast_adapter_dtype=False, or cast the model)")

    r, use_rslora = layer.r[adapter], bool(layer.use_rslora.get(adapter, False))
    in_f, out_f = _in_out_features(base)
    lora = LoRALinear(in_f, out_f, r=r, alpha=layer.lora_alpha[adapter],
                      dropout=drop.p if isinstance(drop, nn.Dropout) else 0.0, bias=False,
                      use_rslora=use_rslora, fan_in_fan_out=_is_conv1d(base), device="meta", dtype=w.dtype)
    lora.alpha = _alpha_for_scaling(r, lora.alpha, use_rslora, layer.scaling[adapter], name)
    # The very same Parameter objects: optimizer state and requires_grad flags carry over.
    lora.weight, lora.bias, lora.lora_A, lora.lora_B = w, base.bias, A, B
    lora.train(drop.training)  # PEFT's dropout module decides whether its dropout is active
    return lora


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Swap each PEFT LoRA layer (Linear / Conv1D base) for a ``LoRALinear`` sharing its tensors.

    Outputs and gradients are those of the PEFT model; the active adapter is converted (layers
    it does not touch are left as they are). Works in place on a ``PeftModel`` and returns it.

    PEFT's own ``save_pretrained``, ``merge_and_unload`` and ``unload`` look for PEFT layers and,
    finding none, would write an empty adapter, or hand back a model still holding (unmerged)
    ``LoRALinear``s whose update a plain checkpoint loses, without a word. So on the returned
    model ``save_pretrained`` writes through ``save_adapter`` (PEFT's format), and
    ``merge_and_unload`` / ``unload`` fold in (or drop) each update and put back plain
    ``nn.Linear`` / ``Conv1D`` layers holding the same weight and bias.
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
    if any(lora is not None for _, lora in replacements):
        _route_peft_methods(peft_model)
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


def _save_pretrained(peft_model, save_directory, *_args, is_main_process=True, **_kwargs):
    """``PeftModel.save_pretrained`` after ``from_peft``: the LoRALinear layers in PEFT's format.
    Options about PEFT's own layers (selected adapters, embedding layers) have nothing to act on."""
    if is_main_process:
        config = next(iter(getattr(peft_model, "peft_config", {}).values()), None)
        save_adapter(peft_model, save_directory, getattr(config, "base_model_name_or_path", None))


def _unload(peft_model, lora_model, merge: bool, *_args, **_kwargs) -> nn.Module:
    """PEFT's ``merge_and_unload`` (merge=True) or ``unload`` after ``from_peft``: each LoRALinear
    becomes its base layer again, merged or not; then PEFT's own method unloads the layers
    from_peft left alone (no active adapter there) and returns the bare model."""
    for name, module in list(peft_model.named_modules()):
        if isinstance(module, LoRALinear):
            if merge:
                module.merge()
            else:
                module.unmerge()
            _set_submodule(peft_model, name, _base_layer(module))
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


# --------------------------------------------------------------------------- PEFT on-disk format

def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def save_adapter(model: nn.Module, path, base_model_name_or_path=None) -> nn.Module:
    """Write the model's LoRA weights as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(base_model, path)`` loads the result. Layers whose r or
    alpha differ from the most common value go to ``rank_pattern`` / ``alpha_pattern``.
    """
    st = _import_optional("safetensors.torch", "save_adapter")
    root = _peft_root(model)
    layers = {name: m for name, m in root.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRALinear layer")
    if len({m.use_rslora for m in layers.values()}) > 1:
        raise ValueError("save_adapter: layers mix use_rslora True and False, which PEFT's config cannot express")
    r = _most_common(m.r for m in layers.values())
    alpha = _most_common(m.alpha for m in layers.values())
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": r, "lora_alpha": alpha,
        "target_modules": sorted(layers),  # full names: exactly these layers, nothing else
        "exclude_modules": None,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},
        # PEFT has one dropout for all layers: keep the most common one.
        "lora_dropout": _most_common(m.dropout for m in layers.values()),
        # PEFT corrects this per layer (Conv1D needs True, Linear False); record what GPT-2-style layers use.
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "use_rslora": first.use_rslora, "bias": "none", "lora_bias": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {}
    for name, m in layers.items():
        for key, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            tensors[KEY_PREFIX + name + KEY_SUFFIXES[key]] = param.detach().to("cpu").contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    st.save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    return model


# Config fields whose non-default value means something this loader cannot reproduce.
UNSUPPORTED_CONFIG = ("use_dora", "lora_bias", "modules_to_save", "layers_to_transform", "target_parameters",
                      "trainable_token_indices", "layer_replication", "alora_invocation_tokens", "arrow_config",
                      "use_bdlora", "velora_config", "monteclora_config", "kasa_config", "use_qalora")


def _read_config(path) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {path}")
    with open(file) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {file} has peft_type {config.get('peft_type')!r}, expected 'LORA'")
    bad = [k for k in UNSUPPORTED_CONFIG if config.get(k) not in (None, False, [], {})]
    if config.get("bias", "none") != "none":
        bad.append("bias")
    if config.get("init_lora_weights") == "mica":
        bad.append("init_lora_weights")
    if bad:
        raise ValueError(f"load_adapter: {file} uses features this loader does not support: "
                         + ", ".join(f"{k}={config[k]!r}" for k in bad))
    return config


def _read_weights(path, st) -> dict:
    """{module name: {"lora_A": tensor, "lora_B": tensor}} from PEFT's key layout."""
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        hint = " (found adapter_model.bin: save with safe_serialization=True)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {path}{hint}")
    weights, unknown = {}, []
    for key, tensor in st.load_file(file).items():
        kind = next((k for k, suffix in KEY_SUFFIXES.items() if key.endswith(suffix)), None)
        if kind is None or not key.startswith(KEY_PREFIX):
            unknown.append(key)
            continue
        weights.setdefault(key[len(KEY_PREFIX):-len(KEY_SUFFIXES[kind])], {})[kind] = tensor
    if unknown:
        raise ValueError(f"load_adapter: unexpected keys in {file} (expected '{KEY_PREFIX}<module>.lora_A.weight' "
                         f"/ '.lora_B.weight'): {_some_names(unknown)}")
    return weights


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches a '.'-suffix of name as a regex."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load a LoRA adapter saved by ``save_adapter`` or by PEFT's ``save_pretrained``.

    Targeted layers that are not LoRALinear yet get one (r/alpha from the config, with its
    rank/alpha patterns); existing LoRALinear layers take the config's alpha, dropout and rsLoRA
    flag. Every name and shape is checked before the model is touched. Only LoRA weights stay
    trainable.
    """
    st = _import_optional("safetensors.torch", "load_adapter")
    config, root = _read_config(path), _peft_root(model)
    weights = _read_weights(path, st)
    targets = config.get("target_modules")
    _check_targets(targets)
    names = _matching_names(root, targets, exclude=config.get("exclude_modules"))
    plan = {n: (_pattern_value(config.get("rank_pattern"), n, config["r"]),
                _pattern_value(config.get("alpha_pattern"), n, config["lora_alpha"])) for n in names}

    missing, unexpected = sorted(set(plan) - set(weights)), sorted(set(weights) - set(plan))
    if missing or unexpected:
        raise ValueError(f"load_adapter: {path} does not fit {type(root).__name__}: "
                         f"LoRA layers without weights: [{_some_names(missing)}]; "
                         f"weights for no targeted layer: [{_some_names(unexpected)}]")
    _check_weight_shapes(root, plan, weights)

    existing = {n for n in plan if isinstance(root.get_submodule(n), LoRALinear)}
    _inject_lora(root, {n: ra for n, ra in plan.items() if n not in existing}, config.get("lora_dropout", 0.0),
                 config.get("use_rslora", False))
    with torch.no_grad():
        for name, (r, alpha) in plan.items():
            lora = root.get_submodule(name)
            lora.alpha, lora.use_rslora = alpha, config.get("use_rslora", False)
            lora.dropout = float(config.get("lora_dropout", 0.0))
            lora.lora_A.copy_(weights[name]["lora_A"])
            lora.lora_B.copy_(weights[name]["lora_B"])
    _freeze_all_but(model, _lora_parameters(model))
    return model


def _check_weight_shapes(root: nn.Module, plan: dict, weights: dict) -> None:
    """Each layer needs lora_A [r, in] and lora_B [out, r]; a LoRALinear already there fixes r itself."""
    problems = []
    for name, (r, _) in plan.items():
        module = root.get_submodule(name)
        if isinstance(module, LoRALinear):
            if module.merged:
                raise ValueError(f"load_adapter: '{name}' is merged; unmerge() it before loading weights")
            r = module.r
        elif not _is_linear(module):
            raise TypeError(f"load_adapter: target '{name}' is a {type(module).__name__}, not nn.Linear/Conv1D")
        in_f, out_f = _in_out_features(module)
        for kind, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
            tensor = weights[name].get(kind)
            if tensor is None:
                problems.append(f"{name}.{kind} missing")
            elif tuple(tensor.shape) != shape:
                problems.append(f"{name}.{kind} has shape {list(tensor.shape)}, expected {list(shape)}")
    if problems:
        raise ValueError("load_adapter: weights do not fit the model: " + "; ".join(problems))
