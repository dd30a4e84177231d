"""save_adapter / load_adapter: LoRA weights in PEFT's on-disk format (checked against peft 0.21
``save_pretrained``), so adapters move freely between this package and ``peft.PeftModel``."""
import contextlib
import json
import os
import re
from collections import Counter

import torch
from torch import nn

from ..nn import LoRALinear, multi
from ._common import (_check_targets, _freeze_all_but, _import_optional, _in_out_features, _is_linear,
                      _lora_parameters, _matching_names, _peft_root, _some_names)
from .lora import _inject_lora
from .mha import LoRAMultiheadAttention

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
KEY_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight",
                "magnitude": ".lora_magnitude_vector"}  # DoRA (PEFT writes no ".weight" there)


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


@contextlib.contextmanager
def _adapter_of(root: nn.Module, adapter_name, caller: str):
    """Inside: adapter ``adapter_name`` active on the LoRALinear layers holding it (None: each
    layer's active adapter); yields {name: layer} of the LoRALinear layers that take part."""
    linear = {name: m for name, m in root.named_modules() if isinstance(m, LoRALinear)}
    if adapter_name is None:
        yield {name: m for name, m in linear.items() if m.active_adapter is not None}
        return
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str or None, got {type(adapter_name).__name__}")
    if any(isinstance(m, LoRAMultiheadAttention) for m in root.modules()):
        raise ValueError(f"{caller}(adapter_name=...): LoRA on nn.MultiheadAttention holds one unnamed adapter; "
                         f"call it without adapter_name")
    with multi.activated(linear.values(), adapter_name) as holding:
        yield {name: m for name, m in linear.items() if id(m) in holding}


def save_adapter(model: nn.Module, path, base_model_name_or_path=None, *, adapter_name=None) -> nn.Module:
    """Write the model's LoRA weights as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(base_model, path)`` loads the result. Layers whose r or
    alpha differ from the most common value go to ``rank_pattern`` / ``alpha_pattern``.
    ``adapter_name``: that adapter of the layers holding it (default: each layer's active one).
    """
    with _adapter_of(_peft_root(model), adapter_name, "save_adapter") as linear:
        if adapter_name is not None and not linear:
            raise ValueError(f"save_adapter: no LoRALinear layer holds adapter {adapter_name!r}")
        return _save(model, path, base_model_name_or_path, linear)


def _save(model, path, base_model_name_or_path, linear: dict) -> nn.Module:
    st = _import_optional("safetensors.torch", "save_adapter")
    root = _peft_root(model)
    # An MHA's LoRA is one PEFT target (the MHA) whose out_proj LoRALinear rides along.
    mha = {name: m for name, m in root.named_modules() if isinstance(m, LoRAMultiheadAttention)}
    inner = {f"{name}.base_layer.out_proj": m.base_layer.out_proj for name, m in mha.items()}
    linear = {name: m for name, m in linear.items() if name not in inner}
    layers = {**linear, **mha}
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRALinear layer")
    if len({m.use_rslora for m in layers.values()}) > 1:
        raise ValueError("save_adapter: layers mix use_rslora True and False, which PEFT's config cannot express")
    if len({getattr(m, "use_dora", False) for m in layers.values()}) > 1:
        raise ValueError("save_adapter: layers mix use_dora True and False, which PEFT's config cannot express")
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
        "lora_dropout": _most_common(m.dropout for m in linear.values()) if linear else 0.0,
        # PEFT corrects this per layer (Conv1D needs True, Linear False); record what GPT-2-style layers use.
        "fan_in_fan_out": any(m.fan_in_fan_out for m in linear.values()),
        "use_rslora": first.use_rslora, "bias": "none", "lora_bias": False,
        "use_dora": bool(getattr(first, "use_dora", False)),
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {}
    for name, m in {**layers, **inner}.items():
        for key, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)) + (
                (("magnitude", m.lora_magnitude_vector),) if getattr(m, "use_dora", False) else ()):
            tensors[KEY_PREFIX + name + KEY_SUFFIXES[key]] = param.detach().to("cpu").contiguous()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    st.save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    return model


