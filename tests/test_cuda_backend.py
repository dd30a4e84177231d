"""The compiled CUDA backend (lora_kernels._C + lora_kernels/cuda/): how it is wired in, and,
where a GPU and the built extension exist, its results against the Triton kernels.

The op tests (test_<op>_op.py) already run every op on "cuda" whenever ``backends_for``
finds it runnable; this file adds what they cannot see: behaviour without the extension, the
auto-order table, and a direct cuda-vs-triton cross-check.
"""
import importlib
import inspect
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backend
from lora_kernels.reference import adapter as ref_adapter

from conftest import DEVICE, randn, rel_err, tolerance

ROOT = Path(__file__).resolve().parents[1]
OPS = ("layer_norm", "rms_norm", "adapter", "lora", "infonce")  # the files in ops/, reference/, triton/, cuda/
BUILD_HINT_MARK = "LORA_KERNELS_BUILD_CUDA=1"


def _extension_error():
    """Why ``import lora_kernels._C`` fails here, or None when it imports."""
    try:
        importlib.import_module("lora_kernels._C")
    except ImportError as err:
        return str(err)
    return None


# ---- always: wiring, and the behaviour without a GPU or without the extension ----

def test_importing_lora_kernels_never_needs_the_extension():
    """A fresh interpreter where ``import lora_kernels._C`` fails (as where setup.py never built it):
    the package imports, CPU ops run, the glue modules import, and asking for cuda explains the build."""
    code = f"""
import sys
sys.modules["lora_kernels._C"] = None  # any import of it now raises ImportError
import torch
import lora_kernels as lk
from lora_kernels import backend
import lora_kernels.cuda.layer_norm as glue

reason = backend.why_unavailable("cuda")
assert reason is not None and {BUILD_HINT_MARK!r} in reason, reason
try:
    with lk.use_backend("cuda"):
        pass
except lk.BackendUnavailable as err:
    assert reason in str(err), str(err)
else:
    raise AssertionError("use_backend('cuda') accepted a backend without its extension")
x = torch.randn(3, 8)
torch.testing.assert_close(lk.layer_norm(x, None, None), torch.nn.functional.layer_norm(x, (8,)))
assert glue.supports(x) is None
try:
    glue.forward(x, None, None, 1e-5)
except ImportError as err:
    assert {BUILD_HINT_MARK!r} in str(err), str(err)
else:
    raise AssertionError("the cuda glue ran without lora_kernels._C")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_why_unavailable_explains_how_to_build():
    reason = backend.why_unavailable("cuda")
    if reason is None:
        pytest.skip("the cuda backend is available here (GPU and lora_kernels._C)")
    if _extension_error() is not None:
        assert BUILD_HINT_MARK in reason and "pip install" in reason, reason
    if not torch.cuda.is_available():
        assert "GPU" in reason, reason


def test_use_backend_cuda_raises_the_reason():
    reason = backend.why_unavailable("cuda")
    if reason is None:
        pytest.skip("the cuda backend is available here (GPU and lora_kernels._C)")
    with pytest.raises(lk.BackendUnavailable) as info:
        with lk.use_backend("cuda"):
            pass
    assert reason in str(info.value)
    assert lk.get_backend() != "cuda"


def _selected_op_names():
    """Every op name that ops/ passes to backend.select (each call must name its op literally, or
    an op chosen at run time could miss AUTO_ORDER unseen)."""
    names = set()
    for path in (ROOT / "lora_kernels" / "ops").glob("*.py"):
        text = path.read_text()
        literal = re.findall(r'backend\.select\(\s*"(\w+)"', text)
        assert len(literal) == text.count("backend.select("), f"{path.name}: a backend.select call without a literal op name"
        names |= set(literal)
    return names


def test_auto_order_table_covers_every_op():
    names = _selected_op_names()
    assert names >= {"lora_linear", "adapter", "layer_norm", "infonce"}, names
    assert set(backend.AUTO_ORDER) == names, "AUTO_ORDER must name exactly the ops ops/ dispatches"
    for op, order in backend.AUTO_ORDER.items():
        assert sorted(order) == ["cuda", "torch", "triton"] and order[-1] == "torch", (op, order)
        assert backend._auto_order(op, torch.device("cuda")) == order


def test_auto_order_on_cpu_is_unchanged(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert all(backend._auto_order(op, torch.device("cpu")) == ("torch",) for op in backend.AUTO_ORDER)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert all(backend._auto_order(op, torch.device("cpu")) == ("triton", "torch") for op in backend.AUTO_ORDER)


@pytest.mark.parametrize("name", OPS)
def test_cuda_glue_matches_the_reference_signatures(name):
    """ops/<op>.py registers lora_kernels.cuda.<op>, whose forward/backward take exactly the
    reference's arguments, and whose supports() rejects an unsupported dtype in a sentence."""
    ops_module = importlib.import_module(f"lora_kernels.ops.{name}")
    assert ops_module.IMPLS["cuda"].forward.__name__ == f"lora_kernels.cuda.{name}.forward"
    glue = importlib.import_module(f"lora_kernels.cuda.{name}")
    ref = importlib.import_module(f"lora_kernels.reference.{name}")
    for fn in ("forward", "backward"):
        assert (list(inspect.signature(getattr(glue, fn)).parameters)
                == list(inspect.signature(getattr(ref, fn)).parameters)), fn
    assert glue.supports(torch.zeros(2, 3)) is None
    reason = glue.supports(torch.zeros(2, 3, dtype=torch.int32))
    assert reason and "int32" in reason and "CUDA" in reason, reason
    assert glue.supports(torch.zeros(2, 0)), "a zero-width row must be declined, not sent to a kernel"


