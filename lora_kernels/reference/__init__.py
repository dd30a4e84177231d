"""Plain-PyTorch reference implementations: the executable spec of every op.

Each module holds the math of one op three ways:
  * a differentiable one-liner (``lora_linear``, ``adapter``, ...) that autograd can check;
  * ``forward``: what the ``torch`` backend runs, returning the tensors the backward saves;
  * ``backward``: the hand-derived gradients of DESIGN.md, which the kernels must match.
They are slow on purpose: clarity over speed.
"""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed (and statistics kept) in float32; others as is."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """Placeholder for a gradient nobody asked for (custom ops cannot return None)."""
    return like.new_empty(0)