# Config fields whose non-default value means something this loader cannot reproduce.
UNSUPPORTED_CONFIG = ("lora_bias", "modules_to_save", "layers_to_transform", "target_parameters",
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


def load_adapter(model: nn.Module, path, *, adapter_name=None) -> nn.Module:
    """Load a LoRA adapter saved by ``save_adapter`` or by PEFT's ``save_pretrained``.

    Targeted layers that are not LoRALinear yet get one (r/alpha from the config, with its
    rank/alpha patterns); existing LoRALinear layers take the config's alpha, dropout and rsLoRA
    flag. Every name and shape is checked before the model is touched. Only LoRA weights stay
    trainable (every adapter's).

    ``adapter_name=None`` loads into each layer's active adapter. With a name, the adapter is
    loaded as that named adapter: into it where a layer holds it, else added to the layer
    (``add_adapter``); which adapter is active does not change, except on layers that held no
    LoRA and now hold only this one (active there if the model had no LoRA layer before, else
    inactive, as PEFT's layers give their base output for an adapter that is not active).
    """
    st = _import_optional("safetensors.torch", "load_adapter")
    config, root = _read_config(path), _peft_root(model)
    weights = _read_weights(path, st)
    targets = config.get("target_modules")
    _check_targets(targets)
    names = _matching_names(root, targets, exclude=config.get("exclude_modules"))
    plan = {n: (_pattern_value(config.get("rank_pattern"), n, config["r"]),
                _pattern_value(config.get("alpha_pattern"), n, config["lora_alpha"])) for n in names}

    is_mha = {n for n in plan if isinstance(root.get_submodule(n), (nn.MultiheadAttention, LoRAMultiheadAttention))}
    expected = set(plan) | {f"{n}.base_layer.out_proj" for n in is_mha}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"load_adapter: {path} does not fit {type(root).__name__}: "
                         f"LoRA layers without weights: [{_some_names(missing)}]; "
                         f"weights for no targeted layer: [{_some_names(unexpected)}]")
    if adapter_name is not None:
        multi.check_name(adapter_name)
    use_dora, dropout, use_rslora = (bool(config.get("use_dora", False)), float(config.get("lora_dropout", 0.0)),
                                     config.get("use_rslora", False))
    had_lora = any(isinstance(m, LoRALinear) for m in root.modules())
    with _adapter_of(root, adapter_name, "load_adapter") as holding:
        _check_weight_shapes(root, plan, weights, use_dora, None if adapter_name is None else holding)
    existing = {n for n in plan if isinstance(root.get_submodule(n), (LoRALinear, LoRAMultiheadAttention))}
    _inject_lora(root, {n: ra for n, ra in plan.items() if n not in existing}, dropout, use_rslora, use_dora)
    if adapter_name is not None:
        for name, (r, alpha) in plan.items():
            lora = root.get_submodule(name)
            if name not in existing:
                multi.rename(lora, lora.active_adapter, adapter_name)
                if had_lora:
                    lora.set_adapter(None)
            elif adapter_name not in lora.adapter_names:
                lora.add_adapter(adapter_name, r, alpha, dropout, use_rslora=use_rslora)
    with _adapter_of(root, adapter_name, "load_adapter"), torch.no_grad():
        for name, (r, alpha) in plan.items():
            lora = root.get_submodule(name)
            parts = {name: lora}
            if isinstance(lora, LoRAMultiheadAttention):  # no dropout there (PEFT merges it per call)
                parts[f"{name}.base_layer.out_proj"] = lora.base_layer.out_proj
            else:
                lora.dropout = dropout
            for part_name, part in parts.items():
                part.alpha, part.use_rslora = alpha, use_rslora
                part.lora_A.copy_(weights[part_name]["lora_A"])
                part.lora_B.copy_(weights[part_name]["lora_B"])
            if use_dora:
                lora.lora_magnitude_vector.copy_(weights[name]["magnitude"])
    _freeze_all_but(model, _lora_parameters(model) + [p for m in root.modules() if isinstance(m, LoRALinear)
                                                       for p in multi.all_parameters(m)])
    return model


def _check_weight_shapes(root: nn.Module, plan: dict, weights: dict, use_dora: bool = False,
                         holding=None) -> None:
    """Each layer needs lora_A [r, in] and lora_B [out, r] (and, for DoRA, lora_magnitude_vector [out]);
    a LoRALinear already there fixes r itself (when it holds the adapter: ``holding`` None or
    among the {name: layer} that do), and must be DoRA exactly when the adapter is."""
    problems = []
    for name, (r, _) in plan.items():
        module = root.get_submodule(name)
        if isinstance(module, (nn.MultiheadAttention, LoRAMultiheadAttention)):
            if use_dora:
                raise ValueError(f"load_adapter: '{name}' is an nn.MultiheadAttention; DoRA is not supported there "
                                 f"(the adapter has use_dora=True)")
            if isinstance(module, LoRAMultiheadAttention):
                if module.merged:
                    raise ValueError(f"load_adapter: '{name}' is merged; unmerge() it before loading weights")
                r = module.r
            e = module.embed_dim
            for part, kind, shape in ((name, "lora_A", (r, e)), (name, "lora_B", (3 * e, r)),
                                      (f"{name}.base_layer.out_proj", "lora_A", (r, e)),
                                      (f"{name}.base_layer.out_proj", "lora_B", (e, r))):
                tensor = weights[part].get(kind)
                if tensor is None or tuple(tensor.shape) != shape:
                    problems.append(f"{part}.{kind} is {None if tensor is None else list(tensor.shape)}, "
                                    f"expected {list(shape)}")
            continue
        if isinstance(module, LoRALinear):
            if module.merged:
                raise ValueError(f"load_adapter: '{name}' is merged; unmerge() it before loading weights")
            if module.use_dora != use_dora:
                problems.append(f"{name} is a LoRALinear with use_dora={module.use_dora}, the adapter has "
                                f"use_dora={use_dora}")
            if holding is None or name in holding:
                r = module.r
        elif not _is_linear(module):
            raise TypeError(f"load_adapter: target '{name}' is a {type(module).__name__}, not nn.Linear/Conv1D")
        in_f, out_f = _in_out_features(module)
        expected = (("lora_A", (r, in_f)), ("lora_B", (out_f, r))) + ((("magnitude", (out_f,)),) if use_dora else ())
        if not use_dora and "magnitude" in weights[name]:
            problems.append(f"{name}.lora_magnitude_vector present but the config has use_dora=False")
        for kind, shape in expected:
            tensor = weights[name].get(kind)
            label = f"{name}.{kind}" if kind != "magnitude" else f"{name}.lora_magnitude_vector"
            if tensor is None:
                problems.append(f"{label} missing" + (" (the config has use_dora=True)" if kind == "magnitude" else ""))
            elif tuple(tensor.shape) != shape:
                problems.append(f"{label} has shape {list(tensor.shape)}, expected {list(shape)}")
    if problems:
        raise ValueError("load_adapter: weights do not fit the model: " + "; ".join(problems))
