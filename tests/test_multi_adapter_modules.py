"""Several named adapters on LoRALinear (add/set/delete_adapter), mixed batches through
lk.adapter_batch against float64 math and against per-adapter runs, and the PEFT side: from_peft
of a model with several loaded adapters against PEFT's own adapter_names= forward and generate,
set_adapter, mixed-batch training gradients, save/load per adapter."""
import copy
import os
import pickle

import pytest
import torch

import lora_kernels as lk
from lora_kernels.nn import multi
from lora_kernels.ops import lora_multi as multi_op

from conftest import backends_for, randn, rel_err

F64 = torch.float64
FP32_TOL = 1e-5
# (name, r, alpha, use_rslora): different ranks and alphas, one rsLoRA.
SPECS = [("default", 2, 4.0, False), ("b", 5, 3.0, False), ("c", 1, 2.0, True)]


def _layer(n_adapters, k=13, n=9, dtype=F64, **kw):
    """A LoRALinear with the first n_adapters of SPECS, every lora_B non-zero."""
    name, r, alpha, rs = SPECS[0]
    m = lk.LoRALinear(k, n, r=r, alpha=alpha, use_rslora=rs, dtype=dtype, **kw)
    for name, r, alpha, rs in SPECS[1:n_adapters]:
        m.add_adapter(name, r, alpha, use_rslora=rs)
    with torch.no_grad():
        for name in m.adapter_names:
            multi.param(m, name, "lora_B").copy_(randn(n, multi.param(m, name, "lora_A").shape[0], dtype=dtype))
    return m


def _expected(m, x, names):
    """y_b = x_b W0ᵀ + bias + s·(x_b Aᵀ) Bᵀ for the adapter of sample b, in float64, from the tensors."""
    rows = []
    for xb, name in zip(x.double(), names):
        y = xb @ m.base_weight().double().T + m.bias.double()
        if name is not None:
            cfg = m._adapter_cfg[name]
            A, B = multi.param(m, name, "lora_A").double(), multi.param(m, name, "lora_B").double()
            y = y + multi.scaling_of(cfg) * (xb @ A.T) @ B.T
        rows.append(y)
    return torch.stack(rows)


def test_one_adapter_layer_keeps_its_keys_and_extra_adapters_get_their_own():
    m = lk.LoRALinear(6, 4, r=2)
    assert (m.adapter_names, m.active_adapter) == (["default"], "default")
    assert sorted(m.state_dict()) == ["bias", "lora_A", "lora_B", "weight"]
    assert [n for n, _ in m.named_modules()] == [""]
    first_A = m.lora_A
    m.add_adapter("b", r=3, alpha=6, dropout=0.1)
    assert sorted(m.state_dict()) == ["bias", "lora_A", "lora_B", "lora_adapters.b.lora_A", "lora_adapters.b.lora_B",
                                      "weight"]
    m.set_adapter("b")  # routing: attributes are b's, the keys are not
    assert (m.r, m.alpha, m.dropout, m.scaling, tuple(m.lora_A.shape)) == (3, 6, 0.1, 2.0, (3, 6))
    assert m.lora_A is m.lora_adapters.b.lora_A
    assert torch.equal(m.state_dict()["lora_A"], first_A)
    assert len(list(m.parameters())) == 6  # weight, bias and both adapters' A, B: an optimizer sees all
    m.delete_adapter("b")
    assert sorted(m.state_dict()) == ["bias", "lora_A", "lora_B", "weight"] and m.active_adapter == "default"
    assert [n for n, _ in m.named_modules()] == [""]


