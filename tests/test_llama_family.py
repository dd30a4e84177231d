"""LN-tuning (RMSNorm) and LoRA on tiny random LLaMA-family models: LLaMA, Mistral, Qwen2, Qwen3,
Gemma and T5; apply_lora's "all-linear" against PEFT's; PEFT interop round trips.

fp32 where the HF norms' own fp32 arithmetic sets the precision (they compute in fp32 even in an
fp64 model), fp64 where both sides run the same HF code (LoRA against PEFT).
"""
import copy
import importlib

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora_kernels as lk  # noqa: E402
from lora_kernels.ops import rms_norm as rms_op  # noqa: E402
from lora_kernels.surgery import selective  # noqa: E402

from conftest import DEVICE, backends_for  # noqa: E402
from _surgery_helpers import _one_thread  # noqa: E402,F401  (autouse: one intra-op thread here)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:peft")]

BACKENDS = backends_for(rms_op.IMPLS)
TIGHT = 1e-12
F32 = 1e-5
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
VOCAB = 64


def _decoder(config_cls, model_cls, **extra):
    def make():
        cfg = getattr(transformers, config_cls)(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, attention_dropout=0.0, **extra)
        return getattr(transformers, model_cls)(cfg)
    return make


def _t5():
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                dropout_rate=0.0, layer_norm_epsilon=1e-5, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


BUILDERS = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM", sliding_window=None),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "gemma": _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    "t5": _t5,
}
FAMILIES = tuple(BUILDERS)
# (module, class) of every HF norm class ln_tuning knows, to check each one's arithmetic.
HF_NORMS = [(m, c) for m, c in [
    ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("mixtral", "MixtralRMSNorm"),
    ("qwen2", "Qwen2RMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"), ("qwen3", "Qwen3RMSNorm"),
    ("qwen3_moe", "Qwen3MoeRMSNorm"), ("phi3", "Phi3RMSNorm"), ("olmo2", "Olmo2RMSNorm"), ("t5", "T5LayerNorm"),
    ("mt5", "MT5LayerNorm"), ("umt5", "UMT5LayerNorm"), ("longt5", "LongT5LayerNorm"),
    ("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm")]]


