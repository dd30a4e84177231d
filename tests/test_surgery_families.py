"""Surgery on model families beyond HF BERT/ViT/GPT-2/CLIP: timm ViT/DeiT/Swin, open_clip,
nn.MultiheadAttention blocks (torch's TransformerEncoderLayer and a hand-built one), HF LLaMA
and T5, and by name RoBERTa/DeBERTa-v2/Mistral/Qwen2/DistilBERT.

The point is that every inserted module is on the forward path: at zero init the output is
the original's, and once its weights are perturbed the output moves and each inserted
module's weights get a nonzero gradient (a module that never runs gets none). float64, CPU.
"""
import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.surgery.structure import sublayer_outputs

from _surgery_helpers import (LORA_MODULES, TIGHT, MHABlock, _hf, _ids, _one_thread, _tokens,  # noqa: F401
                              check_on_path, eval64, inserted, perturb, rel_err)
from _third_party import import_without_torchvision

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]


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

def test_hand_built_mha_block_lora_then_adapters():
    """LoRA on a sequence-first MHA that returns its weights, then Houlsby adapters around it."""
    model = eval64(nn.Sequential(MHABlock(), MHABlock()))
    x = _tokens(batch_first=False)
    ref = model(x)
    lk.apply_lora(model, ["self_attn"], r=2)
    assert model[1].weights is not None and rel_err(model(x), ref) <= TIGHT
    perturb([m.lora_B for m in model.modules() if isinstance(m, LORA_MODULES)])
    adapted = model(x)
    assert rel_err(adapted, ref) > 1e-3
    lk.add_adapters(model, "houlsby", bottleneck=4)  # wraps the LoRA'd MHA, not its inner module
    assert isinstance(model.get_submodule("0.self_attn.module"), lk.surgery.LoRAMultiheadAttention)
    for ps in inserted(model).values():  # add_adapters froze the LoRA weights: train both here
        for p in ps:
            p.requires_grad_(True)
    check_on_path(model, lambda m: m(x), adapted)


def test_all_linear_skips_the_output_projection_of_multihead_attention():
    """"all-linear" selects the MLP's linears but not an MHA's out_proj, which the MHA never calls
    (a LoRA there would be dead; apply_lora refuses it when named explicitly)."""
    model = eval64(nn.Sequential(MHABlock(), MHABlock()))
    lk.apply_lora(model, "all-linear", r=2)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, lk.LoRALinear)}
    assert wrapped == {f"{i}.mlp.{fc}" for i in (0, 1) for fc in ("fc1", "fc2")}
    with pytest.raises(ValueError, match="never calls it"):
        lk.apply_lora(eval64(MHABlock()), ["out_proj"], r=2)


def test_dora_on_multihead_attention_is_refused_and_the_model_left_alone():
    model = eval64(MHABlock())
    with pytest.raises(ValueError, match="DoRA on nn.MultiheadAttention"):
        lk.apply_lora(model, ["self_attn", "fc2"], r=2, use_dora=True)
    assert not any(isinstance(m, (lk.LoRALinear, lk.surgery.LoRAMultiheadAttention)) for m in model.modules())
    lk.apply_lora(model, ["fc2"], r=2, use_dora=True)  # its linear layers take DoRA
    assert model.mlp.fc2.use_dora and model.mlp.fc2.lora_magnitude_vector.requires_grad


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
                           {"transformer.layer.0.attention.out_lin", "transformer.layer.0.ffn.lin2"}),
            "deberta-v2": (tf.DebertaV2Model(tf.DebertaV2Config(**small)),
                           {"encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"})}


def test_more_hf_families_placement_by_structure():
    for name, (model, expected) in _names_only().items():
        found = sublayer_outputs(model)
        assert set(found["attention"] + found["ffn"]) == expected, name
        assert len(found["attention"]) == len(found["ffn"]) == 1, name
