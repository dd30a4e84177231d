"""Shared harness of the micro-benchmarks (``pytest benchmarks``; CI's ``pytest tests`` never sees it).

Each ``test_bench_<op>.py`` lists rows (shape × dtype × mode × provider) and gives a
``build(shape, dtype, mode, provider) -> Case``; :func:`run_row` times the case and fills the
row's ``benchmark.extra_info``:

  time_ms (median), q20_ms, q80_ms   GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed
                                     before each call); CPU: wall clock per call
  gbps, tflops                       compulsory bytes / FLOPs (``floors.py``) over time_ms
  floor_ms, pct_floor, bound         the roofline of this shape on the rates measured at start
  eager_ms, speedup_vs_eager         eager baseline of the same row measured in this run,
                                     speedup = eager time / this time (> 1: faster than eager)
  peak_extra_mib                     GPU memory allocated by one call beyond its inputs
  rel_err_vs_eager                   fwd rows: ‖out − eager‖/‖eager‖ on the same inputs
  status                             ok | OOM | unsupported: … | error: … | budget (not run)

pytest-benchmark's own statistics (a few synchronised wall-clock rounds) are kept, but
``time_ms`` is the measurement. ``benchmarks/summarize.py`` turns the JSON into a table.

Providers: ``lk-<backend>`` for every lora_kernels backend that implements the op and can run
here (``lk.use_backend``), ``eager`` (the usual PyTorch code the op replaces), op-specific
floors (``merged``: the merged-weight GEMM; ``copy``: a plain copy of x) and, on a GPU,
``compile`` (``torch.compile`` of the eager code; BENCH_COMPILE=0 drops it, =1 forces it).

Environment: BENCH_SHAPES=quick|default|full (default: "default" on a GPU — the issues'
target shapes —, "quick" on a CPU); BENCH_FULL=1 is BENCH_SHAPES=full; BENCH_BUDGET_S=<s>
records the rows left when the budget is spent as "budget" instead of running them (so a run
under ``timeout`` still writes its JSON); BENCH_REP_MS / BENCH_WARMUP_MS tune do_bench;
BENCH_THREADS sets torch's CPU threads (default 1 on a CPU run).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib
import importlib.util
import os
import platform
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if importlib.util.find_spec("lora_kernels") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(HERE))

import floors  # noqa: E402
import latency_table  # noqa: E402  (shares the device naming of make bench's results)
import lora_kernels as lk  # noqa: E402
from lora_kernels import backend as lk_backend  # noqa: E402

# The test files import this module as ``lk_bench``: the name "conftest" is shared with tests/.
sys.modules.setdefault("lk_bench", sys.modules[__name__])

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
SHAPES = "full" if os.environ.get("BENCH_FULL", "0") == "1" else (
    os.environ.get("BENCH_SHAPES") or ("default" if ON_GPU else "quick"))
if SHAPES not in ("quick", "default", "full"):
    raise ValueError(f"BENCH_SHAPES must be quick, default or full, got {SHAPES!r}")
_compile_env = os.environ.get("BENCH_COMPILE", "")
COMPILE = _compile_env == "1" or (ON_GPU and _compile_env != "0")
START = time.perf_counter()
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "0") or 0)
WARMUP_MS = float(os.environ.get("BENCH_WARMUP_MS", "25" if SHAPES == "full" else "10"))
REP_MS = float(os.environ.get("BENCH_REP_MS", "100" if SHAPES == "full" else "50"))
if not ON_GPU:
    WARMUP_MS, REP_MS = 0.0, min(REP_MS, 40.0)
    # One thread by default: the CPU shapes are tiny, and on a shared machine a multi-threaded
    # matmul waiting for a busy core is 10-100x slower. BENCH_THREADS=<n> overrides.
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
elif os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))

LK_BACKENDS = ("triton", "cuda", "torch")
EAGER = "eager"
# Low-precision forward outputs of two implementations may differ by a few roundings.
MISMATCH_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-8}


def device_name() -> str:
    return latency_table.device_name(DEVICE)


DEVICE_NAME = device_name()


def liger_unavailable():
    """Why Liger-Kernel's LayerNorm cannot be a provider here; None when it can."""
    if not ON_GPU:
        return "Liger-Kernel's Triton kernels need a GPU"
    try:
        import liger_kernel.ops.layer_norm  # noqa: F401
    except ImportError as err:
        return f"liger_kernel is not importable ({err}); it is pure Python: carry its wheel"
    return None


