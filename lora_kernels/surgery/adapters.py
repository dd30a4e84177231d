"""add_adapters: a BottleneckAdapter after each sub-layer's output projection (Houlsby / Pfeiffer)."""
from torch import nn

from ..nn import BottleneckAdapter, LoRALinear
from ._common import _freeze_all_but, _in_out_features, _is_linear, _name_matches, _set_submodule


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
