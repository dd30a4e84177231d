"""make bench's models: the base GPT-2, each adapted variant built by hand with lora_kernels'
modules, their eager (plain PyTorch) twins, and the correctness check run before any timing."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from latency_config import (ADAPTER_L, ADAPTER_L_EAGER, BASE, EAGER_OF, GPT2_MEDIUM, HOULSBY, HOULSBY_EAGER,
                            INIT_STD, LN_TUNING, MERGED, UNMERGED, UNMERGED_EAGER, VARIANTS, Config)
import lora_kernels as lk


class AdaptedOutput(nn.Module):
    """``adapter(module(x))``: a bottleneck adapter in series after an existing layer."""

    def __init__(self, module: nn.Module, adapter: nn.Module):
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.module(*args, **kwargs))


def base_model(cfg: Config):
    """A randomly initialised GPT2Model (no LM head) in eval mode, on cfg's device and dtype."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(cfg.seed)
    special = min(50256, cfg.vocab_size - 1)  # GPT-2's <|endoftext|>, kept inside a shrunk vocabulary
    gpt2 = GPT2Config(**{**GPT2_MEDIUM, "n_layer": cfg.layers, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                         "vocab_size": cfg.vocab_size, "bos_token_id": special, "eos_token_id": special})
    model = GPT2Model(gpt2)
    return model.to(device=cfg.device, dtype=cfg.torch_dtype).eval()


def _lora_variant(base: nn.Module, cfg: Config, merge: bool) -> nn.Module:
    model = copy.deepcopy(base)
    for block in model.h:
        lora = lk.LoRALinear.from_linear(block.attn.c_attn, r=cfg.rank, alpha=cfg.alpha)
        with torch.no_grad():
            lora.lora_B.normal_(0.0, INIT_STD)  # non-zero update: the low-rank path does real work
        block.attn.c_attn = lora
        if merge:
            lora.merge()
    return model.eval()


def _adapter(cfg: Config, like: torch.Tensor) -> lk.BottleneckAdapter:
    adapter = lk.BottleneckAdapter(cfg.n_embd, bottleneck=cfg.bottleneck, activation="gelu",
                                   device=like.device, dtype=like.dtype)
    with torch.no_grad():
        adapter.up.weight.normal_(0.0, INIT_STD)  # not the identity: the adapter's output matters
        adapter.up.bias.normal_(0.0, INIT_STD)
    return adapter


def _adapter_variant(base: nn.Module, cfg: Config, placement: str) -> nn.Module:
    model = copy.deepcopy(base)
    for block in model.h:
        like = block.mlp.c_proj.weight
        if placement == "houlsby":
            block.attn.c_proj = AdaptedOutput(block.attn.c_proj, _adapter(cfg, like))
            block.mlp.c_proj = AdaptedOutput(block.mlp.c_proj, _adapter(cfg, like))
        else:  # Lin et al.: one adapter after the MLP, with its own LayerNorm in front
            norm = lk.FusedLayerNorm(cfg.n_embd, device=like.device, dtype=like.dtype)
            block.mlp.c_proj = AdaptedOutput(block.mlp.c_proj, nn.Sequential(norm, _adapter(cfg, like)))
    return model.eval()


# The eager rows: the same parameters through the plain PyTorch ops that PEFT-style code runs,
# in the model's dtype. (Not lora_kernels' torch backend: that is the correctness reference,
# which computes in fp32 and spells GELU out, so it would flatter the fused rows on a GPU.)

class EagerTwin(nn.Module):
    """Holds one lora_kernels module; the subclass's forward runs its parameters eagerly."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused = fused


class EagerLoRA(EagerTwin):
    """PEFT's LoRA forward: base(x) + B(A(x))·scaling (dropout is off in eval)."""

    def forward(self, x):
        m = self.fused
        return F.linear(x, m.base_weight(), m.bias) + F.linear(F.linear(x, m.lora_A), m.lora_B) * m.scaling


