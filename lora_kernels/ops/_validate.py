"""Input checks shared by the ops: every message names the argument, what was expected
and what was given, so bad input never reaches a kernel."""
import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, ndim: Optional[int] = None, min_ndim: int = 0) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def shape(name: str, t: Optional[torch.Tensor], expected: Sequence[int], meaning: str) -> None:
    """``expected`` is the exact shape; ``meaning`` spells it symbolically, e.g. "[N, K]"."""
    if t is None:
        return
    tensor(name, t)
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {list(expected)}, got {list(t.shape)}")


def same_device_and_dtype(**tensors: Optional[torch.Tensor]) -> None:
    given = {k: v for k, v in tensors.items() if v is not None}
    (first, ref), *rest = given.items()
    for name, t in rest:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {ref.device}; "
                             "all inputs must be on one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first} has {ref.dtype}; "
                            "all inputs must share one dtype")


def finite_float(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}") from None
    # torch.compile makes a float that changed between compiles symbolic (automatic dynamic), and
    # math.isfinite cannot trace one: under compile the value is not checked (eager calls are).
    if not torch.compiler.is_compiling() and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def probability(name: str, value, allow_one: bool = False) -> float:
    value = finite_float(name, value)
    if value < 0.0 or value > 1.0 or (value == 1.0 and not allow_one):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def positive_int(name: str, value) -> int:
    """A module size (features, rank, bottleneck): an int >= 1; bool and float are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def finite_number(name: str, value):
    """A module hyper-parameter such as alpha: a finite int or float, returned as given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def lora_shapes(x, weight, bias, lora_A, lora_B) -> tuple:
    """(K, N, r) of a LoRA-style layer after checking x [..., K], weight [N, K], bias [N] or None,
    lora_A [r, K] (r >= 1) and lora_B [N, r]; lora_linear and dora_linear share these rules."""
    tensor("x", x, min_ndim=1)
    tensor("weight", weight, ndim=2)
    tensor("lora_A", lora_A, ndim=2)
    tensor("lora_B", lora_B, ndim=2)
    k, (n, kw), r = x.shape[-1], weight.shape, lora_A.shape[0]
    if kw != k:
        raise ValueError(f"weight must have shape [N, K] with K = x.shape[-1] = {k}, got {list(weight.shape)}")
    if r == 0:
        raise ValueError("LoRA rank r must be >= 1, got lora_A of shape [0, K]")
    shape("lora_A", lora_A, (r, k), "[r, K]")
    shape("lora_B", lora_B, (n, r), "[N, r]")
    shape("bias", bias, (n,), "[N]")
    return k, n, r


def rows(x: torch.Tensor, width: int, trailing: int = 1) -> torch.Tensor:
    """View ``x`` as [M, width], merging its last ``trailing`` dims into one row
    (a copy only when strides make a view impossible)."""
    if x.ndim == 2 and trailing == 1:
        return x  # already rows; reshape would cost µs a call for nothing
    return x.reshape(math.prod(x.shape[: x.ndim - trailing]), width)


def needs(ctx, index: int) -> bool:
    return bool(ctx.needs_input_grad[index])


def grad_or_none(g: torch.Tensor, needed: bool) -> Optional[torch.Tensor]:
    return g if needed else None