def test_cuda_glue_of_the_rows_op():
    """The distributed InfoNCE rows op has a cuda implementation too (issue 18), with the
    reference's signatures."""
    from lora_kernels.ops import infonce as ops_module
    from lora_kernels.reference import infonce as ref
    import lora_kernels.cuda.infonce as glue
    assert ops_module.ROWS_IMPLS["cuda"].forward.__name__ == "lora_kernels.cuda.infonce.rows_forward"
    for fn in ("forward", "backward"):
        assert (list(inspect.signature(getattr(glue, "rows_" + fn)).parameters)
                == list(inspect.signature(getattr(ref, "rows_" + fn)).parameters)), fn
    assert glue.rows_supports(torch.zeros(2, 3)) is None
    assert glue.rows_supports(torch.zeros(2, 0))


def test_unavailable_backend_names_the_exact_op(monkeypatch):
    """A backend without an op says which op: the rows op is not 'infonce'."""
    from lora_kernels.ops import infonce as ops_module
    monkeypatch.setattr(ops_module, "ROWS_IMPLS", {"torch": ops_module.ROWS_IMPLS["torch"]})
    with backend.pinned("cuda"), pytest.raises(lk.BackendUnavailable) as info:
        ops_module.infonce_rows(torch.randn(2, 4), torch.randn(4, 4), 1.0, 1)
    assert "cannot run infonce_rows: it has no implementation of infonce_rows" in str(info.value), str(info.value)


def test_adapter_activation_order_matches_the_kernels():
    """csrc/glue/adapter.cpp maps names to lk::Activation by position: both must follow ACTIVATIONS."""
    header = (ROOT / "csrc" / "kernels" / "adapter.cuh").read_text()
    body = re.search(r"enum class Activation[^{]*\{([^}]*)\}", header).group(1)
    enum = {name: int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body)}
    assert sorted(enum, key=enum.get) == list(ref_adapter.ACTIVATIONS)
    glue = (ROOT / "csrc" / "glue" / "adapter.cpp").read_text()
    names = re.search(r"names\[\]\s*=\s*\{([^}]*)\}", glue).group(1)
    assert re.findall(r'"(\w+)"', names) == list(ref_adapter.ACTIVATIONS)


