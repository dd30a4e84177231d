from .adapter import BottleneckAdapter
from .layernorm import FusedLayerNorm
from .lora import LoRALinear
from .loss import InfoNCELoss

__all__ = ["BottleneckAdapter", "FusedLayerNorm", "InfoNCELoss", "LoRALinear"]
