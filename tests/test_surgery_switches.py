"""Adapter switches: LoRALinear.enable_adapters, PEFT's disable_adapter()/enable_adapter_layers()/
merge_adapter()/set_adapter() after from_peft, and LoRA on nn.MultiheadAttention (its math and
its PEFT interop). float64, CPU, against PEFT's own layers where PEFT is right.
"""
import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.ops import lora as lora_op

from _surgery_helpers import (LORA_MODULES, TIGHT, MHABlock, _hf, _ids, _one_thread, _tokens,  # noqa: F401
                              eval64, perturb, rel_err)
from conftest import DEVICE, backends_for

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:peft")]


# --------------------------------------------------------------------------- switches

@pytest.mark.parametrize("backend_name", backends_for(lora_op.IMPLS))
def test_lora_linear_enable_adapters_switch(backend_name):
    """Disabled: the base product only (no low-rank term, no LoRA gradient) on every backend."""
    torch.manual_seed(0)
    base = nn.Linear(13, 7).double().to(DEVICE)
    layer = lk.LoRALinear.from_linear(copy.deepcopy(base), r=3, alpha=6)
    perturb([layer.lora_B])
    x = torch.randn(5, 13, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with lk.use_backend(backend_name):
        adapted = layer(x)
        assert rel_err(adapted, base(x)) > 1e-3
        layer.enable_adapters(False)
        assert layer.disable_adapters
        out = layer(x)
        assert rel_err(out, base(x)) <= TIGHT
        out.sum().backward()
        assert layer.lora_A.grad is None and layer.lora_B.grad is None
        layer.merge()  # PEFT's rule: a disabled layer unmerges itself and runs the base product
        assert rel_err(layer(x), base(x)) <= TIGHT and not layer.merged
        assert rel_err(layer.weight, base.weight) <= TIGHT
        layer.enable_adapters(True)
        assert rel_err(layer(x), adapted) <= 1e-10


def _peft_pair():
    """A PEFT LoRA BERT (nonzero B) converted by from_peft, and an unconverted deep copy."""
    tf, peft = _hf(), pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=23,
                        vocab_size=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = eval64(tf.BertModel(cfg, add_pooling_layer=False))
    base.config._attn_implementation = "eager"
    ref = base(input_ids=_ids()).last_hidden_state
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])).eval()
    perturb([p for n, p in pm.named_parameters() if "lora_" in n], scale=0.2)
    twin = copy.deepcopy(pm)
    lk.from_peft(pm)
    assert sum(isinstance(m, lk.LoRALinear) for m in pm.modules()) == 4
    return pm, twin, ref


def _same(pm, twin, expected=None):
    """pm (converted) gives twin's (PEFT's own) output, and ``expected`` when given."""
    out, out_twin = (m(input_ids=_ids()).last_hidden_state for m in (pm, twin))
    assert rel_err(out, out_twin) <= TIGHT
    if expected is not None:
        assert rel_err(out, expected) <= TIGHT
    return out


def test_peft_switches_after_from_peft():
    pm, twin, base_out = _peft_pair()
    adapted = _same(pm, twin)
    assert rel_err(adapted, base_out) > 1e-3
    with pm.disable_adapter(), twin.disable_adapter():
        _same(pm, twin, base_out)
    _same(pm, twin, adapted)  # back on after the context

    for model in (pm, twin):
        model.disable_adapter_layers()
    _same(pm, twin, base_out)
    for model in (pm, twin):
        model.enable_adapter_layers()
    _same(pm, twin, adapted)

    for model in (pm, twin):
        model.merge_adapter()
    assert all(m.merged for m in pm.modules() if isinstance(m, lk.LoRALinear))
    _same(pm, twin, adapted)
    with pm.disable_adapter(), twin.disable_adapter():  # merged + disabled: unmerges, base output
        _same(pm, twin, base_out)
    for model in (pm, twin):
        model.merge_adapter()
        model.unmerge_adapter()
    assert not any(m.merged for m in pm.modules() if isinstance(m, lk.LoRALinear))
    _same(pm, twin, adapted)

    for model in (pm, twin):
        model.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in pm.parameters())
    for model in (pm, twin):
        model.set_adapter("default")
    trainable = [[n for n, p in m.named_parameters() if p.requires_grad] for m in (pm, twin)]
    assert len(trainable[0]) == len(trainable[1]) == 8 and all("lora_" in n for n in trainable[0])
    _same(pm, twin, adapted)
    with pytest.raises(ValueError, match="only the adapter that was active"):
        pm.base_model.set_adapter("other")
    with pytest.raises(ValueError, match="only adapter 'default'"):
        pm.merge_adapter(adapter_names=["other"])