# ---- without a GPU: the launchers' own argument checks, compiled and run on the host ----

# Calls each x-reading launcher with row strides 0 (x.expand(M, K)), the width (contiguous) and -1,
# on fake device pointers. Without a device every launch fails the same way (no driver / no device),
# so a stride the launcher accepts reports that error, and one it refuses reports
# cudaErrorInvalidValue before launching anything. Where a GPU is visible it prints "gpu" and
# stops (fake pointers must never reach a kernel); the GPU tests below cover that case.
STRIDE_PROBE = r"""
#include <cstdio>
#include "adapter.cuh"
#include "layer_norm.cuh"
#include "rms_norm.cuh"
#include "adapter_detail.cuh"
#include "cutlass_wgrad.cuh"
// adapter_cutlass.cu's and adapter_bwd_cutlass.cu's entry points without their CUTLASS kernels (not
// linked here): decline, as they do for fp32 and on a machine without a device.
namespace lk { namespace adapter_detail {
template <typename T>
cudaError_t adapter_fwd_cutlass(const T*, int64_t, const T*, const T*, const T*, const T*, T*, acc_t<T>*, void*,
                                int64_t, int64_t, int64_t, Activation, double, cudaStream_t) { return cudaErrorNotSupported; }
template <typename T> size_t adapter_bwd_cutlass_workspace(int64_t, int64_t, int64_t) { return 0; }
template <typename T>
cudaError_t adapter_bwd_cutlass(const T*, const T*, const T*, const acc_t<T>*, acc_t<T>*, T*, T*, int64_t, int64_t,
                                int64_t, Activation, double, cudaStream_t) { return cudaErrorNotSupported; }
#define LK_PROBE_STUB(T) template cudaError_t adapter_fwd_cutlass<T>(const T*, int64_t, const T*, const T*, const T*, \
    const T*, T*, acc_t<T>*, void*, int64_t, int64_t, int64_t, Activation, double, cudaStream_t); \
  template size_t adapter_bwd_cutlass_workspace<T>(int64_t, int64_t, int64_t); \
  template cudaError_t adapter_bwd_cutlass<T>(const T*, const T*, const T*, const acc_t<T>*, acc_t<T>*, T*, T*, \
    int64_t, int64_t, int64_t, Activation, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_PROBE_STUB)
} }
// wgrad.cu's entry points likewise: the weight gradients take the old GEMMs.
namespace lk { namespace wgrad {
template <typename T> size_t wgrad_workspace(int64_t, int64_t, int64_t, bool, bool) { return 0; }
template <typename T> bool wgrad_applies(const T*, int64_t, int64_t, int64_t, int64_t, bool, const void*) { return false; }
template <typename T>
cudaError_t wgrad(const T*, int64_t, const acc_t<T>*, int, int64_t, int64_t, int64_t, double, T*, int64_t, int64_t, T*,
                  double, T*, void*, cudaStream_t) { return cudaErrorNotSupported; }
#define LK_PROBE_WGRAD_STUB(T) template size_t wgrad_workspace<T>(int64_t, int64_t, int64_t, bool, bool); \
  template bool wgrad_applies<T>(const T*, int64_t, int64_t, int64_t, int64_t, bool, const void*); \
  template cudaError_t wgrad<T>(const T*, int64_t, const acc_t<T>*, int, int64_t, int64_t, int64_t, double, T*, \
    int64_t, int64_t, T*, double, T*, void*, cudaStream_t);
LK_FOR_EACH_TYPE(LK_PROBE_WGRAD_STUB)
} }
template <typename T> T* fake(size_t i) { return reinterpret_cast<T*>(static_cast<uintptr_t>(0x1000000 * (i + 1))); }
int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) { std::printf("gpu\n"); return 0; }
  const int64_t M = 4, K = 8, R = 2;
  for (int64_t ld : {int64_t(0), K, int64_t(-1)}) {
    std::printf("%lld %d %d %d %d %d %d\n", static_cast<long long>(ld),
      int(lk::layer_norm_fwd<float>(fake<float>(0), ld, nullptr, nullptr, fake<float>(1), fake<float>(2), fake<float>(3), M, K, 1e-5, nullptr)),
      int(lk::layer_norm_bwd<float>(fake<float>(0), fake<float>(1), ld, nullptr, fake<float>(2), fake<float>(3), fake<float>(4), fake<float>(5), fake<float>(6), fake<char>(7), M, K, nullptr)),
      int(lk::adapter_fwd<float>(fake<float>(0), ld, fake<float>(1), nullptr, fake<float>(2), nullptr, fake<float>(3), fake<float>(4), nullptr, M, K, R, lk::Activation::gelu, 1.0, nullptr)),
      int(lk::adapter_bwd<float>(fake<float>(0), fake<float>(1), ld, fake<float>(2), fake<float>(3), fake<float>(4), fake<float>(5), fake<float>(6), fake<float>(7), fake<float>(8), fake<float>(9), fake<char>(10), M, K, R, lk::Activation::gelu, 1.0, nullptr)),
      int(lk::rms_norm_fwd<float>(fake<float>(0), ld, nullptr, fake<float>(1), fake<float>(2), M, K, 1e-6, 0.0, nullptr)),
      int(lk::rms_norm_bwd<float>(fake<float>(0), fake<float>(1), ld, nullptr, fake<float>(2), fake<float>(3), nullptr, nullptr, M, K, 0.0, nullptr)));
  }
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the launchers for the host")
def test_launchers_accept_any_row_stride_of_x(tmp_path):
    """LayerNorm, RMSNorm and adapter launchers read x through any row stride >= 0: a stride below the width
    (x.expand(M, K), overlapping views) is valid input, not cudaErrorInvalidValue (issue 18)."""
    (tmp_path / "probe.cu").write_text(STRIDE_PROBE)
    kernels = ROOT / "csrc" / "kernels"
    # PTX only, for one virtual arch: the probe runs host code alone, so skip ptxas and sm_90.
    cmd = ["nvcc", "-std=c++17", "-O0", "-gencode", "arch=compute_80,code=compute_80", f"-I{kernels}",
           str(tmp_path / "probe.cu"), str(kernels / "layer_norm.cu"), str(kernels / "adapter.cu"),
           str(kernels / "adapter_bwd.cu"), str(kernels / "adapter_fused.cu"), str(kernels / "rms_norm.cu"),
           "-o", str(tmp_path / "probe")]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr[-3000:]
    if ran.stdout.strip() == "gpu":
        pytest.skip("a GPU is visible: the probe's fake pointers must not reach it (the GPU tests cover this)")
    codes = {int(line.split()[0]): line.split()[1:] for line in ran.stdout.splitlines()}
    invalid = "1"  # cudaErrorInvalidValue
    names = ("layer_norm_fwd", "layer_norm_bwd", "adapter_fwd", "adapter_bwd", "rms_norm_fwd", "rms_norm_bwd")
    assert codes[-1] == [invalid] * 6, f"a negative stride must be refused: {dict(zip(names, codes[-1]))}"
    assert invalid not in codes[8], f"the probe fails even on contiguous x: {dict(zip(names, codes[8]))}"
    assert codes[0] == codes[8], f"stride 0 refused: {dict(zip(names, codes[0]))} vs contiguous {codes[8]}"


# ---- with a GPU and the built extension: cuda against triton ----

CUDA_REASON = backend.why_unavailable("cuda")
TRITON_REASON = backend.why_unavailable("triton")
needs_both = pytest.mark.skipif(
    CUDA_REASON is not None or TRITON_REASON is not None or DEVICE.type != "cuda",
    reason=f"cross-checking cuda against triton needs both on a GPU: cuda: {CUDA_REASON or 'ok'}; "
           f"triton: {TRITON_REASON or 'ok'}; device: {DEVICE}")
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"the cuda backend is unavailable: {CUDA_REASON}")
CROSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _run(name, fn, args, upstream):
    """Output and gradients of ``fn(*args)`` under backend ``name``, on fresh leaves."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    with lk.use_backend(name):
        out = fn(*leaves)
        out.backward(upstream(out))
    return [out] + [a.grad for a in leaves if a.requires_grad]