def test_set_and_delete_adapter_and_their_errors():
    m = _layer(3)
    x = randn(4, 13)
    for name in m.adapter_names + [None]:
        m.set_adapter(name)
        assert rel_err(m(x), _expected(m, x, [name] * 4)) <= 1e-12
    m.set_adapter("c")
    m.merge()
    merged = m.weight.clone()
    m.set_adapter("b")  # unmerges c first
    assert not m.merged and not torch.equal(m.weight, merged)
    b_A = m.lora_A
    m.delete_adapter("default")  # the first: b's tensors take the layer's own keys
    assert m.adapter_names == ["b", "c"] and m._parameters["lora_A"] is b_A and m.active_adapter == "b"
    m.delete_adapter("b")  # the active one: c becomes active
    assert m.active_adapter == "c" and sorted(m.state_dict()) == ["bias", "lora_A", "lora_B", "weight"]
    with pytest.raises(ValueError, match="only adapter"):
        m.delete_adapter("c")
    with pytest.raises(ValueError, match="unknown adapter"):
        m.set_adapter("zz")
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("c", 2, 2)
    for bad in ("", "a.b", "__base__", "keys"):
        with pytest.raises(ValueError, match="not allowed"):
            m.add_adapter(bad, 2, 2)
    with pytest.raises(ValueError, match="r must"):
        m.add_adapter("d", 0, 2)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(m)))
    assert clone.adapter_names == ["c"] and torch.equal(clone(x), m(x))


@pytest.mark.parametrize("n_adapters", [1, 3])
@pytest.mark.parametrize("training", [False, True])
def test_mixed_batch_forward_and_per_adapter_gradients(n_adapters, training):
    m = _layer(n_adapters).train(training)
    names = (["default", None, "b", "c", "b", "default", None] if n_adapters == 3 else ["default", None, "default"])
    x = randn(len(names), 3, 13, requires_grad=True)
    g = randn(len(names), 3, 9)
    with lk.adapter_batch(m, names):
        y = m(x)
    assert rel_err(y, _expected(m, x, names)) <= 1e-12
    (y * g).sum().backward()
    mixed = {n: [p.grad.clone() for p in multi.adapter_parameters(m, n)] for n in m.adapter_names}
    dx = x.grad.clone()
    for name in m.adapter_names:  # each adapter alone on its own samples
        rows = [i for i, n in enumerate(names) if n == name]
        for p in multi.adapter_parameters(m, name):
            p.grad = None
        m.set_adapter(name)
        (m(x[rows]) * g[rows]).sum().backward()
        for got, alone in zip(mixed[name], multi.adapter_parameters(m, name)):
            assert rel_err(got, alone.grad) <= 1e-12
    m.set_adapter(None)  # base-only samples: dx is W0ᵀ g there
    base_rows = [i for i, n in enumerate(names) if n is None]
    assert rel_err(dx[base_rows], g[base_rows] @ m.base_weight()) <= 1e-12


def test_mixed_batch_dropout_is_the_mask_lora_linear_draws():
    m = _layer(3, dropout=0.3).train()
    m.add_adapter("d", 3, 5.0, dropout=0.3)
    for name in m.adapter_names:
        m._adapter_cfg[name]["dropout"] = 0.3
    names = ["b", "d", None, "c", "default"]
    x = randn(5, 2, 13)
    torch.manual_seed(11)
    with lk.adapter_batch(m, names):
        y = m(x)
    for b, name in enumerate(names):
        torch.manual_seed(11)  # lora_linear on the whole x with the same seed: the same mask
        m.set_adapter(name)
        assert rel_err(y[b], m(x)[b]) <= 1e-12
    m.set_adapter("default")
    m.lora_adapters.b.lora_A.requires_grad_(False)
    m._adapter_cfg["b"]["dropout"] = 0.1
    with pytest.raises(ValueError, match="different dropout"), lk.adapter_batch(m, names):
        m(x)
    with torch.no_grad(), lk.adapter_batch(m.eval(), names):  # eval: no dropout, any mix
        assert rel_err(m(x), _expected(m, x, names)) <= 1e-12


def test_serving_stack_is_cached_and_follows_updates():
    m = _layer(3)
    names = ["c", None, "b", "b"]
    x = randn(4, 13)
    with torch.inference_mode(), lk.adapter_batch(m, names):
        y1 = m(x)
        stack = m._stack_cache[1]
        m(x)
        assert m._stack_cache[1] is stack  # no restacking for the same tensors
    with torch.no_grad():
        m.lora_adapters.b.lora_B.mul_(2)  # an optimizer step: the version counter moves
    with torch.inference_mode(), lk.adapter_batch(m, names):
        y2 = m(x)
    assert m._stack_cache[1] is not stack
    assert rel_err(y1, _expected(m, x, names)) > 1e-3 and rel_err(y2, _expected(m, x, names)) <= 1e-12