# --------------------------------------------------------------------------- PEFT's MHA LoRA

def _statuses(model):
    """PEFT's layer statuses as comparable dicts, without the module type (ours names our class)."""
    return [{k: v for k, v in vars(s).items() if k != "module_type"} for s in model.get_layer_status()]


def test_peft_status_after_from_peft():
    """get_layer_status/get_model_status report the LoRALinear layers as PEFT reports its own
    (PEFT alone raises "No adapter layers found"), through its switches; add_adapter says why not."""
    peft = pytest.importorskip("peft")
    _, twin, _ = _peft_pair()
    twin.add_adapter("other", peft.LoraConfig(r=3, target_modules=["query"]))
    pm = lk.from_peft(copy.deepcopy(twin))
    steps = [lambda m: None, lambda m: m.disable_adapter_layers(), lambda m: m.enable_adapter_layers(),
             lambda m: m.set_adapter("other"), lambda m: m.merge_adapter(), lambda m: m.unmerge_adapter()]
    for step in steps:
        step(pm), step(twin)
        assert _statuses(pm) == _statuses(twin)
        assert vars(pm.get_model_status()) == vars(twin.get_model_status())
    with pm.disable_adapter(), twin.disable_adapter():
        assert _statuses(pm) == _statuses(twin)
    assert _statuses(pm) == _statuses(twin)  # enabled again, the active adapter trainable again
    types = {s.module_type for s in pm.get_layer_status()}
    assert types == {"lora_kernels.LoRALinear"}, types
    with pytest.raises(NotImplementedError, match="before calling lk.from_peft"):
        pm.add_adapter("third", peft.LoraConfig(r=2, target_modules=["query"]))


def _mha_model():
    """The same weights every call."""
    torch.manual_seed(0)
    return eval64(nn.Sequential(MHABlock(), MHABlock()))


# peft 0.21's lora.MultiheadAttention adds the out_proj update twice in its forward and merge
# (W_o + 2·s·B_o·A_o; huggingface/peft PR #3774, open). So output comparisons with PEFT keep the
# out_proj B at zero, and test_lora_multihead_attention_is_the_merged_weights checks the math.
def _zero_out_proj_b(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "out_proj.lora_B" in n:
                p.zero_()


def _mha_peft():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_mha_model(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["self_attn", "fc1"]))
    pm.eval()
    perturb([p for n, p in pm.named_parameters() if "lora_" in n], scale=0.2)
    _zero_out_proj_b(pm)
    return pm


def test_peft_status_of_multihead_attention_after_from_peft():
    twin = _mha_peft()
    pm = lk.from_peft(copy.deepcopy(twin))
    assert _statuses(pm) == _statuses(twin)
    assert {s.module_type for s in pm.get_layer_status()} == {"lora_kernels.LoRAMultiheadAttention",
                                                              "lora_kernels.LoRALinear"}