def _cross_check(fn, args, dtype, what):
    # 0-d tensors (logit_scale) keep their dtype, as open_clip keeps the scale in fp32.
    low = [a.detach().to(dtype if a.dim() else a.dtype).requires_grad_(a.requires_grad) for a in args]
    grads = {}

    def upstream(out):  # one upstream gradient, shared by both backends
        if "g" not in grads:
            grads["g"] = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)
        return grads["g"]

    got, want = _run("cuda", fn, low, upstream), _run("triton", fn, low, upstream)
    # Each backend is within the dtype's tolerance of the float64 reference (the op tests check
    # that), so the two may differ by twice as much.
    tol = 2 * tolerance(dtype)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{what} result {i}: cuda {a.dtype}{tuple(a.shape)}, " \
                                                          f"triton {b.dtype}{tuple(b.shape)}"
        err = rel_err(a, b)
        assert err <= tol, f"{what} result {i} (0: output, then grads): cuda vs triton {err:.2e} > {tol:.0e}"


@needs_both
@pytest.mark.parametrize("dtype", CROSS_DTYPES, ids=str)
@pytest.mark.parametrize("lead,width", [((37,), 129), ((4, 3), 1000)])
def test_layer_norm_cuda_matches_triton(dtype, lead, width):
    args = [randn(*lead, width, requires_grad=True, scale=2.0), randn(width, requires_grad=True),
            randn(width, requires_grad=True)]
    _cross_check(lambda x, w, b: lk.layer_norm(x, w, b), args, dtype, f"layer_norm {lead}x{width}")