def test_adapter_batch_errors_nesting_and_restore():
    model = torch.nn.Sequential(_layer(3), torch.nn.ReLU(), lk.LoRALinear(9, 5, r=2, dtype=F64))
    model[2].add_adapter("e", 2, 2)
    x = randn(3, 13)
    with pytest.raises(ValueError, match="unknown adapter"), lk.adapter_batch(model, ["b", "zz", None]):
        pass
    with pytest.raises(TypeError, match="list or tuple"), lk.adapter_batch(model, "b"):
        pass
    with pytest.raises(ValueError, match="first dim"), lk.adapter_batch(model, ["b", None]):
        model(x)
    with lk.adapter_batch(model, ["b", "e", None]):  # "e" only in the second layer: base in the first
        with lk.adapter_batch(model, ["c", "c", "c"]):
            assert model[0]._batch_names == ("c", "c", "c")
        assert model[0]._batch_names == ("b", "e", None)
        with pytest.raises(RuntimeError), lk.adapter_batch(model, [None] * 3):
            raise RuntimeError
        assert model[2]._batch_names == ("b", "e", None)
        h = model[0](x)
        assert rel_err(h, _expected(model[0], x, ["b", None, None])) <= 1e-12
    assert all(m._batch_names is None for m in (model[0], model[2]))
    model[0].merge()
    with pytest.raises(ValueError, match="merged"), lk.adapter_batch(model, ["b", None, None]):
        pass
    dora = lk.LoRALinear(13, 9, r=2, use_dora=True, dtype=F64)
    dora.add_adapter("b", 3, 4)
    dora.set_adapter("b")
    assert torch.allclose(dora.lora_magnitude_vector, dora.base_weight().norm(dim=1))
    assert rel_err(dora(x), torch.nn.functional.linear(x, dora.weight, dora.bias)) <= 1e-12  # B = 0: the base
    with pytest.raises(NotImplementedError, match="DoRA"), lk.adapter_batch(dora, ["b", None, "default"]):
        dora(x)


def test_layer_pickled_before_named_adapters_loads_as_default():
    m = _layer(1)
    state = dict(m.__dict__)
    cfg = state.pop("_adapter_cfg")["default"]
    for key in ("_first", "_active", "_batch_names", "_stack_cache", "_routing_cache"):
        state.pop(key)
    state.update(cfg)  # the old layout: r, alpha, dropout, use_rslora as plain attributes
    old = lk.LoRALinear.__new__(lk.LoRALinear)
    old.__setstate__(state)
    x = randn(3, 13)
    assert (old.adapter_names, old.r, old.alpha) == (["default"], 2, 4.0) and torch.equal(old(x), m(x))


def test_compile_fullgraph_switched_adapter_and_mixed_batch():
    torch._dynamo.reset()
    m = _layer(3)
    m.set_adapter("b")
    x = randn(4, 2, 13, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert rel_err(compiled(x), _expected(m, x, ["b"] * 4)) <= 1e-12
    names = ["c", None, "b", "default"]
    with lk.adapter_batch(m, names):
        y = compiled(x)
    assert rel_err(y, _expected(m, x, names)) <= 1e-12
    y.sum().backward()
    assert all(p.grad is not None for p in multi.all_parameters(m))
    torch._dynamo.reset()


TRITON = [b for b in backends_for(multi_op.IMPLS) if b == "triton"]


@pytest.mark.skipif(not TRITON, reason="the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1")
def test_triton_module_mixed_batch_matches_float64():
    torch.manual_seed(3)
    m = _layer(3, k=19, n=11, dtype=torch.float32).train()
    names = ["c", None, "b", "default"]
    x = randn(4, 2, 19, dtype=torch.float32, requires_grad=True)
    with lk.use_backend("triton"), lk.adapter_batch(m, names):
        y = m(x)
        y.sum().backward()
    assert rel_err(y, _expected(m, x, names)) <= FP32_TOL
    grads = [p.grad.clone() for p in multi.all_parameters(m)]
    for p in multi.all_parameters(m):
        p.grad = None
    with lk.use_backend("torch"), lk.adapter_batch(m, names):
        m(x).sum().backward()
    for got, want in zip(grads, [p.grad for p in multi.all_parameters(m)]):
        assert rel_err(got, want) <= FP32_TOL


# ----------------------------------------------------------------------------------- PEFT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).eval()


def _llama():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64))
    model.config._attn_implementation = "eager"
    return model.eval()


