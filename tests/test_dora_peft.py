"""DoRA against PEFT itself (LoraConfig(use_dora=True)) on tiny GPT-2 (Conv1D), BERT and LLaMA:
from_peft gives PEFT's outputs and, over 5 SGD steps, PEFT's training (with and without dropout);
save_adapter / load_adapter round-trip DoRA adapters with PEFT both ways."""
import contextlib
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

import lora_kernels as lk  # noqa: E402
from lora_kernels.ops import dora as dora_op  # noqa: E402
from lora_kernels.reference.lora import dropout_mask  # noqa: E402

from conftest import backends_for  # noqa: E402
from _surgery_helpers import _one_thread  # noqa: E402,F401  (autouse: one intra-op thread here)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
FP32_TOL = 1e-5


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=100,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64))


MODELS = {  # name: (builder, LoRA targets)
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"]),
    "bert": (_bert, ["query", "value", "dense"]),
    "llama": (_llama, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
}


def build(name):
    torch.manual_seed(0)
    model = MODELS[name][0]()
    model.config._attn_implementation = "eager"
    return model.float().eval()


def output(model):
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape and torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def perturb(model, seed=4):
    """Non-zero lora_B and magnitudes off the row norms (a fresh DoRA layer is the identity update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def peft_dora(name, dropout=0.0, targets=None):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or MODELS[name][1], lora_dropout=dropout,
                             use_dora=True, fan_in_fan_out=(name == "gpt2"))
    pm = peft.get_peft_model(build(name), config)
    perturb(pm)
    return pm


class _SameMaskDropout(nn.Module):
    """PEFT's lora_dropout replaced by the mask lora_kernels draws (one seed from torch's generator
    per layer call, the keep-mask from a generator seeded with it), so both models drop the same
    elements and PEFT's own DoRA code runs on them."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return x * dropout_mask(x.shape, self.p, seed, x.device) / (1 - self.p)


def _same_mask_dropouts(pm, p):
    for layer in pm.modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            layer.lora_dropout["default"] = _SameMaskDropout(p)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_from_peft_shares_tensors_and_matches_outputs(name):
    pm = peft_dora(name).eval()
    want = output(pm)
    layers = {n: m for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    mags = {n: m.lora_magnitude_vector["default"].weight for n, m in layers.items()}
    lk.from_peft(pm)
    ours = {n: m for n, m in pm.named_modules() if isinstance(m, lk.LoRALinear)}
    assert set(ours) == set(layers)
    for n, m in ours.items():
        assert m.use_dora and m.lora_magnitude_vector is mags[n] and m.fan_in_fan_out == (name == "gpt2")
    assert rel_err(output(pm), want) <= FP32_TOL


# Besides the default backend, the Triton kernels (under TRITON_INTERPRET=1 in CI's second pass) on
# GPT-2's c_attn only (Conv1D, bias, dropout: the two-product kernel; small, the interpreter is slow).
TRAINING_CASES = [("gpt2", 0.0, None), ("gpt2", 0.2, None), ("bert", 0.1, None), ("llama", 0.0, None),
                  ("llama", 0.2, None)]
if "triton" in backends_for(dora_op.IMPLS):
    TRAINING_CASES.append(("gpt2", 0.2, "triton"))


@pytest.mark.parametrize("name,dropout,backend", TRAINING_CASES, ids=str)
def test_five_training_steps_equal_peft(name, dropout, backend):
    with lk.use_backend(backend) if backend else contextlib.nullcontext():
        _five_steps(name, dropout, ["c_attn"] if backend else None)


def _five_steps(name, dropout, targets):
    ref = peft_dora(name, dropout, targets)
    ours = copy.deepcopy(ref)
    if dropout:
        _same_mask_dropouts(ref, dropout)
    lk.from_peft(ours)
    assert any(isinstance(m, lk.LoRALinear) for m in ours.modules())
    cot = torch.randn(output(ref.eval()).shape, generator=torch.Generator().manual_seed(5))
    for model in (ref, ours):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
        for step in range(5):
            torch.manual_seed(100 + step)  # the same dropout seeds in both models
            opt.zero_grad()
            (output(model) * cot).mean().backward()
            opt.step()
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, lk.LoRALinear)}
    assert layers
    for n, m in layers.items():
        theirs = ref.get_submodule(n)
        for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):
            assert rel_err(getattr(m, kind), getattr(theirs, kind)["default"].weight) <= FP32_TOL, (n, kind)
    assert rel_err(output(ours.eval()), output(ref.eval())) <= FP32_TOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_peft_loads_our_dora_adapter(name, tmp_path):
    model = lk.apply_lora(build(name), MODELS[name][1], r=4, alpha=8, use_dora=True)
    perturb(model)
    want = output(model)
    lk.save_adapter(model, tmp_path)
    keys = __import__("safetensors.torch", fromlist=["_"]).load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    pm = peft.PeftModel.from_pretrained(build(name), tmp_path)
    assert pm.peft_config["default"].use_dora
    assert rel_err(output(pm), want) <= FP32_TOL


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_we_load_peft_dora_adapter(name, tmp_path):
    pm = peft_dora(name).eval()
    want = output(pm)
    pm.save_pretrained(tmp_path)
    model = lk.load_adapter(build(name), tmp_path)
    layers = [m for m in model.modules() if isinstance(m, lk.LoRALinear)]
    assert layers and all(m.use_dora and m.lora_magnitude_vector.requires_grad for m in layers)
    assert rel_err(output(model), want) <= FP32_TOL


def test_dora_and_plain_adapters_do_not_mix(tmp_path):
    model = lk.apply_lora(build("bert"), ["query"], r=2, use_dora=True)
    lk.apply_lora(model, ["value"], r=2)
    with pytest.raises(ValueError, match="use_dora"):
        lk.save_adapter(model, tmp_path)
    peft_dora("bert").save_pretrained(tmp_path)
    plain = lk.apply_lora(build("bert"), MODELS["bert"][1], r=4, alpha=8)
    with pytest.raises(ValueError, match="use_dora"):
        lk.load_adapter(plain, tmp_path)


def test_merge_and_unload_after_from_peft_equals_peft():
    pm = peft_dora("llama").eval()
    want = output(pm)
    merged_peft = copy.deepcopy(pm).merge_and_unload()
    lk.from_peft(pm)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, lk.LoRALinear) for m in merged.modules())
    assert rel_err(output(merged), want) <= FP32_TOL
    assert rel_err(output(merged), output(merged_peft)) <= FP32_TOL
