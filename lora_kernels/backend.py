"""Which backend runs an op.

Backends: ``torch`` (the reference, any device), ``triton`` (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``), ``cuda`` (the compiled extension ``lora_kernels._C``) and
``auto``, which picks the first of them that can run the op on the given tensors.
The choice comes from ``set_backend`` / ``use_backend`` or else the environment variable
``LORA_KERNELS_BACKEND`` (default ``auto``). A backend asked for explicitly that cannot run
an op raises ``BackendUnavailable`` saying why; it never falls back silently.
"""
import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_VAR = "LORA_KERNELS_BACKEND"

_BUILD_HINT = ("build it with a CUDA build of PyTorch and nvcc: "
               "LORA_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these inputs; the message says why."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``supports(*tensors)`` returns None when it can run them, else a one-sentence reason
    (dtype, size limits...).
    """
    forward: Callable
    backward: Callable
    supports: Callable[..., Optional[str]] = lambda *tensors: None


def lazy_impl(module: str, prefix: str = "") -> Impl:
    """An Impl whose ``<prefix>forward``/``<prefix>backward``/``<prefix>supports`` live in
    ``module``, imported on first use, so that importing lora_kernels never imports Triton or
    the compiled extension."""
    def attr(name):
        name = prefix + name

        def call(*args, **kwargs):  # sys.modules first: import_module costs µs on every op call
            return getattr(sys.modules.get(module) or importlib.import_module(module), name)(*args, **kwargs)
        call.__name__ = f"{module}.{name}"
        return call
    return Impl(attr("forward"), attr("backward"), attr("supports"))


# set_backend's choice is process-wide: threads that never saw the caller's context see it too
# (the autograd engine runs CUDA backwards on its own per-device threads). use_backend's choice
# is scoped to the calling context; each op saves the choice its forward saw for its backward.
_default: Optional[str] = None
_chosen: contextvars.ContextVar = contextvars.ContextVar("lora_kernels_backend", default=None)


def _check_name(name: str) -> str:
    """The backend name in canonical form: case and surrounding spaces do not matter, as in the
    environment variable."""
    canonical = name.strip().lower() if isinstance(name, str) else name
    if canonical not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return canonical


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _extension_missing() -> Optional[str]:
    """Why ``lora_kernels._C`` does not import (None when it does). Cached: select() asks on
    every op call, and a failed import would search the file system again each time."""
    try:
        importlib.import_module("lora_kernels._C")
    except ImportError as err:
        return f"the compiled extension lora_kernels._C is not importable ({err}); {_BUILD_HINT}"
    return None


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _software_missing(name: str) -> Optional[str]:
    """What the triton or cuda backend lacks besides a GPU: its package or compiled extension."""
    if name == "triton":
        return None if _triton_installed() else "the `triton` package is not installed (pip install triton)"
    return _extension_missing()


def why_unavailable(name: str) -> Optional[str]:
    """None if backend ``name`` can run on this machine at all, else the reason."""
    if name in ("auto", "torch"):
        return None
    missing = _software_missing(name)
    if name == "triton":
        if missing is None and not (torch.cuda.is_available() or interpreting()):
            return "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 to interpret them on CPU)"
        return missing
    if not torch.cuda.is_available():
        # Both reasons: without the extension, a GPU alone would not be enough either.
        gpu = "the cuda backend needs a CUDA GPU and a CUDA build of PyTorch"
        return gpu if missing is None else f"{gpu}, and {missing}"
    return missing


def set_backend(name: str) -> None:
    """Select the backend for all ops in every thread ("auto" | "triton" | "cuda" | "torch");
    a ``use_backend`` block still overrides it inside."""
    global _default
    name = _check_name(name)
    reason = why_unavailable(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    _default = name


def get_backend() -> str:
    name = _chosen.get() or _default
    if name is None:
        name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the ops called inside with backend ``name`` (their backward too,
    wherever autograd runs it)."""
    name = _check_name(name)
    reason = why_unavailable(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    with pinned(name):
        yield


@contextlib.contextmanager
def pinned(name: str):
    """``use_backend`` without the availability check: an op's backward runs under the choice
    its forward saw (saved by the op), whichever thread autograd runs it on."""
    token = _chosen.set(name)
    try:
        yield
    finally:
        _chosen.reset(token)


def _why_not(name: str, op: str, impls: Mapping[str, Impl], tensors) -> Optional[str]:
    if name not in impls:
        return f"it has no implementation of {op} yet"
    device = tensors[0].device
    # A CUDA tensor proves the GPU: only the software can be missing (why_unavailable would
    # also ask the CUDA runtime and the environment, µs on every op call).
    reason = _software_missing(name) if device.type == "cuda" and name != "torch" else why_unavailable(name)
    if reason is not None:
        return reason
    if name == "triton" and not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        return f"Triton kernels run on CUDA tensors (CPU only under TRITON_INTERPRET=1), got {device}"
    if name == "cuda" and device.type != "cuda":
        return f"the compiled kernels run on CUDA tensors, got {device}"
    return impls[name].supports(*tensors)


# "auto" on CUDA tensors, per op (the names ops/ pass to select): the faster of triton and cuda
# first. Not measured yet (no GPU so far), so Triton, the more widely tested backend, leads
# everywhere. The fwd+bwd rows of benchmarks/test_bench_<op>.py (lk-triton vs lk-cuda, the
# issues' default shapes, one run on the H100; results in benchmarks/results/) will decide:
# cite that file next to each entry once it exists.
AUTO_ORDER = {
    "lora_linear": ("triton", "cuda", "torch"),
    "lora_linear_multi": ("triton", "cuda", "torch"),  # no cuda kernel yet: auto skips it
    "dora_linear": ("triton", "cuda", "torch"),  # no cuda impl yet: auto skips it (CUDA issue)
    "adapter": ("triton", "cuda", "torch"),
    "layer_norm": ("triton", "cuda", "torch"),
    "rms_norm": ("triton", "cuda", "torch"),
    "infonce": ("triton", "cuda", "torch"),
    "infonce_rows": ("triton", "cuda", "torch"),   # InfoNCELoss(gather_distributed=True)
}


def _auto_order(op: str, device: torch.device):
    if device.type == "cuda":
        return AUTO_ORDER.get(op, ("triton", "cuda", "torch"))
    return ("triton", "torch") if interpreting() else ("torch",)


def select(op: str, impls: Mapping[str, Impl], *tensors: torch.Tensor) -> Impl:
    """The implementation of ``op`` that runs on ``tensors`` under the current choice."""
    requested = get_backend()
    if requested == "auto":
        for name in _auto_order(op, tensors[0].device):
            if _why_not(name, op, impls, tensors) is None:
                return impls[name]
        return impls["torch"]
    reason = _why_not(requested, op, impls, tensors)
    if reason is not None:
        raise BackendUnavailable(f"backend {requested!r} cannot run {op}: {reason}")
    return impls[requested]


def selected_name(op: str, impls: Mapping[str, Impl], *tensors: torch.Tensor) -> str:
    """Name of the backend ``select`` would use (for tests and benchmarks)."""
    chosen = select(op, impls, *tensors)
    return next(name for name, impl in impls.items() if impl is chosen)
