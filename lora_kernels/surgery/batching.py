"""adapter_batch: one LoRA adapter per sample, routed to every LoRALinear of a model."""
import contextlib

from torch import nn

from ..nn import LoRALinear
from .mha import LoRAMultiheadAttention


def _check_names(names) -> tuple:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"names must be a list or tuple of adapter names (str, or None for the base model), "
                        f"one per sample; got {type(names).__name__}")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"names must hold str or None, got {bad[:3]!r}")
    if not names:
        raise ValueError("names must name one adapter (or None) per sample, got an empty list")
    return tuple(names)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names):
    """Inside the block, sample b of each batch (the first dim of every LoRALinear's input) runs
    through adapter ``names[b]`` (None: the base model), in training and in eval, in one fused
    ``lora_linear_multi`` call per layer; each adapter gets exactly the gradient of its own rows.
    A layer that does not hold ``names[b]`` gives its base output there (PEFT's rule). Blocks
    nest (the inner names win) and each layer's previous routing comes back on exit, exception
    or not. Refused: names no layer holds, merged layers, LoRA on nn.MultiheadAttention; a batch
    whose first dim differs from ``len(names)`` fails in the layer's forward. With activation
    checkpointing, call backward inside the block: the recomputed forward must be routed too
    (outside, torch's non-reentrant checkpoint raises a CheckpointError on the mismatch).
    """
    names = _check_names(names)
    if any(isinstance(m, LoRAMultiheadAttention) for m in model.modules()):
        raise NotImplementedError("adapter_batch: LoRA on nn.MultiheadAttention holds one adapter; "
                                  "mixed batches are not supported there")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"adapter_batch: {type(model).__name__} has no LoRALinear layer")
    known = set().union(*(m.adapter_names for m in layers))
    unknown = sorted({n for n in names if n is not None} - known)
    if unknown:
        raise ValueError(f"adapter_batch: unknown adapter(s) {unknown}; the model's adapters are {sorted(known)}")
    merged = sum(m.merged for m in layers)
    if merged:
        raise ValueError(f"adapter_batch: {merged} LoRALinear layer(s) are merged; unmerge them first")
    before = [m._batch_names for m in layers]
    try:
        for m in layers:
            m._batch_names = names
        yield model
    finally:
        for m, previous in zip(layers, before):
            m._batch_names = previous
