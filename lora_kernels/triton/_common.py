"""Pieces every Triton op needs: poisoned allocation, interpreter-safe dot, dtype maps, and
host-side arithmetic that costs no launch time.

Host-side helpers matter at small shapes, where the kernel takes a few µs and everything the
wrapper does before the launch adds to it: ``triton.cdiv`` and ``triton.next_power_of_2`` are
constexpr functions (a few µs a call through Triton's wrapper), ``os.environ`` lookups and
``torch.tensor`` a few µs each. The wrappers use the plain versions below instead.
"""
import functools
import math
import os
import struct

import torch
import triton
import triton.language as tl

from ..backend import interpreting

# Triton picks the interpreter when a kernel is decorated, so the Triton modules fix the
# mode once, at import, like Triton does.
INTERPRET = interpreting()
# Under TRITON_INTERPRET=1 a bf16 tl.dot returns garbage: upcast its operands to fp32 there.
UPCAST_BF16_DOT = INTERPRET
# Read once, when the Triton backend is first used (the tests set it before that).
POISON = os.environ.get("LORA_KERNELS_POISON") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, filled with NaN when LORA_KERNELS_POISON=1 (the tests set it), so an
    element a kernel forgets to write can never pass as a plausible value."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def as_fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32 (±inf beyond its range), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def split_fp32(value: float):
    """value ≈ hi + lo with both fp32: Triton passes Python floats as fp32, so a kernel that
    needs more of a scalar's digits (fp64 math) takes both halves and adds them."""
    hi = as_fp32(value)
    return hi, as_fp32(value - hi) if math.isfinite(hi) else 0.0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device`` (cached: launchers size grids by it on every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


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
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def misaligned(named_args, names) -> bool:
    """Whether any of the int arguments ``names`` (sizes, strides) is neither 1 nor a multiple of 16:
    Triton then cannot prove the loads aligned and issues one narrow load, with its own address,
    per element, which sm_90 builds pay for in registers (the pruners' stricter rules)."""
    return any(named_args[n] % 16 and named_args[n] != 1 for n in names if isinstance(named_args.get(n), int))
