"""Model surgery on tiny random Hugging Face models (BERT, ViT, GPT-2, CLIP), and PEFT interop.

Everything runs in float64 on CPU so that "same function" can be checked to ~1e-12.
"""
import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lora_kernels as lk  # noqa: E402
from lora_kernels.surgery import AdapterAfter  # noqa: E402
from _surgery_helpers import _one_thread  # noqa: E402,F401  (autouse: one intra-op thread here)

# Deprecation chatter from transformers/peft internals, not from this package.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:peft")]

TIGHT = 1e-12  # float64, same math in a different order


# --------------------------------------------------------------------------- tiny models

def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=37, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _clip():
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _inputs(name):
    g = torch.Generator().manual_seed(1)
    if name in ("bert", "gpt2"):   # embeddings as the input, so that x.grad can be checked
        return {"inputs_embeds": torch.randn(2, 7, 32, generator=g, dtype=torch.float64)}
    pixels = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    if name == "vit":
        return {"pixel_values": pixels}
    return {"input_ids": torch.randint(3, 100, (2, 7), generator=g), "pixel_values": pixels}


def _output(name, out):
    if name == "gpt2":
        return out.logits
    if name == "clip":
        return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])
    return out.last_hidden_state


BUILDERS = {"bert": _bert, "vit": _vit, "gpt2": _gpt2, "clip": _clip}
MODELS = tuple(BUILDERS)
# LoRA targets and how many layers they hit; layers per model (CLIP: text + vision towers).
LORA_TARGETS = {"bert": (["query", "value"], 4), "vit": (["q_proj", "v_proj"], 4),
                "gpt2": (["c_attn"], 2), "clip": (["q_proj", "v_proj"], 8)}
N_LAYERS = {"bert": 2, "vit": 2, "gpt2": 2, "clip": 4}


def build(name):
    """The same random weights every call (seeded), float64, eval mode, eager attention."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    model.config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if hasattr(model.config, sub):
            getattr(model.config, sub)._attn_implementation = "eager"
    return model.double().eval()


def run(name, model, inputs=None):
    return _output(name, model(**(inputs if inputs is not None else _inputs(name))))


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape and torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def perturb(params, scale=0.5, seed=2):
    """Deterministic non-zero values (a fresh LoRA B or adapter up-projection is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def loras(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lk.LoRALinear)}


def backward_grads(name, model, params, inputs=None):
    """Gradients of a fixed random projection of the output w.r.t. ``params`` (in order)."""
    for p in params:
        p.grad = None
    out = run(name, model, inputs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * cot).sum().backward()
    return [None if p.grad is None else p.grad.clone() for p in params]


# --------------------------------------------------------------------------- apply_lora