def default_dtype() -> torch.dtype:
    """bf16 on a GPU (the issues' shapes); fp32 on a CPU (bf16 matmuls there are slow and odd)."""
    return torch.bfloat16 if ON_GPU else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def lk_providers(impls) -> list:
    """``lk-<name>`` for each lora_kernels backend implementing the op and runnable here."""
    return [f"lk-{name}" for name in LK_BACKENDS
            if name in impls and lk_backend.why_unavailable(name) is None]


def providers(impls, floors_: tuple = ()) -> list:
    """All providers of an op: eager first (the others' ratio needs it), ours, floors, compile."""
    names = [EAGER, *lk_providers(impls), *floors_]
    if COMPILE:
        names.append("compile")
    return names


def rows(shapes, dtypes, modes, provider_names, fwd_only=(), compile_modes=None) -> list:
    """pytest.param rows in run order: per (shape, dtype, mode), eager first.

    ``fwd_only``: providers that only have a forward (merged GEMM, copy).
    ``compile_modes``: modes the compile provider runs in (None: all).
    """
    out = []
    for shape in shapes:
        for dtype in dtypes:
            for mode in modes:
                for prov in provider_names:
                    if prov in fwd_only and mode != "fwd":
                        continue
                    if prov == "compile" and compile_modes is not None and mode not in compile_modes:
                        continue
                    label = "-".join(f"{k}{v}" for k, v in shape.items())
                    out.append(pytest.param(shape, dtype, mode, prov,
                                            id=f"{label}-{dtype_name(dtype)}-{mode}-{prov}"))
    return out


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One timed step: ``fn()`` runs it and returns its output (fwd) or gradients."""
    fn: Callable
    cost: floors.Cost
    keep: list = field(default_factory=list)  # tensors the step needs alive


def step(mode: str, forward: Callable, inputs: list, grad_inputs: list, grad_out=None) -> Callable:
    """The function timed for ``mode``.

    fwd: ``forward(*inputs)`` under no_grad (what inference runs); bwd: gradients of one
    recorded forward, ``retain_graph`` so it can repeat (``autograd.grad``: nothing accumulates
    in .grad); fwd+bwd: both. ``grad_out``: the output gradient (None for a scalar loss).
    Modes "bwd-params" and "bwd" differ only in which inputs require grad (the builder's job).
    """
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return forward(*inputs)
        return fwd
    if mode in ("bwd", "bwd-params"):
        out = forward(*inputs)
        return lambda: torch.autograd.grad(out, grad_inputs, grad_out, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(*inputs), grad_inputs, grad_out)
    raise ValueError(f"unknown mode {mode!r}")


def randn(*shape, dtype, scale=1.0, requires_grad=False, shift=0.0) -> torch.Tensor:
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale + shift
    return t.to(dtype).requires_grad_(requires_grad)


def compiled(fn: Callable) -> Callable:
    """torch.compile of ``fn`` with fresh dynamo caches: one static graph per row."""
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- measuring

@contextlib.contextmanager
def provider_backend(provider: str):
    """Run lk-<name> rows with backend <name>: the context choice (use_backend) for this thread,
    and LORA_KERNELS_BACKEND for the autograd engine's worker threads, which do not see it."""
    if not provider.startswith("lk-"):
        yield
        return
    name = provider[3:]
    old = os.environ.get(lk_backend.ENV_VAR)
    os.environ[lk_backend.ENV_VAR] = name
    try:
        with lk.use_backend(name):
            yield
    finally:
        if old is None:
            os.environ.pop(lk_backend.ENV_VAR, None)
        else:
            os.environ[lk_backend.ENV_VAR] = old


def _sync():
    if ON_GPU:
        torch.cuda.synchronize(DEVICE)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err).lower()
                                              or "can't allocate memory" in str(err).lower())


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float(), ref.detach().float()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


_RATES: dict = {}
_EAGER_MS: dict = {}     # row key -> eager median ms (or "OOM" / "error")
_EAGER_OUT: dict = {}    # row key -> eager fwd output (only the current key's)


