"""DoRA pieces of LoRALinear (``use_dora=True``), kept apart so nn/lora.py only calls them.

The magnitude is the Parameter ``lora_magnitude_vector`` ([out]): its state_dict key ends like
the key PEFT writes in its adapter files (``<module>.lora_magnitude_vector``). It starts at the
row norms of W0 + s·BA (= ‖W0‖ while B is zero), as PEFT initialises it.
"""
import torch
from torch import nn

from ..ops.dora import dora_linear
from ..reference import dora as ref


def new_magnitude(module, device=None, dtype=None) -> None:
    """Register an (uninitialised) ``lora_magnitude_vector`` of shape [out]."""
    module.lora_magnitude_vector = nn.Parameter(torch.empty(module.out_features, device=device, dtype=dtype))
    module._dora_merge_scale = None  # c at merge time: unmerge divides by it


@torch.no_grad()
def reset_magnitude(module) -> None:
    mag = module.lora_magnitude_vector
    if mag.device.type != "meta":
        mag.copy_(row_norm(module))


def row_norm(module) -> torch.Tensor:
    """‖W0 + s·BA‖ per output row, from the low-rank structure, in the compute dtype."""
    return ref.row_norm(module.base_weight().detach(), module.lora_A.detach(), module.lora_B.detach(),
                        module.scaling)


def forward(module, x: torch.Tensor) -> torch.Tensor:
    # ‖W0_n‖² is not cached: the Triton norm pass reads W0 anyway (for W0 Aᵀ), so a cache would
    # save a few FMAs per element while risking staleness after an in-place edit of W0's .data.
    return dora_linear(x, module.base_weight(), module.bias, module.lora_A, module.lora_B,
                       module.lora_magnitude_vector, module.scaling, dropout_p=module.dropout,
                       training=module.training)


@torch.no_grad()
def merge(module) -> None:
    """W ← c ⊙ (W0 + s·BA) by rows, c = m / ‖W0 + s·BA‖ (kept for unmerge), in fp32 at least."""
    w = module.base_weight()
    ct = torch.promote_types(w.dtype, torch.float32)
    c = module.lora_magnitude_vector.to(ct) / row_norm(module).to(ct)
    w.copy_((c[:, None] * (w.to(ct) + module.delta_weight().to(ct))).to(w.dtype))
    module._dora_merge_scale = c


@torch.no_grad()
def unmerge(module) -> None:
    w = module.base_weight()
    ct = torch.promote_types(w.dtype, torch.float32)
    w.copy_((w.to(ct) / module._dora_merge_scale[:, None] - module.delta_weight().to(ct)).to(w.dtype))
    module._dora_merge_scale = None