@pytest.mark.parametrize("name", MODELS)
def test_apply_lora(name):
    model = build(name)
    ref = run(name, model)
    targets, count = LORA_TARGETS[name]
    base_weights = {n: m.weight for n, m in model.named_modules() if n.split(".")[-1] in targets}
    assert model is lk.apply_lora(model, targets, r=4, alpha=8)

    layers = loras(model)
    assert set(layers) == set(base_weights) and len(layers) == count
    assert all(layers[n].weight is w and not w.requires_grad for n, w in base_weights.items())  # shared, frozen
    assert all(m.r == 4 and m.scaling == 2.0 for m in layers.values())
    assert trainable(model) == {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B")}
    assert rel_err(run(name, model), ref) <= TIGHT  # B = 0: the base model's function

    perturb([m.lora_B for m in layers.values()], scale=0.1)
    out = run(name, model)
    assert rel_err(out, ref) > 1e-3
    grads = backward_grads(name, model, list(model.parameters()))
    for (pname, p), g in zip(model.named_parameters(), grads):
        if p.requires_grad:
            assert g is not None and g.abs().sum() > 0, f"{pname} got no gradient"
        else:
            assert g is None, f"frozen {pname} got a gradient"


def test_apply_lora_gradients_match_plain_pytorch():
    """LoRA grads through a whole model equal autograd on an explicit x Wᵀ + b + s·B A x."""
    model = lk.apply_lora(build("gpt2"), ["c_attn", "mlp.c_proj"], r=3, alpha=5)
    perturb([p for m in loras(model).values() for p in (m.lora_A, m.lora_B)], scale=0.2)
    params = [p for m in loras(model).values() for p in (m.lora_A, m.lora_B)]
    ours = backward_grads("gpt2", model, params)

    def plain_forward(self, x):  # the spec, differentiable by autograd
        return x @ self.base_weight().T + self.bias + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T

    for m in loras(model).values():
        m.forward = plain_forward.__get__(m)
    ref = backward_grads("gpt2", model, params)
    for g, r in zip(ours, ref):
        assert rel_err(g, r) <= 1e-10


def test_apply_lora_regex_and_options():
    model = lk.apply_lora(build("bert"), r".*\.attention\.self\.(query|key)", r=2, alpha=3, dropout=0.25,
                          use_rslora=True)
    layers = loras(model)
    assert sorted(layers) == [f"encoder.layer.{i}.attention.self.{k}" for i in (0, 1) for k in ("key", "query")]
    m = next(iter(layers.values()))
    assert m.dropout == 0.25 and m.scaling == 3 / 2 ** 0.5


def test_apply_lora_errors():
    with pytest.raises(ValueError, match="nope"):
        lk.apply_lora(build("bert"), ["nope"])
    with pytest.raises(ValueError, match="matched no module"):
        lk.apply_lora(build("bert"), "query")  # a regex must match the whole name
    with pytest.raises(TypeError, match="BertSelfAttention"):
        lk.apply_lora(build("bert"), ["attention.self"])
    with pytest.raises(ValueError, match="r must be"):
        lk.apply_lora(build("bert"), ["query"], r=0)
    model = lk.apply_lora(build("bert"), ["query"])
    with pytest.raises(ValueError, match="already a LoRALinear"):
        lk.apply_lora(model, ["query"])


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_merge_unmerge_through_model(name):
    model = build(name)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lk.apply_lora(model, LORA_TARGETS[name][0] + (["mlp.c_fc"] if name == "gpt2" else ["intermediate.dense"]))
    perturb([p for m in loras(model).values() for p in (m.lora_A, m.lora_B)], scale=0.1)
    out = run(name, model)
    for m in loras(model).values():
        m.merge()
    assert rel_err(run(name, model), out) <= 1e-10
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original.get(n, p))]
    assert changed and all(n.endswith("weight") for n in changed)  # the merge really wrote the base weights
    for m in loras(model).values():
        m.unmerge()
    assert rel_err(run(name, model), out) <= 1e-10
    for n, p in model.named_parameters():
        if n in original:
            assert rel_err(p, original[n]) <= 1e-12, n


# --------------------------------------------------------------------------- adapters

@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("name", MODELS)
def test_add_adapters(name, placement):
    model = build(name)
    ref = run(name, model)
    assert model is lk.add_adapters(model, placement, bottleneck=5)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, AdapterAfter)}
    per_layer = 2 if placement == "houlsby" else 1
    assert len(wrapped) == per_layer * N_LAYERS[name]
    for n, m in wrapped.items():
        assert isinstance(m.adapter, lk.BottleneckAdapter) and m.adapter.d_model == 32
        assert m.adapter.down.weight.dtype == torch.float64
        assert isinstance(m.module, nn.Linear) or type(m.module).__name__ == "Conv1D"
        assert m.weight is m.module.weight  # attribute reads reach the wrapped projection
    adapters = [m.adapter for m in wrapped.values()]
    assert trainable(model) == {f"{n}.adapter.{p}" for n in wrapped for p in ("down.weight", "down.bias",
                                                                               "up.weight", "up.bias")}
    assert rel_err(run(name, model), ref) <= TIGHT  # zero up-projection: identity

    perturb([a.up.weight for a in adapters], scale=0.2)
    assert rel_err(run(name, model), ref) > 1e-3
    params = [p for a in adapters for p in a.parameters()]
    grads = backward_grads(name, model, list(model.parameters()))
    assert all(g is None for p, g in zip(model.parameters(), grads) if not p.requires_grad)
    by_id = {id(p): g for p, g in zip(model.parameters(), grads)}
    assert all(by_id[id(p)] is not None and by_id[id(p)].abs().sum() > 0 for p in params)