# (adapter, r, alpha, targets): ranks, alphas and targets differ; "a" is loaded first (active).
PEFT_SPECS = {
    "gpt2": (_gpt2, [("a", 2, 4.0, ["c_attn", "c_proj"]), ("b", 4, 3.0, ["c_attn", "c_fc"]),
                     ("c", 1, 1.0, ["c_attn", "c_proj", "c_fc"])]),
    "llama": (_llama, [("a", 2, 4.0, ["q_proj", "v_proj"]), ("b", 4, 3.0, ["q_proj", "down_proj"]),
                       ("c", 1, 1.0, ["q_proj", "v_proj", "o_proj", "gate_proj"])]),
}


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Each model's three adapters saved by PEFT itself (non-zero lora_B)."""
    root = tmp_path_factory.mktemp("adapters")
    for model_name, (build, specs) in PEFT_SPECS.items():
        for i, (name, r, alpha, targets) in enumerate(specs):
            pm = peft.get_peft_model(build(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                              fan_in_fan_out=model_name == "gpt2"))
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for key, p in pm.named_parameters():
                    if "lora_B" in key:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            pm.save_pretrained(str(root / model_name / name))
    return root


def _peft_model(saved, model_name, n):
    build, specs = PEFT_SPECS[model_name]
    pm = peft.PeftModel.from_pretrained(build(), str(saved / model_name / specs[0][0]), adapter_name=specs[0][0])
    for name, *_ in specs[1:n]:
        pm.load_adapter(str(saved / model_name / name), adapter_name=name)
    return pm.eval()


def _ids(batch):
    return torch.randint(1, 100, (batch, 7), generator=torch.Generator().manual_seed(5))


NAMES = {1: ["a", "__base__", "a"], 3: ["b", "__base__", "a", "c", "b"]}


@pytest.mark.parametrize("model_name", sorted(PEFT_SPECS))
@pytest.mark.parametrize("n", [1, 3])
def test_from_peft_adapter_names_forward_matches_peft(saved_adapters, model_name, n):
    pm = _peft_model(saved_adapters, model_name, n)
    ids = _ids(len(NAMES[n]))
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=NAMES[n]).logits
        want_active = pm(input_ids=ids).logits
    lk.from_peft(pm)
    layers = [m for m in pm.modules() if isinstance(m, lk.LoRALinear)]
    assert layers and not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules())
    assert {a for m in layers for a in m.adapter_names} == {s[0] for s in PEFT_SPECS[model_name][1][:n]}
    with torch.no_grad():
        assert rel_err(pm(input_ids=ids, adapter_names=NAMES[n]).logits, want) <= FP32_TOL
        assert rel_err(pm(input_ids=ids).logits, want_active) <= FP32_TOL
    with pytest.raises(ValueError, match="non-existing adapter"):
        pm(input_ids=ids, adapter_names=["zz"] * len(NAMES[n]))