def rates(dtype: torch.dtype) -> floors.Rates:
    """Copy bandwidth and matmul rate of this device for ``dtype`` (measured once)."""
    key = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    if key not in _RATES:
        _RATES[key] = floors.rates(DEVICE, key)
    return _RATES[key]


def _free():
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def _measure(case: Case) -> dict:
    """Time one case: first call (compile / autotune / warm), peak memory of a second, then time."""
    out = case.fn()
    _sync()
    res = {"out": _first_tensor(out)}
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        case.fn()
        _sync()
        res["peak_extra_mib"] = round((torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20, 1)
    fast = _DISABLED[0]
    med, q20, q80 = floors.time_ms(case.fn, DEVICE, warmup_ms=1 if fast else WARMUP_MS,
                                   rep_ms=1 if fast else REP_MS, min_reps=1 if fast else 3)
    res.update(time_ms=med, q20_ms=q20, q80_ms=q80)
    return res


_DISABLED = [False]


def _run(build, shape, dtype, mode, provider, seed) -> dict:
    """Build and measure one provider's case; {"status": "OOM" | ...} when it cannot run.

    On success the result keeps the case (``res["case"]``) for pytest-benchmark's rounds.
    """
    err_status = None
    try:
        torch.manual_seed(seed)  # every provider of a row sees the same random inputs
        with provider_backend(provider):
            case = build(shape, dtype, mode, provider)
            res = _measure(case)
        res.update(status="ok", case=case)
        return res
    except lk.BackendUnavailable as err:
        err_status = f"unsupported: {err}"
    except Exception as err:  # noqa: BLE001 — any failure becomes the row's status
        err_status = "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {err}"
    _free()  # outside the except block: the traceback no longer pins the tensors
    return {"status": err_status}


def _remember_eager(key, res: dict) -> None:
    _EAGER_MS[key] = res.get("time_ms", res["status"])
    _EAGER_OUT.clear()
    if res["status"] == "ok" and key[3] == "fwd" and res.get("out") is not None:
        _EAGER_OUT[key] = res["out"]


def run_row(benchmark, op: str, shape: dict, dtype: torch.dtype, mode: str, provider: str, build,
            cost: floors.Cost, check_fwd: bool = True) -> dict:
    """Measure one row (op, shape, dtype, mode, provider) and record it in ``benchmark``."""
    _DISABLED[0] = benchmark.disabled
    label = " ".join(f"{k}={v}" for k, v in shape.items())
    key = (op, label, dtype_name(dtype), mode)
    info = benchmark.extra_info
    info.update(op=op, shape=label, dims=dict(shape), dtype=dtype_name(dtype), mode=mode, provider=provider,
                device=DEVICE_NAME, flops=cost.flops, bytes=cost.bytes)
    benchmark.group = f"{op} {label} {dtype_name(dtype)} {mode}"
    seed = zlib.crc32(repr(key).encode()) & 0x7FFFFFFF

    if BUDGET_S and time.perf_counter() - START > BUDGET_S:
        info["status"] = "budget"
        benchmark.pedantic(lambda: None, rounds=1)
        _progress(info)
        return info

    r = rates(dtype)
    res = _run(build, shape, dtype, mode, provider, seed)
    info.update(status=res["status"], peak_gbps=r.gbps, peak_tflops=r.tflops, floor_ms=cost.floor_ms(r),
                bound=cost.bound(r))
    if res["status"] == "ok":
        t = res["time_ms"]
        info.update(time_ms=t, q20_ms=res["q20_ms"], q80_ms=res["q80_ms"],
                    gbps=cost.bytes / (t * 1e-3) / 1e9, tflops=cost.flops / (t * 1e-3) / 1e12,
                    pct_floor=100.0 * cost.floor_ms(r) / t)
        if "peak_extra_mib" in res:
            info["peak_extra_mib"] = res["peak_extra_mib"]
        if benchmark.enabled:  # pytest-benchmark's own (wall-clock, synchronised) rounds
            case = res["case"]

            def timed():
                case.fn()
                _sync()
            with provider_backend(provider):
                benchmark.pedantic(timed, rounds=3 if ON_GPU else 2, warmup_rounds=1)
            del case
    if not benchmark.enabled or res["status"] != "ok":
        benchmark.pedantic(lambda: None, rounds=1)
    res.pop("case", None)
    _free()

    # the eager baseline of this row, measured in this run (now, if its own row has not run yet)
    if provider == EAGER:
        _remember_eager(key, res)
    elif key not in _EAGER_MS:
        eager = _run(build, shape, dtype, mode, EAGER, seed)
        eager.pop("case", None)
        _remember_eager(key, eager)
        _free()
    eager_ms = _EAGER_MS.get(key)
    if isinstance(eager_ms, float):
        info["eager_ms"] = eager_ms
        if res["status"] == "ok":
            info["speedup_vs_eager"] = eager_ms / res["time_ms"]
    elif eager_ms is not None:
        info["eager_status"] = eager_ms

    ref, out = _EAGER_OUT.get(key), res.pop("out", None)
    if check_fwd and provider not in (EAGER, "copy") and ref is not None and out is not None and out.shape == ref.shape:
        err = _rel_err(out, ref)
        info["rel_err_vs_eager"] = err
        if not err <= MISMATCH_TOL.get(dtype, 5e-2):
            info["status"] = "mismatch"
            warnings.warn(f"{op} {label} {mode} {provider}: output differs from eager by {err:.2e}")
    del out, ref
    _progress(info)
    if info["status"].startswith("error"):
        pytest.fail(f"{op} {label} {dtype_name(dtype)} {mode} {provider}: {info['status']}")
    return info


_CONFIG = []


def _progress(info: dict) -> None:
    """One line per row on the terminal, past pytest's capture (long GPU runs show progress)."""
    if "time_ms" in info:
        text = (f"{info['time_ms']:.4f} ms {info['pct_floor']:5.1f}% floor"
                + (f" {info['speedup_vs_eager']:.2f}x eager" if "speedup_vs_eager" in info else "")
                + ("" if info["status"] == "ok" else f" [{info['status']}]"))
    else:
        text = info["status"][:160]
    line = (f"[{time.perf_counter() - START:6.1f}s] {info['op']} {info['shape']} {info['dtype']} {info['mode']} "
            f"{info['provider']}: {text}")
    capman = _CONFIG[0].pluginmanager.getplugin("capturemanager") if _CONFIG else None
    if capman is None:
        print(line, file=sys.stderr, flush=True)
        return
    with capman.global_and_fixture_disabled():
        print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- pytest hooks

def pytest_terminal_summary(terminalreporter):
    """Say which providers' rows this run left out, and why (e.g. the GPU-only ones on a CPU)."""
    for name in LK_BACKENDS:
        reason = lk_backend.why_unavailable(name)
        if reason is not None:
            terminalreporter.write_line(f"rows of lk-{name} not run here: {reason}")
    liger = liger_unavailable()
    if liger is not None:
        terminalreporter.write_line(f"rows of liger (LayerNorm) not run here: {liger}")
    if not COMPILE:
        why = "BENCH_COMPILE=0" if _compile_env == "0" else "off on a CPU run (BENCH_COMPILE=1 forces them)"
        terminalreporter.write_line(f"rows of compile (torch.compile) not run: {why}")


def pytest_configure(config):
    _CONFIG[:] = [config]


def pytest_collection_modifyitems(session, config, items):
    """torch.compile rows last: they are the slowest to set up and the first a budget drops."""
    items.sort(key=lambda item: getattr(item, "callspec", None) is not None
               and item.callspec.params.get("provider") == "compile")


def versions() -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version(), "lora_kernels": lk.__version__,
         "cuda": torch.version.cuda}
    try:
        v["triton"] = importlib.import_module("triton").__version__
    except ImportError:
        v["triton"] = None
    return v


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lora_kernels_bench"] = {
        "device": DEVICE_NAME, "device_type": DEVICE.type, "versions": versions(),
        "commit": os.environ.get("LK_BENCH_COMMIT") or None,
        "shapes": SHAPES, "compile": COMPILE, "rep_ms": REP_MS, "warmup_ms": WARMUP_MS,
        "budget_s": BUDGET_S, "torch_threads": torch.get_num_threads(), "date": _dt.date.today().isoformat(),
        "rates": {dtype_name(k): {"gbps": v.gbps, "tflops": v.tflops} for k, v in _RATES.items()},
        "timer": "triton.testing.do_bench median (CUDA events, L2 flushed)" if ON_GPU
                 else "wall clock median per call (perf_counter)",
    }