def test_add_adapters_names_and_placement():
    model = lk.add_adapters(build("gpt2"), "houlsby")
    names = {n for n, m in model.named_modules() if isinstance(m, AdapterAfter)}
    assert names == {f"transformer.h.{i}.{s}" for i in (0, 1) for s in ("attn.c_proj", "mlp.c_proj")}
    model = lk.add_adapters(build("bert"), "pfeiffer")
    names = {n for n, m in model.named_modules() if isinstance(m, AdapterAfter)}
    assert names == {"encoder.layer.0.output.dense", "encoder.layer.1.output.dense"}
    assert isinstance(model.get_submodule("encoder.layer.0.output.dense.module"), nn.Linear)


def test_add_adapters_errors():
    with pytest.raises(ValueError, match="placement"):
        lk.add_adapters(build("bert"), "middle")
    with pytest.raises(ValueError, match="attention.output.dense"):
        lk.add_adapters(nn.Sequential(nn.Linear(4, 4)), "houlsby")
    model = lk.add_adapters(build("bert"), "pfeiffer")
    with pytest.raises(ValueError, match="already has an adapter"):
        lk.add_adapters(model, "pfeiffer")


def test_adapters_after_lora_projection():
    """Adapters also wrap a LoRALinear projection (LoRA + adapters in one model)."""
    model = lk.apply_lora(build("bert"), ["output.dense"])
    ref = run("bert", model)
    lk.add_adapters(model, "houlsby", bottleneck=4)
    assert isinstance(model.get_submodule("encoder.layer.0.output.dense.module"), lk.LoRALinear)
    assert rel_err(run("bert", model), ref) <= TIGHT


# --------------------------------------------------------------------------- LN-tuning, BitFit

@pytest.mark.parametrize("name", MODELS)
def test_ln_tuning(name):
    model, reference = build(name), build(name)
    inputs, ref_inputs = _inputs(name), _inputs(name)
    x, x_ref = (next(v for v in d.values() if v.is_floating_point()) for d in (inputs, ref_inputs))
    x.requires_grad_(True)
    x_ref.requires_grad_(True)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert model is lk.ln_tuning(model)

    assert not any(type(m) is nn.LayerNorm for m in model.modules())
    fused = {n: m for n, m in model.named_modules() if isinstance(m, lk.FusedLayerNorm)}
    assert set(fused) == set(norms)
    assert all(fused[n].weight is norms[n].weight and fused[n].bias is norms[n].bias for n in norms)
    assert trainable(model) == {f"{n}.{p}" for n in norms for p in ("weight", "bias")}

    ln_params = [p for n in norms for p in (fused[n].weight, fused[n].bias)]
    ref_params = [reference.get_submodule(n).get_parameter(p) for n in norms for p in ("weight", "bias")]
    assert rel_err(run(name, model, inputs), run(name, reference, ref_inputs)) <= 1e-10
    grads = backward_grads(name, model, ln_params + [x], inputs)
    ref_grads = backward_grads(name, reference, ref_params + [x_ref], ref_inputs)
    for g, r in zip(grads, ref_grads):  # LayerNorm parameters and the input
        assert g is not None and rel_err(g, r) <= 1e-10
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bitfit():
    model = lk.bitfit(build("bert"))
    names = trainable(model)
    assert names == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert "encoder.layer.0.attention.self.query.bias" in names and "embeddings.LayerNorm.bias" in names


def test_ln_tuning_bias_free_and_plain_layer_norms():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, bias=False), nn.LayerNorm(6, elementwise_affine=False))
    x = torch.randn(3, 4)
    ref = model(x)
    lk.ln_tuning(model)
    assert isinstance(model[1], lk.FusedLayerNorm) and isinstance(model[2], lk.FusedLayerNorm)
    assert trainable(model) == {"1.weight"}
    assert rel_err(model(x), ref) <= 1e-5