class EagerAdapter(EagerTwin):
    """x + up(act(down(x))), times the adapter's scale when it is not 1."""

    ACT = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "silu": F.silu}

    def forward(self, x):
        a = self.fused
        z = F.linear(self.ACT[a.activation](F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        return x + z if a.scale == 1.0 else x + a.scale * z


class EagerLayerNorm(EagerTwin):
    def forward(self, x):
        n = self.fused
        return F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)


EAGER_MODULES = {lk.LoRALinear: EagerLoRA, lk.BottleneckAdapter: EagerAdapter, lk.FusedLayerNorm: EagerLayerNorm}


def eager_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharing its parameters, with every lora_kernels module run eagerly."""
    twin = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) in EAGER_MODULES:
                setattr(parent, name, EAGER_MODULES[type(child)](child))
            else:
                swap(child)
    swap(twin)
    return twin.eval()


def _ln_tuning_variant(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    lk.ln_tuning(model)
    return model.eval()


def build_variants(cfg: Config) -> dict:
    """The models of the table, keyed by row name (in VARIANTS order), all with the same base
    weights; each eager row shares its fused row's model.

    Both LoRA variants draw A and B from the same seed, so they hold the same update.
    """
    base = base_model(cfg)
    variants = {BASE: base}
    for name, merge in ((MERGED, True), (UNMERGED, False)):
        torch.manual_seed(cfg.seed + 1)
        variants[name] = _lora_variant(base, cfg, merge=merge)
    torch.manual_seed(cfg.seed + 2)
    variants[HOULSBY] = _adapter_variant(base, cfg, "houlsby")
    variants[ADAPTER_L] = _adapter_variant(base, cfg, "lin")
    variants[LN_TUNING] = _ln_tuning_variant(base)
    for eager, fused in EAGER_OF.items():
        variants[eager] = eager_twin(variants[fused])
    return {name: variants[name] for name in VARIANTS}


def adaptation_params(model: nn.Module) -> int:
    """Number of parameters the adaptation adds (the paper's |Θ|)."""
    count = 0
    for module in model.modules():
        if isinstance(module, lk.LoRALinear):
            count += module.lora_A.numel() + module.lora_B.numel()
        elif isinstance(module, (lk.BottleneckAdapter, lk.FusedLayerNorm)):
            count += sum(p.numel() for p in module.parameters())
    return count


def equivalence_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Allowed relative difference between merged and unmerged LoRA through the whole model."""
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        return 1e-2 if tf32 else 1e-4
    return {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-10)


def relative_difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def last_hidden_states(variants: dict, input_ids: torch.Tensor) -> dict:
    with torch.inference_mode():
        return {name: model(input_ids, use_cache=False).last_hidden_state for name, model in variants.items()}


def check_variants(variants: dict, cfg: Config) -> dict:
    """Merged LoRA must equal unmerged LoRA; every adapted variant must differ from the base.

    Returns the relative differences; raises AssertionError when a check fails.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    ids = torch.randint(0, cfg.vocab_size, (2, min(32, max(s for _, s in cfg.settings))), generator=gen)
    out = last_hidden_states(variants, ids.to(cfg.device))
    for name, h in out.items():
        assert torch.isfinite(h).all(), f"{name}: non-finite hidden states"
    tol = equivalence_tolerance(cfg.torch_dtype, torch.device(cfg.device))
    diffs = {"tolerance": tol, "merged_vs_unmerged": relative_difference(out[MERGED], out[UNMERGED])}
    for name in (UNMERGED_EAGER, HOULSBY_EAGER, ADAPTER_L_EAGER, LN_TUNING):
        reference = EAGER_OF.get(name, BASE)  # LN-tuning (γ=1, β=0 untouched) equals the base
        diffs[f"{name} vs {reference}"] = relative_difference(out[name], out[reference])
        assert diffs[f"{name} vs {reference}"] <= tol, (
            f"{name} differs from {reference}: {diffs[f'{name} vs {reference}']:.2e} > {tol:.0e}")
    for name in (MERGED, HOULSBY, ADAPTER_L):
        diffs[f"{name} vs base"] = relative_difference(out[name], out[BASE])
    assert diffs["merged_vs_unmerged"] <= tol, (
        f"LoRA merged and unmerged outputs differ: relative difference "
        f"{diffs['merged_vs_unmerged']:.2e} > {tol:.0e}")
    for name in (MERGED, HOULSBY, ADAPTER_L):
        # an adaptation must change the output by more than the noise allowed between equivalents
        assert diffs[f"{name} vs base"] > tol, f"{name} output equals the base model's: adaptation is a no-op"
    return diffs
