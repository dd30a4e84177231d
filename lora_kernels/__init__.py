"""lora_kernels: fused kernels for parameter-efficient fine-tuning.

Seven ops (LoRA linear, DoRA linear, LoRA with many adapters in one batch, bottleneck adapter,
LayerNorm and RMSNorm for LN-tuning, symmetric InfoNCE), their modules and model surgery. Every op
runs on the backend chosen by ``set_backend`` ("auto" | "triton" | "cuda" | "torch").
"""
from .backend import BackendUnavailable, get_backend, set_backend, use_backend
from .nn import BottleneckAdapter, FusedLayerNorm, FusedRMSNorm, InfoNCELoss, LoRALinear
from .ops.adapter import adapter
from .ops.dora import dora_linear
from .ops.infonce import infonce
from .ops.layer_norm import layer_norm
from .ops.lora import lora_linear
from .ops.lora_multi import lora_linear_multi
from .ops.rms_norm import rms_norm
from .surgery.batching import adapter_batch
from .surgery import add_adapters, apply_lora, bitfit, from_peft, ln_tuning, load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "lora_linear", "lora_linear_multi", "dora_linear", "adapter", "layer_norm", "rms_norm", "infonce",
    "LoRALinear", "BottleneckAdapter", "FusedLayerNorm", "FusedRMSNorm", "InfoNCELoss",
    "apply_lora", "add_adapters", "ln_tuning", "bitfit", "from_peft", "save_adapter", "load_adapter",
    "adapter_batch", "set_backend", "get_backend", "use_backend", "BackendUnavailable",
]