def build(name, dtype=torch.float32):
    """The same random weights every call, eval mode, eager attention; the norm weights moved off
    their initial value (ones, or zeros for Gemma) so that a wrong offset or eps shows."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.to(dtype).eval()


def batch(name):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    out = {"input_ids": ids, "labels": ids}
    if name == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
        out["labels"] = out["decoder_input_ids"]
    return out


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape and torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def hf_norms(model):
    return {n: m for n, m in model.named_modules() if selective._rms_rule(m) is not None}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- each HF norm class

def _hf_class(module, cls):
    try:
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16,) * 2, (torch.float16,) * 2,
                                             (torch.bfloat16, torch.float32), (torch.float32,) * 2], ids=str)
@pytest.mark.parametrize("module,cls", HF_NORMS, ids=[c for _, c in HF_NORMS])
def test_each_hf_norm_class_is_matched(module, cls, x_dtype, w_dtype):
    """FusedRMSNorm built by ln_tuning's rule for the class (its eps attribute and offset) gives the
    class's function, within 2× of the class's own rounding error against float64 (HF LLaMA rounds
    before the γ multiply, Gemma after; the fused op rounds once, at the end).
    An fp32 weight under a half input (PEFT's prepare_model_for_kbit_training keeps norms in fp32):
    LLaMA/T5-style classes then return fp32, FusedRMSNorm x's dtype (as FusedLayerNorm does); its
    error is one rounding to x's dtype, checked against the dtype's tolerance."""
    torch.manual_seed(0)
    hf = _hf_class(module, cls)(96, eps=1e-5)
    with torch.no_grad():
        hf.weight.add_(torch.randn(96) * 0.3)
    hf = hf.to(w_dtype)
    wrapper = nn.Sequential(hf)
    lk.ln_tuning(wrapper)
    fused = wrapper[0]
    assert isinstance(fused, lk.FusedRMSNorm) and fused.weight is hf.weight and fused.eps == 1e-5
    xl = (torch.randn(5, 96, dtype=torch.float64) * 3).to(x_dtype)
    offset = selective._rms_rule(hf).offset
    exact = torch.nn.functional.rms_norm(xl.double(), (96,), offset + hf.weight.detach().double(), 1e-5)
    ours, theirs = fused(xl), hf(xl)
    assert ours.dtype == x_dtype
    if w_dtype == x_dtype:
        assert theirs.dtype == x_dtype
        assert rel_err(ours, exact) <= max(2 * rel_err(theirs, exact), 1e-7)
    else:
        assert rel_err(ours, exact) <= TOLERANCE[x_dtype]


def test_register_rms_norm_for_another_class():
    class MyNorm(nn.Module):  # Gemma-style scale, eps under another name
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n) * 0.1)
            self.tiny = 1e-4

        def forward(self, x):
            return torch.nn.functional.rms_norm(x, x.shape[-1:], 1.0 + self.weight, self.tiny)

    model = nn.Sequential(nn.Linear(8, 16), MyNorm(16))
    with pytest.raises(ValueError, match="register_rms_norm"):
        lk.ln_tuning(copy.deepcopy(model))
    x = torch.randn(3, 8)
    expected = model(x)
    lk.surgery.register_rms_norm(MyNorm, offset=1.0, eps_attr="tiny")
    try:
        lk.ln_tuning(model)
    finally:
        selective._REGISTERED.pop(MyNorm)
    assert isinstance(model[1], lk.FusedRMSNorm) and model[1].eps == 1e-4 and model[1].offset == 1.0
    assert trainable(model) == {"1.weight"}
    assert rel_err(model(x), expected) <= F32
    with pytest.raises(TypeError, match="nn.Module"):
        lk.surgery.register_rms_norm(int)


def test_ln_tuning_swaps_torch_rms_norm():
    model = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16), nn.RMSNorm(16, eps=1e-3, elementwise_affine=False))
    with torch.no_grad():
        model[1].weight.add_(torch.randn(16))
    x = torch.randn(3, 8)
    expected = model(x)
    weight = model[1].weight
    lk.ln_tuning(model)
    assert isinstance(model[1], lk.FusedRMSNorm) and model[1].weight is weight and model[1].eps is None
    assert isinstance(model[2], lk.FusedRMSNorm) and model[2].weight is None and model[2].eps == 1e-3
    assert trainable(model) == {"1.weight"}
    assert rel_err(model(x), expected) <= F32


# --------------------------------------------------------------------------- whole models

@pytest.mark.parametrize("name", FAMILIES)
def test_ln_tuning_same_function_shared_parameters(name):
    model, reference = build(name), build(name)
    norms = hf_norms(model)
    rules = {n: selective._rms_rule(m) for n, m in norms.items()}
    assert len(norms) >= 5
    if name == "qwen3":  # the per-head q/k norms are norms too
        assert "model.layers.0.self_attn.q_norm" in norms and "model.layers.1.self_attn.k_norm" in norms
    assert model is lk.ln_tuning(model)
    assert not hf_norms(model)
    for n, old in norms.items():
        new = model.get_submodule(n)
        assert isinstance(new, lk.FusedRMSNorm) and new.weight is old.weight
        assert new.eps == getattr(old, rules[n].eps_attr) and new.offset == (1.0 if name == "gemma" else 0.0)
    assert trainable(model) == {f"{n}.weight" for n in norms}
    inputs = batch(name)
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, reference(**inputs).logits) <= F32


@pytest.mark.parametrize("name", FAMILIES)
def test_ln_tuning_bf16_model_within_2x_of_eager(name):
    """A bf16 model: the LN-tuned logits are as close to float64's as the original model's."""
    exact, eager = build(name, torch.float64), build(name, torch.bfloat16)
    fused = lk.ln_tuning(build(name, torch.bfloat16))
    inputs = batch(name)
    with torch.no_grad():
        want = exact(**inputs).logits
        err_eager, err_fused = (rel_err(m(**inputs).logits, want) for m in (eager, fused))
    assert err_fused <= 2 * err_eager and err_fused <= TOLERANCE[torch.bfloat16], (err_fused, err_eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_ln_tuning_training_matches_eager(name, backend):
    """Five SGD steps (not Adam, whose update would hide a wrongly scaled gradient): the fused
    model's losses and norm-weight updates follow an eager copy whose norm weights alone train."""
    eager = build(name).to(DEVICE)
    fused = lk.ln_tuning(copy.deepcopy(eager))
    norm_weights = {f"{n}.weight" for n in hf_norms(eager)}
    for n, p in eager.named_parameters():
        p.requires_grad_(n in norm_weights)
    assert trainable(eager) == trainable(fused) == norm_weights
    assert not hf_norms(fused) and any(isinstance(m, lk.FusedRMSNorm) for m in fused.modules())
    start = {n: p.detach().clone() for n, p in eager.named_parameters() if p.requires_grad}
    inputs = {k: v.to(DEVICE) for k, v in batch(name).items()}
    losses = []
    for model in (eager, fused):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        steps = []
        for _ in range(5):
            opt.zero_grad()
            with lk.use_backend(backend):
                loss = model(**inputs).loss
            loss.backward()
            opt.step()
            steps.append(loss.item())
        losses.append(steps)
    assert losses[0][-1] < losses[0][0]  # it trains
    for a, b in zip(*losses):
        assert abs(a - b) <= F32 * abs(b), losses
    fused_params = dict(fused.named_parameters())
    for n, p in eager.named_parameters():
        if p.requires_grad:
            assert rel_err(fused_params[n] - start[n], p - start[n]) <= 1e-4, n


def _lora_pairs(ours, pm):
    """(our LoRALinear, PEFT's LoraLayer) by qualified name."""
    theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, lk.LoRALinear)}
    return mine, theirs


