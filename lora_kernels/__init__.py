"""lora_kernels: fused kernels for parameter-efficient fine-tuning.

Four ops (LoRA linear, bottleneck adapter, LayerNorm for LN-tuning, symmetric InfoNCE),
their modules and model surgery. Every op runs on the backend chosen by ``set_backend``
("auto" | "triton" | "cuda" | "torch").
"""
from .backend import BackendUnavailable, get_backend, set_backend, use_backend
from .nn import BottleneckAdapter, FusedLayerNorm, InfoNCELoss, LoRALinear
from .ops.adapter import adapter
from .ops.dora import dora_linear
from .ops.infonce import infonce
from .ops.layer_norm import layer_norm
from .ops.lora import lora_linear
from .surgery import add_adapters, apply_lora, bitfit, from_peft, ln_tuning, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "lora_linear", "dora_linear", "adapter", "layer_norm", "infonce",
    "LoRALinear", "BottleneckAdapter", "FusedLayerNorm", "InfoNCELoss",
    "apply_lora", "add_adapters", "ln_tuning", "bitfit", "from_peft", "save_adapter", "load_adapter",
    "set_backend", "get_backend", "use_backend", "BackendUnavailable",
]
