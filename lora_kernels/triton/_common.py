"""Pieces every Triton op needs: poisoned allocation, interpreter-safe dot, dtype maps."""
import os

import torch
import triton
import triton.language as tl

from ..backend import interpreting

# Under TRITON_INTERPRET=1 a bf16 tl.dot returns garbage: upcast its operands to fp32 there.
UPCAST_BF16_DOT = interpreting()


def empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, filled with NaN when LORA_KERNELS_POISON=1 (the tests set it), so an
    element a kernel forgets to write can never pass as a plausible value."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("LORA_KERNELS_POISON") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def upcast_bf16_dot(dtype: torch.dtype) -> bool:
    return UPCAST_BF16_DOT and dtype == torch.bfloat16


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr = "ieee"):
    """acc + a @ b with fp32 (fp64 for fp64) accumulation; UPCAST routes bf16 through fp32.
    out_dtype names acc's dtype: Triton 3.6 defaults it to fp32 and rejects an fp64 acc otherwise."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION,
                      out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


SMEM_BYTES = 227 << 10  # H100: the shared memory one block may use


def prune_by(early_config_prune=None):
    """``prune_configs_by`` for ``triton.autotune``. LORA_KERNELS_AUTOTUNE=0 keeps one config
    per key (the first that survives pruning): one compile instead of a dozen, for test runs on
    a GPU where tuning would cost minutes and correctness does not need it."""
    rules = {"early_config_prune": early_config_prune} if early_config_prune else {}
    if os.environ.get("LORA_KERNELS_AUTOTUNE", "1") == "0":
        rules.update(perf_model=lambda **kwargs: 0.0, top_k=1)
    return rules or None


def input_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs honour torch.backends.cuda.matmul.allow_tf32, like torch.matmul."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"
