"""Model surgery: turn a pretrained model into a PEFT model that runs on the fused modules.

Every function edits the model in place and returns it, and leaves trainable exactly the
parameters of the method:

* ``apply_lora``   — wrap the targeted ``nn.Linear`` / GPT-2 ``Conv1D`` layers in ``LoRALinear``
  (``nn.MultiheadAttention`` targets in ``LoRAMultiheadAttention``).
* ``add_adapters`` — insert a ``BottleneckAdapter`` after attention and/or FFN output projections.
* ``ln_tuning``    — swap every ``nn.LayerNorm`` for ``FusedLayerNorm`` and every RMSNorm (torch's, the
  Hugging Face LLaMA-family classes, any added by ``register_rms_norm``) for ``FusedRMSNorm``; train only those.
* ``bitfit``       — train only the biases.
* ``from_peft``    — swap a PEFT model's LoRA layers for ``LoRALinear``, sharing the same tensors.
* ``save_adapter`` / ``load_adapter`` — LoRA weights in PEFT's on-disk format, so adapters move
  freely between this package and ``peft.PeftModel``.

Module names follow PEFT's conventions: a list of target names matches a module whose
qualified name equals an entry or ends with ``"." + entry``; a string is a regular expression
that must match the whole qualified name.
"""
from .adapters import AdapterAfter, add_adapters
from .lora import apply_lora
from .mha import LoRAMultiheadAttention
from .peft_format import load_adapter, save_adapter
from .peft_interop import from_peft
from .selective import bitfit, ln_tuning, register_rms_norm

__all__ = ["apply_lora", "add_adapters", "ln_tuning", "bitfit", "from_peft", "save_adapter", "load_adapter",
           "AdapterAfter", "LoRAMultiheadAttention", "register_rms_norm"]
