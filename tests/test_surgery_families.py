"""Surgery on model families beyond HF BERT/ViT/GPT-2/CLIP: timm ViT/DeiT/Swin, open_clip,
nn.MultiheadAttention blocks (torch's TransformerEncoderLayer and a hand-built one), HF LLaMA
and T5; and PEFT's adapter switches after from_peft.

The point is that every inserted module is on the forward path: at zero init the output is
the original's, and once its weights are perturbed the output moves and each inserted
module's weights get a nonzero gradient (a module that never runs gets none). float64, CPU.
"""
import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.ops import lora as lora_op
from lora_kernels.surgery import AdapterAfter
from lora_kernels.surgery.structure import sublayer_outputs

from _third_party import import_without_torchvision
from conftest import DEVICE, backends_for

TIGHT = 1e-12
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:peft")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape and torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def perturb(params, scale=0.3, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def inserted(model):
    """{name: [trainable tensors]} of every adapter and LoRA layer in the model."""
    found = {n: list(m.adapter.parameters()) for n, m in model.named_modules() if isinstance(m, AdapterAfter)}
    found.update({n: [m.lora_A, m.lora_B] for n, m in model.named_modules()
                  if isinstance(m, (lk.LoRALinear, lk.surgery.LoRAMultiheadAttention))})
    return found


def check_on_path(model, forward, ref):
    """Zero init = original; perturbed = different; each inserted tensor gets a nonzero gradient."""
    modules = inserted(model)
    assert modules, "surgery inserted nothing"
    assert rel_err(forward(model), ref) <= TIGHT
    perturb([a.up.weight for n, m in model.named_modules() if isinstance(m, AdapterAfter) for a in [m.adapter]]
            + [m.lora_B for m in model.modules() if isinstance(m, (lk.LoRALinear, lk.surgery.LoRAMultiheadAttention))])
    out = forward(model)
    assert rel_err(out, ref) > 1e-3
    out.mul(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)).sum().backward()
    dead = [f"{n}:{i}" for n, ps in modules.items() for i, p in enumerate(ps)
            if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    return modules


def eval64(model):
    return model.double().eval()


# --------------------------------------------------------------------------- timm

def _timm(kind):
    timm = import_without_torchvision("timm")
    torch.manual_seed(0)
    if kind == "swin":
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=4,
                                  window_size=2, depths=(1, 1), num_heads=(2, 2), embed_dim=8, num_classes=3)
    else:
        name = {"vit": "vit_tiny_patch16_224", "deit": "deit_tiny_distilled_patch16_224"}[kind]
        model = timm.create_model(name, pretrained=False, img_size=16, patch_size=8, depth=2, embed_dim=16,
                                  num_heads=2, num_classes=3)
    return eval64(model)


def _pixels():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


TIMM_BLOCKS = {"vit": ("blocks.{}", 2), "deit": ("blocks.{}", 2), "swin": ("layers.{}.blocks.0", 2)}


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("kind", sorted(TIMM_BLOCKS))
def test_timm_adapters(kind, placement):
    model = _timm(kind)
    x = _pixels()
    ref = model(x)
    lk.add_adapters(model, placement, bottleneck=4)
    block, n = TIMM_BLOCKS[kind]
    subs = ("attn.proj", "mlp.fc2") if placement == "houlsby" else ("mlp.fc2",)
    assert set(inserted(model)) == {f"{block.format(i)}.{s}" for i in range(n) for s in subs}
    check_on_path(model, lambda m: m(x), ref)


def test_timm_lora():
    model = _timm("vit")
    x = _pixels()
    ref = model(x)
    lk.apply_lora(model, ["qkv", "attn.proj", "fc1", "fc2"], r=2)
    assert len(inserted(model)) == 8
    check_on_path(model, lambda m: m(x), ref)


# --------------------------------------------------------------------------- open_clip

def _open_clip():
    open_clip = import_without_torchvision("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=8, vision_cfg=dict(image_size=16, layers=2, width=16, patch_size=8, head_width=8),
                           text_cfg=dict(context_length=6, vocab_size=50, width=16, heads=2, layers=2))
    return eval64(model)


