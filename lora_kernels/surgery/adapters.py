"""add_adapters: a BottleneckAdapter after each sub-layer's output (Houlsby / Pfeiffer)."""
from torch import nn

from ..nn import BottleneckAdapter, LoRALinear
from ._common import _freeze_all_but, _in_out_features, _is_linear, _set_submodule
from .mha import LoRAMultiheadAttention
from .structure import DESCRIPTION, keep_fast_paths_off, sublayer_outputs


class AdapterAfter(nn.Module):
    """Runs ``module`` and then ``adapter`` on its output.

    Wrapping (rather than patching forwards) keeps the original projection reachable as
    ``<name>.module`` and the adapter as ``<name>.adapter``. A tuple output (an
    ``nn.MultiheadAttention``'s ``(output, weights)``) keeps its shape: the adapter acts on the
    first element, the attention weights (or None, with ``need_weights=False``) pass through.
    """

    def __init__(self, module: nn.Module, adapter: nn.Module):
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]),) + out[1:]
        return self.adapter(out)

    def __getattr__(self, name):
        # Model code sometimes reads a projection's attributes (``.weight.dtype``, ``.nf``): delegate.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("module", "adapter"):
                raise
            return getattr(self.module, name)


PLACEMENTS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}


def add_adapters(model: nn.Module, placement="houlsby", bottleneck=64, activation="gelu", scale=1.0,
                 freeze_others=True) -> nn.Module:
    """Insert a ``BottleneckAdapter`` after sub-layer outputs, before the residual add.

    "houlsby": after the attention output and the FFN output of every layer; "pfeiffer": after
    the FFN output only. The places are found by structure (``structure.sublayer_outputs``);
    where the attention is an ``nn.MultiheadAttention`` the adapter wraps that module (its
    ``out_proj`` is never called). Afterwards only the adapters' parameters are trainable
    (``freeze_others=False``: the other parameters keep their flags, to combine methods).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {placement!r}")
    found = sublayer_outputs(model)
    for kind in PLACEMENTS[placement]:
        if not found[kind]:
            raise ValueError(f"add_adapters({placement!r}) found no {kind} output in {type(model).__name__}; "
                             f"looked for {DESCRIPTION}")
    names = [name for kind in PLACEMENTS[placement] for name in found[kind]]
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdapterAfter):
            raise ValueError(f"module '{name}' already has an adapter")
        if not (_is_linear(module) or isinstance(module, (LoRALinear, nn.MultiheadAttention, LoRAMultiheadAttention))):
            raise TypeError(f"'{name}' is a {type(module).__name__}, not a linear projection")
    adapters = []
    for name in names:
        module = model.get_submodule(name)
        mha = isinstance(module, (nn.MultiheadAttention, LoRAMultiheadAttention))
        w = module.out_proj.weight if mha else module.weight
        width = module.embed_dim if mha else _in_out_features(module)[1]
        adapter = BottleneckAdapter(width, bottleneck=bottleneck, activation=activation,
                                    scale=scale, device=w.device, dtype=w.dtype)
        adapter.train(module.training)
        _set_submodule(model, name, AdapterAfter(module, adapter))
        adapters.append(adapter)
    keep_fast_paths_off(model, names)
    _freeze_all_but(model, [p for a in adapters for p in a.parameters()], freeze_others)
    return model
