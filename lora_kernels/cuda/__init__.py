"""The compiled CUDA backend: thin wrappers over ``torch.ops.lora_kernels.<op>_{fwd,bwd}_cuda``,
which ``csrc/bindings.cpp`` registers (their glue: ``csrc/glue/<op>.cpp``) when ``lora_kernels._C``
is imported.

Each op module exposes ``forward``, ``backward`` (same signatures and results as the matching
``reference`` module) and ``supports(*tensors) -> reason or None``; ``ops/`` wires them in with
``backend.lazy_impl``. Nothing here imports ``_C`` until an op runs, so these modules (and
``lora_kernels``) import on machines where the extension was never built.
"""
import importlib
from typing import Optional

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_ops = None


def ops():
    """``torch.ops.lora_kernels``, once ``lora_kernels._C`` has registered the ``*_cuda`` ops in it."""
    global _ops
    if _ops is None:
        try:
            importlib.import_module("lora_kernels._C")
        except ImportError as err:
            from ..backend import _BUILD_HINT
            raise ImportError(f"the compiled extension lora_kernels._C is not importable ({err}); "
                              f"{_BUILD_HINT}") from err
        _ops = torch.ops.lora_kernels
    return _ops


def rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with unit stride along its last dim, as the kernels read rows through a row stride
    (a copy only when the columns are strided)."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def dtype_reason(what: str, dtype: torch.dtype) -> Optional[str]:
    if dtype in DTYPES:
        return None
    return f"the CUDA {what} kernels take float16, bfloat16, float32 or float64, got {dtype}"


def rows_reason(what: str, x: torch.Tensor, no_features: str) -> Optional[str]:
    """Why the CUDA ``what`` kernels cannot take rows ``x``: a dtype they lack, or rows of zero
    features (``no_features`` says why those fail); None when they can."""
    reason = dtype_reason(what, x.dtype)
    if reason is None and x.dim() == 2 and x.shape[1] == 0:
        reason = no_features
    return reason