def test_ln_tuning_and_bitfit_errors():
    with pytest.raises(ValueError, match="LayerNorm"):
        lk.ln_tuning(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="bias"):
        lk.bitfit(nn.Sequential(nn.Linear(4, 4, bias=False)))


# --------------------------------------------------------------------------- from_peft

def _peft_model(name, targets, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=(name == "gpt2"), **kwargs)
    pm = peft.get_peft_model(build(name), config).eval()  # PEFT's new layers start in train mode
    perturb([p for n, p in pm.named_parameters() if "lora_" in n], scale=0.2, seed=4)
    return pm


def _peft_layers(pm):
    return {n: m for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("name,targets,options", [
    ("bert", ["query", "value", "output.dense"], {}),
    ("gpt2", ["c_attn", "c_proj"], {}),
    ("gpt2", ["c_attn", "c_fc"], {"use_rslora": True, "lora_dropout": 0.1}),
])
def test_from_peft_same_function_and_tensors(name, targets, options):
    pm = _peft_model(name, targets, **options)
    inputs = _inputs(name)
    x = next(iter(inputs.values()))
    x.requires_grad_(True)
    peft_layers = _peft_layers(pm)
    shared = {n: (m.base_layer.weight, m.base_layer.bias, m.lora_A["default"].weight, m.lora_B["default"].weight)
              for n, m in peft_layers.items()}
    scalings = {n: m.scaling["default"] for n, m in peft_layers.items()}
    params = [p for p in pm.parameters() if p.requires_grad] + [x]
    out = run(name, pm, inputs)
    grads = backward_grads(name, pm, params, inputs)

    assert pm is lk.from_peft(pm)
    assert not _peft_layers(pm)
    layers = loras(pm)
    assert set(layers) == set(shared)
    for n, m in layers.items():
        assert all(a is b for a, b in zip((m.weight, m.bias, m.lora_A, m.lora_B), shared[n]))
        assert m.scaling == scalings[n] and m.fan_in_fan_out == (name == "gpt2")
        assert m.dropout == options.get("lora_dropout", 0.0) and m.use_rslora == options.get("use_rslora", False)
    assert rel_err(run(name, pm, inputs), out) <= TIGHT
    for g, r in zip(backward_grads(name, pm, params, inputs), grads):
        assert rel_err(g, r) <= TIGHT


def test_from_peft_keeps_a_modified_scaling_and_trainable_bias():
    pm = _peft_model("bert", ["query"], bias="lora_only")
    layer = pm.get_submodule("base_model.model.encoder.layer.0.attention.self.query")
    layer.set_scale("default", 0.3)  # scaling = 0.3·alpha/r: no longer alpha/r
    scaling, bias = layer.scaling["default"], layer.base_layer.bias
    assert bias.requires_grad
    out = run("bert", pm)
    lk.from_peft(pm)
    lora = pm.get_submodule("base_model.model.encoder.layer.0.attention.self.query")
    assert lora.scaling == scaling and lora.bias is bias and bias.requires_grad
    assert rel_err(run("bert", pm), out) <= TIGHT
    assert backward_grads("bert", pm, [bias])[0] is not None


def test_from_peft_errors():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        lk.from_peft(build("bert"))
    with pytest.raises(TypeError, match="Embedding"):
        lk.from_peft(_peft_model("bert", ["word_embeddings"]))
    pm = _peft_model("bert", ["query"])
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        lk.from_peft(pm)
    pm = _peft_model("bert", ["query"])
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query"]))
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="active adapter"):
        lk.from_peft(pm)
    pm = peft.get_peft_model(build("bert").float(), peft.LoraConfig(r=2, target_modules=["query"]))
    pm.base_model.model.double()
    for m in _peft_layers(pm).values():
        m.lora_A["default"].float()
    with pytest.raises(ValueError, match="dtype"):
        lk.from_peft(pm)


# --------------------------------------------------------------------------- PEFT's on-disk format

