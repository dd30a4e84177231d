"""Model-level edits: apply_lora, add_adapters, ln_tuning, bitfit, from_peft, save/load_adapter.
(Placeholder: being written.)"""


def apply_lora(model, target_modules, r=8, alpha=16, dropout=0.0):
    raise NotImplementedError


add_adapters = ln_tuning = bitfit = from_peft = save_adapter = load_adapter = apply_lora