def test_lora_multihead_attention_is_the_merged_weights():
    """Out = MHA with W_in + s·B·A and W_out + s·B_o·A_o, weights returned; merged gives the same."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2).double().eval()
    model = nn.Sequential()
    model.attn = mha
    lk.apply_lora(model, ["attn"], r=3, alpha=5, use_rslora=True)
    lora = model.attn
    perturb([lora.lora_A, lora.lora_B, lora.base_layer.out_proj.lora_A, lora.base_layer.out_proj.lora_B])
    x = _tokens(batch_first=False)
    w_in = mha.in_proj_weight + 5 / 3 ** 0.5 * lora.lora_B @ lora.lora_A
    out_proj = lora.base_layer.out_proj
    w_out = out_proj.weight + 5 / 3 ** 0.5 * out_proj.lora_B @ out_proj.lora_A
    ref, ref_weights = nn.functional.multi_head_attention_forward(
        x, x, x, 16, 2, w_in, mha.in_proj_bias, None, None, False, 0.0, w_out, out_proj.bias, training=False)
    out, weights = model.attn(x, x, x)
    assert rel_err(out, ref) <= TIGHT and rel_err(weights, ref_weights) <= TIGHT
    params = [lora.lora_A, lora.lora_B, out_proj.lora_A, out_proj.lora_B]
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    grads, ref_grads = (torch.autograd.grad((y * cot).sum(), params) for y in (out, ref))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= TIGHT
    lora.merge()
    assert rel_err(model.attn(x, x, x)[0], ref) <= TIGHT
    lora.unmerge()
    lora.enable_adapters(False)
    assert rel_err(model.attn(x, x, x)[0], mha.forward(x, x, x)[0]) <= TIGHT


def test_lora_multihead_attention_gradcheck():
    torch.manual_seed(0)
    lora = lk.surgery.LoRAMultiheadAttention(nn.MultiheadAttention(4, 2, batch_first=True).double(), r=2, alpha=3)
    perturb([lora.lora_B, lora.base_layer.out_proj.lora_B])
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [lora.lora_A, lora.lora_B, lora.base_layer.out_proj.lora_A, lora.base_layer.out_proj.lora_B]

    def f(x, *values):
        weights = {"lora_A": values[0], "lora_B": values[1], "base_layer.out_proj.lora_A": values[2],
                   "base_layer.out_proj.lora_B": values[3]}
        return torch.func.functional_call(lora, weights, (x, x, x), {"need_weights": False})[0]

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_(True) for p in params]))


def test_from_peft_multihead_attention_same_function_and_switches():
    peft = pytest.importorskip("peft")
    pm = _mha_peft()
    twin = copy.deepcopy(pm)
    x = _tokens(batch_first=False).requires_grad_(True)
    with twin.disable_adapter():
        base_out = twin(x)
    lk.from_peft(pm)
    mha = [m for m in pm.modules() if isinstance(m, lk.surgery.LoRAMultiheadAttention)]
    assert len(mha) == 2 and all(isinstance(m.base_layer.out_proj, lk.LoRALinear) for m in mha)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules())

    def same(expected=None):
        outs = []
        for model in (pm, twin):
            x.grad = None
            out = model(x)
            out.mul(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            outs.append((out, x.grad.clone()))
        assert rel_err(outs[0][0], outs[1][0]) <= TIGHT and rel_err(outs[0][1], outs[1][1]) <= TIGHT
        if expected is not None:
            assert rel_err(outs[0][0], expected) <= TIGHT
        return outs[0][0]

    adapted = same()
    assert rel_err(adapted, base_out) > 1e-3
    with pm.disable_adapter(), twin.disable_adapter():
        same(base_out)
    for model in (pm, twin):
        model.merge_adapter()
    with torch.no_grad():  # merged weights are plain tensors in PEFT's MHA: no graph through them
        assert rel_err(pm(x), twin(x)) <= TIGHT and rel_err(pm(x), adapted) <= TIGHT
    for model in (pm, twin):
        model.unmerge_adapter()
    same(adapted)
    merged = pm.merge_and_unload()
    assert isinstance(merged[0].self_attn, nn.MultiheadAttention)
    assert rel_err(merged(x), adapted) <= 1e-10


def test_multihead_attention_lora_files_move_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    x = _tokens(batch_first=False)
    # ours -> PEFT
    model = lk.apply_lora(_mha_model(), ["self_attn", "fc1"], r=2, alpha=3)
    perturb([m.lora_B for m in model.modules() if isinstance(m, LORA_MODULES)])
    _zero_out_proj_b(model)
    ours = model(x)
    lk.save_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(_mha_model(), tmp_path / "ours").eval()
    assert rel_err(loaded(x), ours) <= TIGHT
    # PEFT -> ours
    pm = _mha_peft()
    expected = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    model = lk.load_adapter(_mha_model(), tmp_path / "peft")
    assert isinstance(model[0].self_attn, lk.surgery.LoRAMultiheadAttention)
    assert rel_err(model(x), expected) <= TIGHT