@pytest.mark.parametrize("name,targets", [("bert", ["query", "value", "intermediate.dense"]),
                                          ("gpt2", ["c_attn", "mlp.c_proj"])])
def test_save_adapter_loads_in_peft(name, targets, tmp_path):
    model = lk.apply_lora(build(name), targets[:-1], r=4, alpha=8)
    lk.apply_lora(model, targets[-1:], r=2, alpha=3)  # a second rank: rank_pattern / alpha_pattern
    perturb([p for m in loras(model).values() for p in (m.lora_A, m.lora_B)], scale=0.2)
    out = run(name, model)
    lk.save_adapter(model, tmp_path / "ours")
    lk.save_adapter(model, tmp_path / "named", base_model_name_or_path="tiny-" + name)  # not given to PEFT:
    named = json.loads((tmp_path / "named" / "adapter_config.json").read_text())  # it would look the name up
    assert named["base_model_name_or_path"] == "tiny-" + name

    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] == (name == "gpt2") and config["base_model_name_or_path"] is None
    assert sorted(config["target_modules"]) == sorted(loras(model))
    assert set(config["rank_pattern"]) == set(config["alpha_pattern"]) and config["rank_pattern"]
    assert all(n.endswith(targets[-1]) and r == 2 for n, r in config["rank_pattern"].items())

    pm = peft.PeftModel.from_pretrained(build(name), str(tmp_path / "ours"))
    assert len(_peft_layers(pm)) == len(loras(model))
    assert rel_err(run(name, pm), out) <= TIGHT
    # What PEFT itself writes for this adapter: same keys, shapes and values as ours.
    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = safetensors_torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs) and all(k.startswith("base_model.model.") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name,targets,patterns", [
    ("bert", ["query", "value"], {"rank_pattern": {"value": 2}, "alpha_pattern": {"query": 5}}),
    ("gpt2", ["c_attn", "c_proj"], {"lora_dropout": 0.125}),
    ("vit", ["q_proj", "fc2"], {"use_rslora": True}),
])
def test_load_adapter_from_peft(name, targets, patterns, tmp_path):
    pm = _peft_model(name, targets, **patterns)
    out = run(name, pm)
    pm.save_pretrained(str(tmp_path))

    model = lk.load_adapter(build(name), tmp_path)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in _peft_layers(pm).items()}
    layers = loras(model)
    assert set(layers) == set(peft_layers)
    for n, m in layers.items():
        assert m.r == peft_layers[n].r["default"] and m.scaling == peft_layers[n].scaling["default"]
        assert m.dropout == patterns.get("lora_dropout", 0.0) and m.fan_in_fan_out == (name == "gpt2")
    assert trainable(model) == {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B")}
    assert rel_err(run(name, model), out) <= TIGHT

    # Loading into layers that are LoRALinear already copies the weights in.
    again = lk.apply_lora(build(name), targets, r=4, alpha=1)
    if not patterns.get("rank_pattern"):
        lk.load_adapter(again, tmp_path)
        assert rel_err(run(name, again), out) <= TIGHT


def test_save_after_from_peft_and_load_back(tmp_path):
    pm = _peft_model("gpt2", ["c_attn"])
    out = run("gpt2", pm)
    lk.save_adapter(lk.from_peft(pm), tmp_path)  # a PeftModel: keys relative to its base model
    keys = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert rel_err(run("gpt2", lk.load_adapter(build("gpt2"), tmp_path)), out) <= TIGHT


def test_peft_save_pretrained_after_from_peft(tmp_path):
    """PEFT's own save_pretrained would find no PEFT layer after from_peft and write an empty
    adapter; it is routed to save_adapter, also in a deep copy (which saves the copy)."""
    pm = _peft_model("bert", ["query", "value"])
    out = run("bert", pm)
    lk.from_peft(pm)
    pm.save_pretrained(str(tmp_path / "a"))
    assert len(safetensors_torch.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))) == 8
    assert rel_err(run("bert", peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "a"))), out) <= TIGHT
    pm.save_pretrained(str(tmp_path / "b"), is_main_process=False)
    assert not (tmp_path / "b").exists()

    twin = copy.deepcopy(pm)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, lk.LoRALinear):
                m.lora_B.mul_(2.0)
    twin.save_pretrained(str(tmp_path / "twin"))
    reloaded = run("bert", peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "twin")))
    assert rel_err(reloaded, run("bert", twin)) <= TIGHT and rel_err(reloaded, out) > 1e-3


