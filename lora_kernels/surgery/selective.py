"""Methods that train a subset of the model's own parameters: LN-tuning and BitFit."""
from torch import nn

from ..nn import FusedLayerNorm
from ._common import _freeze_all_but, _set_submodule


def ln_tuning(model: nn.Module) -> nn.Module:
    """Replace every ``nn.LayerNorm`` by a ``FusedLayerNorm`` sharing its parameters and train only those."""
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.LayerNorm) and not isinstance(module, FusedLayerNorm):
            fused = FusedLayerNorm.from_layer_norm(module)  # shares the Parameter objects
            fused.train(module.training)
            _set_submodule(model, name, fused)
    norms = [m for m in model.modules() if isinstance(m, FusedLayerNorm)]
    if not norms:
        raise ValueError(f"ln_tuning: {type(model).__name__} has no nn.LayerNorm submodule")
    _freeze_all_but(model, [p for m in norms for p in (m.weight, m.bias) if p is not None])
    return model


def bitfit(model: nn.Module) -> nn.Module:
    """Train only the parameters whose name ends in 'bias'."""
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    if not biases:
        raise ValueError(f"bitfit: {type(model).__name__} has no parameter whose name ends in 'bias'")
    _freeze_all_but(model, biases)
    return model