@pytest.mark.parametrize("name", FAMILIES)
def test_apply_lora_all_linear_matches_peft(name):
    ours = lk.apply_lora(build(name, torch.float64), "all-linear", r=4, alpha=8)
    pm = peft.get_peft_model(build(name, torch.float64),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    mine, theirs = _lora_pairs(ours, pm)
    assert set(mine) == set(theirs) and len(mine) >= 14
    assert not any(n.endswith("lm_head") for n in mine)
    if name != "t5":
        assert {n.rpartition(".")[2] for n in mine} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"}
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, m in mine.items():
            peft_layer = theirs[n]
            for p, q in ((m.lora_A, peft_layer.lora_A["default"].weight),
                         (m.lora_B, peft_layer.lora_B["default"].weight)):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
                q.copy_(p)
    assert trainable(ours) == {f"{n}.{p}" for n in mine for p in ("lora_A", "lora_B")}
    inputs = batch(name)
    out, ref = ours(**inputs), pm(**inputs)
    assert rel_err(out.logits, ref.logits) <= TIGHT
    out.loss.backward()
    ref.loss.backward()
    for n, m in mine.items():
        assert rel_err(m.lora_A.grad, theirs[n].lora_A["default"].weight.grad) <= 1e-10, n
        assert rel_err(m.lora_B.grad, theirs[n].lora_B["default"].weight.grad) <= 1e-10, n


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
def test_peft_round_trips(name, tmp_path):
    """from_peft keeps PEFT's function; save_adapter's files load in PEFT and in load_adapter."""
    pm = peft.get_peft_model(build(name, torch.float64),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    inputs = batch(name)
    with torch.no_grad():
        expected = pm(**inputs).logits
        lk.from_peft(pm)
        assert len([m for m in pm.modules() if isinstance(m, lk.LoRALinear)]) == 2 * len(LLAMA_TARGETS)
        assert rel_err(pm(**inputs).logits, expected) <= TIGHT
        lk.save_adapter(pm, tmp_path)
        loaded = lk.load_adapter(build(name, torch.float64), tmp_path)
        assert rel_err(loaded(**inputs).logits, expected) <= TIGHT
        again = peft.PeftModel.from_pretrained(build(name, torch.float64), str(tmp_path)).eval()
        assert rel_err(again(**inputs).logits, expected) <= TIGHT