def _clip_forward(model):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 50, (2, 6), generator=g)
    image_features, text_features, _ = model(_pixels(), text)
    return torch.cat([image_features.flatten(), text_features.flatten()])


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_open_clip_adapters(placement):
    model = _open_clip()
    ref = _clip_forward(model)
    lk.add_adapters(model, placement, bottleneck=4)
    towers = [f"{t}transformer.resblocks.{i}" for t in ("visual.", "") for i in (0, 1)]
    subs = ("attn", "mlp.c_proj") if placement == "houlsby" else ("mlp.c_proj",)
    assert set(inserted(model)) == {f"{b}.{s}" for b in towers for s in subs}
    if placement == "houlsby":  # on the attention module itself, never on its unused out_proj
        assert isinstance(model.get_submodule("transformer.resblocks.0.attn.module"), nn.MultiheadAttention)
    check_on_path(model, _clip_forward, ref)


def test_open_clip_lora_on_multihead_attention():
    """LoRA on open_clip's nn.MultiheadAttention (in- and out-projection) and MLP; out_proj alone
    is refused (MHA never calls it)."""
    model = _open_clip()
    ref = _clip_forward(model)
    with pytest.raises(ValueError, match="never calls it"):
        lk.apply_lora(model, ["out_proj"])
    with pytest.raises(ValueError, match="no dropout"):
        lk.apply_lora(model, ["attn", "c_fc"], dropout=0.1)
    assert not inserted(model)  # refused before touching anything
    lk.apply_lora(model, ["attn", "c_fc", "c_proj"], r=2)
    blocks = [f"{t}transformer.resblocks.{i}" for t in ("visual.", "") for i in (0, 1)]
    assert set(inserted(model)) == {f"{b}.{s}" for b in blocks
                                    for s in ("attn", "attn.base_layer.out_proj", "mlp.c_fc", "mlp.c_proj")}
    assert isinstance(model.get_submodule("transformer.resblocks.0.attn"), lk.surgery.LoRAMultiheadAttention)
    check_on_path(model, _clip_forward, ref)


# --------------------------------------------------------------------------- nn.MultiheadAttention blocks