@pytest.mark.parametrize("model_name", sorted(PEFT_SPECS))
def test_from_peft_generate_and_set_adapter_match_peft(saved_adapters, model_name):
    pm = _peft_model(saved_adapters, model_name, 3)
    ids, names = _ids(4), ["c", "a", "__base__", "b"]
    kw = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = pm.generate(input_ids=ids, adapter_names=names, **kw)
        base_rows = pm.generate(input_ids=ids, adapter_names=["__base__"] * 4, **kw)
        want_beams = pm.generate(input_ids=ids, adapter_names=names, num_beams=2, max_new_tokens=2,
                                 do_sample=False, pad_token_id=0)
        per_adapter = {}
        for name in ("b", "c", "a"):
            pm.set_adapter(name)
            per_adapter[name] = pm(input_ids=ids).logits
    lk.from_peft(pm)
    with torch.no_grad():
        assert torch.equal(pm.generate(input_ids=ids, adapter_names=names, **kw), want)
        for name in ("c", "b", "a"):
            pm.set_adapter(name)
            assert rel_err(pm(input_ids=ids).logits, per_adapter[name]) <= FP32_TOL
        beams = {"num_beams": 2, "max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(pm.generate(input_ids=ids, adapter_names=names, **beams), want_beams)
    lora = next(m for m in pm.modules() if isinstance(m, lk.LoRALinear) and "b" in m.adapter_names)
    assert not any(p.requires_grad for p in multi.adapter_parameters(lora, "b"))  # PEFT's: only the active trains
    pm.set_adapter("c")
    pm.delete_adapter("c")  # the active one: "a" (the first left, sorted) becomes active
    assert pm.active_adapter == "a" and list(pm.peft_config) == ["a", "b"]
    assert all("c" not in m.adapter_names for m in pm.modules() if isinstance(m, lk.LoRALinear))
    assert not any("lora_adapters.c" in key for key in pm.state_dict())
    with torch.no_grad():
        assert rel_err(pm(input_ids=ids).logits, per_adapter["a"]) <= FP32_TOL
        assert torch.equal(pm.generate(input_ids=ids, adapter_names=["__base__", "a", "__base__", "b"], **kw),
                           torch.cat([base_rows[:1], want[1:2], base_rows[2:3], want[3:]]))
    with torch.no_grad():  # merge_and_unload folds in the active adapter ("a"), as PEFT's
        assert rel_err(pm.merge_and_unload()(input_ids=ids).logits, per_adapter["a"]) <= FP32_TOL


@pytest.mark.parametrize("model_name", sorted(PEFT_SPECS))
def test_from_peft_mixed_batch_training_gives_each_adapter_its_own_gradient(saved_adapters, model_name):
    pm = _peft_model(saved_adapters, model_name, 3).train()
    names = ["b", "a", "c", "__base__", "b"]
    ids = _ids(len(names))
    with pytest.raises(ValueError, match="training mode"):  # PEFT refuses; from_peft's model does not
        pm(input_ids=ids, adapter_names=names)
    lk.from_peft(pm)
    params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    g = torch.randn(len(names), 7, 100, generator=torch.Generator().manual_seed(2))
    (pm(input_ids=ids, adapter_names=names).logits * g).sum().backward()
    mixed = {n: p.grad.clone() for n, p in params.items()}
    for name in ("a", "b", "c"):
        rows = [i for i, n in enumerate(names) if n == name]
        for p in params.values():
            p.grad = None
        pm.set_adapter(name)
        for p in params.values():
            p.requires_grad_(True)
        (pm(input_ids=ids[rows]).logits * g[rows]).sum().backward()
        own = [m for m in pm.modules() if isinstance(m, lk.LoRALinear) and name in m.adapter_names]
        for p in (p for m in own for p in multi.adapter_parameters(m, name)):
            key = next(k for k, q in params.items() if q is p)
            assert rel_err(mixed[key], p.grad) <= FP32_TOL, key


@pytest.mark.parametrize("model_name", sorted(PEFT_SPECS))
def test_save_and_load_adapter_per_name_round_trip(saved_adapters, model_name, tmp_path):
    pm = _peft_model(saved_adapters, model_name, 3)
    ids, names = _ids(4), ["c", "a", "__base__", "b"]
    lk.from_peft(pm)
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=names).logits
    for name in ("a", "b", "c"):
        lk.save_adapter(pm, str(tmp_path / name), adapter_name=name)
        with torch.no_grad():  # PEFT loads each file: the adapter's outputs
            pm.set_adapter(name)
            mine = pm(input_ids=ids).logits
            theirs = peft.PeftModel.from_pretrained(PEFT_SPECS[model_name][0](), str(tmp_path / name))(input_ids=ids)
            assert rel_err(theirs.logits, mine) <= FP32_TOL
    model = PEFT_SPECS[model_name][0]()
    for name in ("b", "a", "c"):
        lk.load_adapter(model, str(tmp_path / name), adapter_name=name)
    layers = [m for m in model.modules() if isinstance(m, lk.LoRALinear)]
    assert all(p.requires_grad for m in layers for p in multi.all_parameters(m))
    with torch.no_grad(), lk.adapter_batch(model, [None if n == "__base__" else n for n in names]):
        assert rel_err(model(input_ids=ids).logits, want) <= FP32_TOL
    pm.save_pretrained(str(tmp_path / "all"))  # PEFT's layout: one folder per (non-default) adapter
    assert sorted(os.listdir(tmp_path / "all")) == ["a", "b", "c"]
    back = peft.PeftModel.from_pretrained(PEFT_SPECS[model_name][0](), str(tmp_path / "all" / "b"))
    pm.set_adapter("b")
    with torch.no_grad():
        assert rel_err(back(input_ids=ids).logits, pm(input_ids=ids).logits) <= FP32_TOL
    with pytest.raises(ValueError, match="no LoRALinear layer holds"):
        lk.save_adapter(pm, str(tmp_path / "zz"), adapter_name="zz")


