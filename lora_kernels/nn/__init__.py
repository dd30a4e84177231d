from .adapter import BottleneckAdapter
from .layernorm import FusedLayerNorm
from .lora import LoRALinear
from .loss import InfoNCELoss
from .rmsnorm import FusedRMSNorm

__all__ = ["BottleneckAdapter", "FusedLayerNorm", "FusedRMSNorm", "InfoNCELoss", "LoRALinear"]