@needs_both
@pytest.mark.parametrize("dtype", CROSS_DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,r,activation", [((37,), 129, 3, "gelu"), ((4, 8), 64, 16, "silu")])
def test_adapter_cuda_matches_triton(dtype, lead, k, r, activation):
    args = [randn(*lead, k, requires_grad=True), randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(r, requires_grad=True), randn(k, r, requires_grad=True, scale=r**-0.5), randn(k, requires_grad=True)]
    _cross_check(lambda *a: lk.adapter(*a, activation=activation, scale=0.5), args, dtype,
                 f"adapter {lead}x{k} r={r} {activation}")


@needs_both
@pytest.mark.parametrize("dtype", CROSS_DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r", [((37,), 129, 70, 3), ((2, 5), 64, 48, 16)])
def test_lora_cuda_matches_triton(dtype, lead, k, n, r):
    # No dropout: each backend draws its own mask (the op tests check each one's consistency).
    args = [randn(*lead, k, requires_grad=True), randn(n, k, scale=k**-0.5), randn(n),
            randn(r, k, requires_grad=True, scale=k**-0.5), randn(n, r, requires_grad=True, scale=r**-0.5)]
    _cross_check(lambda *a: lk.lora_linear(*a, scaling=0.75), args, dtype, f"lora {lead}x{k}->{n} r={r}")


@needs_both
@pytest.mark.parametrize("dtype", CROSS_DTYPES, ids=str)
@pytest.mark.parametrize("n,d,normalize", [(37, 64, False), (300, 96, True)])
def test_infonce_cuda_matches_triton(dtype, n, d, normalize):
    args = [randn(n, d, requires_grad=True), randn(n, d, requires_grad=True),
            torch.tensor(10.0 if normalize else 10.0 / math.sqrt(d), device=DEVICE, requires_grad=True)]
    _cross_check(lambda *a: lk.infonce(*a, lambda_=0.3, normalize=normalize), args, dtype,
                 f"infonce N={n} d={d} normalize={normalize}")


@needs_cuda
def test_compiled_ops_reject_bad_input_by_name():
    """The *_cuda ops check their own inputs: called directly with a wrong shape, they name the
    argument and the expected shape instead of launching a kernel."""
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match=r"weight must have shape \[N\] = \[8\], got \[7\]"):
        torch.ops.lora_kernels.layer_norm_fwd_cuda(x, torch.randn(7, device="cuda"), None, 1e-5)
    with pytest.raises(ValueError, match="unit stride"):
        torch.ops.lora_kernels.layer_norm_fwd_cuda(torch.randn(8, 4, device="cuda").T, None, None, 1e-5)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.lora_kernels.adapter_fwd_cuda(x, torch.randn(2, 8, device="cuda"), None,
                                                torch.randn(8, 2, device="cuda"), None, "tanh", 1.0)


@needs_cuda
def test_compiled_ops_schema():
    """Outputs are fresh tensors: nothing aliases or mutates an input (opcheck's schema test)."""
    x, w, b = torch.randn(5, 9, device="cuda"), torch.randn(9, device="cuda"), torch.randn(9, device="cuda")
    lib = torch.ops.lora_kernels
    torch.library.opcheck(lib.layer_norm_fwd_cuda.default, (x, w, b, 1e-5), test_utils="test_schema")
    y, mean, rstd = lib.layer_norm_fwd_cuda(x, w, b, 1e-5)
    torch.library.opcheck(lib.layer_norm_bwd_cuda.default, (torch.randn_like(y), x, w, mean, rstd, False, True, True),
                          test_utils="test_schema")
    a, bb = torch.randn(2, 9, device="cuda"), torch.randn(7, 2, device="cuda")
    torch.library.opcheck(lib.lora_linear_fwd_cuda.default, (x, torch.randn(7, 9, device="cuda"), None, a, bb,
                                                             0.5, 0.0, 3), test_utils="test_schema")
    scale = torch.tensor(2.0, device="cuda")
    torch.library.opcheck(lib.infonce_fwd_cuda.default, (x, torch.randn_like(x), scale, 0.5, True),
                          test_utils="test_schema")


@needs_cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_overlapping_rows_of_x(dtype):
    """x.expand(M, K) and a view whose rows overlap run on the cuda backend (issue 18) and match
    the reference on a contiguous copy."""
    from lora_kernels.ops.adapter import IMPLS as ADAPTER
    from lora_kernels.ops.layer_norm import IMPLS as LAYER_NORM
    from lora_kernels.ops.rms_norm import IMPLS as RMS_NORM
    assert "cuda" in ADAPTER and "cuda" in LAYER_NORM and "cuda" in RMS_NORM
    k, r = 40, 3
    base = randn(k + 5 * 3, dtype=dtype)
    for x in (base[:k].expand(6, k), base.as_strided((6, k), (3, 1))):
        assert x.stride(0) < k
        w, b = randn(k, dtype=dtype), randn(k, dtype=dtype)
        wd, bd = randn(r, k, dtype=dtype, scale=k**-0.5), randn(r, dtype=dtype)
        wu, bu = randn(k, r, dtype=dtype, scale=r**-0.5), randn(k, dtype=dtype)
        for fn, args in ((lambda x, *a: lk.layer_norm(x, *a), (w, b)),
                         (lambda x, *a: lk.rms_norm(x, *a, offset=1.0), (w,)),
                         (lambda x, *a: lk.adapter(x, *a, activation="gelu_tanh", scale=0.5), (wd, bd, wu, bu))):
            leaves = [a.detach().requires_grad_() for a in args]
            with lk.use_backend("cuda"):
                out = fn(x, *leaves)
                grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
            ref_leaves = [a.detach().double().requires_grad_() for a in args]
            with lk.use_backend("torch"):
                ref = fn(x.double().contiguous(), *ref_leaves)
            ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
            for got, want in zip((out, *grads), (ref, *ref_grads)):
                assert rel_err(got, want) <= tolerance(dtype)


def _cuda_kernels_run(fn):
    """Names of the CUDA kernels that fn() launched (torch.profiler), or None without CUPTI."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return names or None