@pytest.mark.parametrize("name,targets", [("bert", ["query", "value"]), ("gpt2", ["c_attn"])])
def test_peft_merge_and_unload_and_unload_after_from_peft(name, targets):
    """PEFT's merge_and_unload/unload would find no PEFT layer after from_peft and hand back
    LoRALinears (unmerged: a plain checkpoint of that model loses the update); they give plain
    layers holding the same weight and bias, merged or not."""
    pm = _peft_model(name, targets)
    out, base_out = run(name, pm), run(name, build(name))
    lk.from_peft(pm)
    weight = next(m.weight for m in pm.modules() if isinstance(m, lk.LoRALinear))
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, (lk.LoRALinear, peft.tuners.lora.LoraLayer)) for m in merged.modules())
    assert not any("lora" in k for k in merged.state_dict())
    assert any(m.weight is weight for m in merged.modules() if hasattr(m, "weight"))  # the same tensor
    assert rel_err(run(name, merged), out) <= 1e-10

    pm = lk.from_peft(_peft_model(name, targets))
    plain = pm.base_model.unload()  # PeftModel forwards to its LoraModel: both are routed
    assert not any(isinstance(m, (lk.LoRALinear, peft.tuners.lora.LoraLayer)) for m in plain.modules())
    assert rel_err(run(name, plain), base_out) <= TIGHT


def test_load_adapter_errors(tmp_path):
    model = lk.apply_lora(build("bert"), ["query"], r=4)
    lk.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="does not fit"):          # a BERT adapter on GPT-2
        lk.load_adapter(build("gpt2"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"shape \[4, 32\], expected \[2, 32\]"):
        lk.load_adapter(lk.apply_lora(build("bert"), ["query"], r=2), tmp_path / "a")

    weights = safetensors_torch.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    extra = dict(weights, **{"base_model.model.encoder.layer.0.attention.self.query.lora_C.weight": torch.ones(1)})
    safetensors_torch.save_file(extra, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys.*lora_C"):
        lk.load_adapter(build("bert"), tmp_path / "a")
    weights.pop("base_model.model.encoder.layer.1.attention.self.query.lora_B.weight")
    safetensors_torch.save_file(weights, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="layer.1.attention.self.query.lora_B missing"):
        lk.load_adapter(build("bert"), tmp_path / "a")

    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        lk.load_adapter(build("bert"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lk.load_adapter(build("bert"), tmp_path / "missing")
    untouched = build("bert")
    with pytest.raises(ValueError):
        lk.load_adapter(untouched, tmp_path / "a")
    assert not loras(untouched)  # nothing was replaced before the error


def test_methods_combine_with_freeze_others_false():
    """LiLT's recipe: adapters in every layer plus unlocked LayerNorms. By default each method
    leaves only its own parameters trainable; freeze_others=False keeps the other method's."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)

    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    default = BertModel(config)
    lk.add_adapters(default, "houlsby", bottleneck=4)
    lk.ln_tuning(default)
    assert trainable(default) and all("LayerNorm" in n for n in trainable(default))

    combined = BertModel(config)
    for p in combined.parameters():
        p.requires_grad_(False)
    lk.add_adapters(combined, "houlsby", bottleneck=4, freeze_others=False)
    lk.ln_tuning(combined, freeze_others=False)
    names = trainable(combined)
    adapters = {n for n in names if ".adapter." in n}
    norms = {n for n in names if "LayerNorm" in n}
    assert adapters and norms and names == adapters | norms
    lk.bitfit(combined, freeze_others=False)
    assert names < trainable(combined) and all(n in names or n.endswith("bias") for n in trainable(combined))