def test_from_peft_several_dora_adapters_switch_like_peft():
    pm = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], use_dora=True,
                                                      fan_in_fan_out=True), adapter_name="x")
    pm.add_adapter("y", peft.LoraConfig(r=3, lora_alpha=2, target_modules=["c_attn", "c_fc"], use_dora=True,
                                        fan_in_fan_out=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if "lora_B" in key or "lora_magnitude_vector" in key:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    ids, want = _ids(2), {}
    with torch.no_grad():
        for name in ("y", "x"):
            pm.set_adapter(name)
            want[name] = pm.eval()(input_ids=ids).logits
    lk.from_peft(pm)
    with torch.no_grad():
        for name in ("y", "x", "y"):
            pm.set_adapter(name)
            assert rel_err(pm(input_ids=ids).logits, want[name]) <= FP32_TOL
        with pytest.raises(NotImplementedError, match="DoRA"):
            pm(input_ids=ids, adapter_names=["x", "y"])


def test_gradient_checkpointing_with_backward_inside_the_block():
    """The checkpointed forward is recomputed during backward: inside the block it is routed too."""
    pm = _two_adapter_gpt2()
    names = ["b", None, "a"]
    ids = _ids(3)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(pm)
        if checkpointing:
            model.gradient_checkpointing_enable()
        with lk.adapter_batch(model.train(), names):
            model(input_ids=ids).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for key, want in grads[0].items():
        assert rel_err(grads[1][key], want) <= FP32_TOL, key


def _two_adapter_gpt2():
    model = lk.apply_lora(_gpt2(), ["c_attn", "c_fc"], r=2, alpha=4)
    for lora in (m for m in model.modules() if isinstance(m, lk.LoRALinear)):
        lora.add_adapter("b", 3, 5)
        multi.rename(lora, "default", "a")
        with torch.no_grad():
            for name in lora.adapter_names:
                multi.param(lora, name, "lora_B").normal_()
    return model


def test_from_peft_encoder_decoder_beam_search_with_adapter_names(tmp_path):
    """T5: beam search repeats the decoder's samples, not the encoder's (PEFT's rule)."""
    def t5():
        torch.manual_seed(0)
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=2, vocab_size=100, dropout_rate=0.0,
            decoder_start_token_id=0)).eval()
    for i, (name, r) in enumerate((("a", 2), ("b", 3))):
        pm = peft.get_peft_model(t5(), peft.LoraConfig(r=r, lora_alpha=4, target_modules=["q", "v", "wo"]))
        with torch.no_grad():
            for key, p in pm.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
        pm.save_pretrained(str(tmp_path / name))
    pm = peft.PeftModel.from_pretrained(t5(), str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    ids, names = _ids(3), ["b", "__base__", "a"]
    kw = {"num_beams": 2, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = pm.generate(input_ids=ids, adapter_names=names, **kw)
        lk.from_peft(pm)
        assert torch.equal(pm.generate(input_ids=ids, adapter_names=names, **kw), want)