class MHABlock(nn.Module):
    """A pre-norm block as many vision/speech models write it: sequence-first MHA, weights asked for."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(d, 2 * d + 1), nn.GELU(), nn.Linear(2 * d + 1, d)
        self.weights = None

    def forward(self, x):
        h = self.norm1(x)
        out, self.weights = self.self_attn(h, h, h, need_weights=True)
        x = x + out
        return x + self.mlp(self.norm2(x))


def _tokens(batch_first=True):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x if batch_first else x.transpose(0, 1)


def test_hand_built_mha_block_lora_then_adapters():
    """LoRA on a sequence-first MHA that returns its weights, then Houlsby adapters around it."""
    model = eval64(nn.Sequential(MHABlock(), MHABlock()))
    x = _tokens(batch_first=False)
    ref = model(x)
    lk.apply_lora(model, ["self_attn"], r=2)
    assert model[1].weights is not None and rel_err(model(x), ref) <= TIGHT
    perturb([m.lora_B for m in model.modules() if isinstance(m, (lk.LoRALinear, lk.surgery.LoRAMultiheadAttention))])
    adapted = model(x)
    assert rel_err(adapted, ref) > 1e-3
    lk.add_adapters(model, "houlsby", bottleneck=4)  # wraps the LoRA'd MHA, not its inner module
    assert isinstance(model.get_submodule("0.self_attn.module"), lk.surgery.LoRAMultiheadAttention)
    for ps in inserted(model).values():  # add_adapters froze the LoRA weights: train both here
        for p in ps:
            p.requires_grad_(True)
    check_on_path(model, lambda m: m(x), adapted)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_hand_built_mha_block(placement):
    model = eval64(nn.Sequential(MHABlock(), MHABlock()))
    x = _tokens(batch_first=False)
    ref = model(x)
    ref_weights = model[1].weights.clone()
    lk.add_adapters(model, placement, bottleneck=4)
    subs = ("self_attn", "mlp.fc2") if placement == "houlsby" else ("mlp.fc2",)
    assert set(inserted(model)) == {f"{i}.{s}" for i in (0, 1) for s in subs}
    assert rel_err(model(x), ref) <= TIGHT
    assert rel_err(model[1].weights, ref_weights) <= TIGHT  # need_weights=True: weights still returned
    check_on_path(model, lambda m: m(x), ref)


def test_torch_transformer_encoder_layer_inference_fast_path():
    """nn.TransformerEncoderLayer's eval/no-grad fast path reads its weights and calls no sub-module;
    surgery turns it off for the layers it touches, so inserted modules still run there."""
    for surgery in (lambda m: lk.add_adapters(m, "houlsby", bottleneck=4),
                    lambda m: lk.apply_lora(m, ["linear1"]), lambda m: lk.apply_lora(m, ["self_attn"])):
        torch.manual_seed(0)
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 33, dropout=0.0, batch_first=True), 2,
                                      enable_nested_tensor=False).float().eval()
        x = _tokens().float()
        with torch.no_grad():
            ref = model(x)
        surgery(model)
        perturb([p for ps in inserted(model).values() for p in ps])
        with torch.no_grad():
            out = model(x)
        assert rel_err(out, ref) > 1e-3


@pytest.mark.parametrize("method", ["houlsby", "lora"])
def test_torch_transformer_encoder_layer_on_path(method):
    torch.manual_seed(0)
    model = eval64(nn.TransformerEncoderLayer(16, 2, 33, dropout=0.0, batch_first=True))
    x = _tokens()
    ref = model(x)
    if method == "lora":
        lk.apply_lora(model, ["self_attn", "linear1", "linear2"], r=2)
    else:
        lk.add_adapters(model, method, bottleneck=4)
    assert set(inserted(model)) == ({"self_attn", "linear2"} if method == "houlsby" else
                                    {"self_attn", "self_attn.base_layer.out_proj", "linear1", "linear2"})
    check_on_path(model, lambda m: m(x), ref)


# --------------------------------------------------------------------------- HF LLaMA, T5

def _hf():
    return pytest.importorskip("transformers")


def _llama():
    tf = _hf()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=23, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=40, attn_implementation="eager")
    return eval64(tf.LlamaModel(cfg))


def _t5():
    tf = _hf()
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=16, d_ff=23, num_layers=2, num_decoder_layers=1, num_heads=2, d_kv=8, vocab_size=40,
                      dropout_rate=0.0, decoder_start_token_id=0, attn_implementation="eager")
    return eval64(tf.T5Model(cfg))


def _ids():
    return torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(1))


HF = {"llama": (_llama, lambda m: m(input_ids=_ids()).last_hidden_state,
                {f"layers.{i}.{s}" for i in (0, 1) for s in ("self_attn.o_proj", "mlp.down_proj")}),
      "t5": (_t5, lambda m: m(input_ids=_ids(), decoder_input_ids=_ids()).last_hidden_state,
             {f"encoder.block.{i}.layer.{s}" for i in (0, 1) for s in ("0.SelfAttention.o", "1.DenseReluDense.wo")}
             | {"decoder.block.0.layer.0.SelfAttention.o", "decoder.block.0.layer.1.EncDecAttention.o",
                "decoder.block.0.layer.2.DenseReluDense.wo"})}


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_decoder_and_encoder_decoder_families(name):
    build, forward, expected = HF[name]
    model = build()
    ref = forward(model)
    found = sublayer_outputs(model)
    assert set(found["attention"] + found["ffn"]) == expected
    lk.add_adapters(model, "houlsby", bottleneck=4)
    assert set(inserted(model)) == expected
    check_on_path(model, forward, ref)


def _names_only():
    """Families whose placement is only checked by name here (the rules above run them)."""
    tf = _hf()
    small = dict(hidden_size=16, intermediate_size=23, num_hidden_layers=1, num_attention_heads=2, vocab_size=40)
    return {"roberta": (tf.RobertaModel(tf.RobertaConfig(**small)),
                        {"encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"}),
            "mistral": (tf.MistralModel(tf.MistralConfig(num_key_value_heads=1, **small)),
                        {"layers.0.self_attn.o_proj", "layers.0.mlp.down_proj"}),
            "qwen2": (tf.Qwen2Model(tf.Qwen2Config(num_key_value_heads=1, **small)),
                      {"layers.0.self_attn.o_proj", "layers.0.mlp.down_proj"}),
            "distilbert": (tf.DistilBertModel(tf.DistilBertConfig(dim=16, hidden_dim=23, n_layers=1, n_heads=2,
                                                                  vocab_size=40)),
                           {"transformer.layer.0.attention.out_lin", "transformer.layer.0.ffn.lin2"})}


def test_more_hf_families_placement_by_structure():
    for name, (model, expected) in _names_only().items():
        found = sublayer_outputs(model)
        assert set(found["attention"] + found["ffn"]) == expected, name
        assert len(found["attention"]) == len(found["ffn"]) == 1, name


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
    lora.merge()
    assert rel_err(model.attn(x, x, x)[0], ref) <= TIGHT
    lora.unmerge()
    lora.enable_adapters(False)
    assert rel_err(model.attn(x, x, x)[0], mha.forward(x, x, x)[0]) <= TIGHT


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
    perturb([m.lora_B for m in model.modules() if isinstance(m, (lk.LoRALinear, lk.surgery.LoRAMultiheadAttention))])
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
