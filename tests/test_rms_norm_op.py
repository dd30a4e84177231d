"""rms_norm against the float64 reference, on every backend that can run here."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels import backend as backend_lib
from lora_kernels.ops import rms_norm as op
from lora_kernels.reference import rms_norm as ref

from conftest import DEVICE, DTYPES, assert_close, backends_for, check_against_reference, randn, rel_err, tolerance

BACKENDS = backends_for(op.IMPLS)
TRITON = [b for b in BACKENDS if b == "triton"]
# (lead, width): one feature, odd narrow rows (ragged tiles of 64 rows, several per Triton
# program), a 2-D batch, whole rows at the register
# limit of the Triton backward (4096 fits, 20000 is chunked in both directions).
SHAPES = [((1,), 1), ((300,), 7), ((2, 5), 128), ((3,), 4096), ((2,), 20000)]


def make_args(lead, width, x_grad=True, affine=True):
    x = randn(*lead, width, scale=2.0) + 0.5
    return [x.requires_grad_(x_grad), randn(width, requires_grad=True) if affine else None]


def leaf(t):
    return t.detach().requires_grad_(t.requires_grad) if t is not None else None


def call(eps=1e-6, offset=0.0):
    return (lambda x, w: lk.rms_norm(x, w, eps=eps, offset=offset)), (lambda x, w: ref.rms_norm(x, w, eps, offset))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,width", SHAPES)
def test_forward_and_grads(backend, dtype, lead, width):
    args = [leaf(a) for a in make_args(lead, width)]
    if width == 1:
        # One feature: y = x/√(x² + eps)·γ, whose dx is rstd·s·eps/(x² + eps), a cancellation
        # 1 − x̂² that no finite precision resolves: only y and dγ are compared there.
        args[0].requires_grad_(False)
    with lk.use_backend(backend):
        check_against_reference(*call(), args, dtype, f"{backend} {lead}x{width}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset,eps", [(1.0, 1e-6), (0.0, 1e-5), (1.0, 1e-5)])
def test_offset_and_eps(backend, dtype, offset, eps):
    """offset=1 is Gemma's (1 + γ) scale; its γ sits near 0, so draw it small."""
    x, w = (leaf(a) for a in make_args((19,), 129))
    if offset:
        w = (w.detach() * 0.1).requires_grad_()
    with lk.use_backend(backend):
        check_against_reference(*call(eps, offset), [x, w], dtype, f"{backend} offset={offset} eps={eps}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_weight(backend, dtype):
    """torch.nn.RMSNorm(elementwise_affine=False): y = x·rstd."""
    x, _ = make_args((9,), 65, affine=False)
    with lk.use_backend(backend):
        check_against_reference(*call(), [leaf(x), None], dtype, f"{backend} no weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_input_gets_no_grad(backend):
    """LN-tuning: x does not require grad, so dx is never computed and x.grad stays None."""
    x, w = (leaf(a) for a in make_args((21,), 33, x_grad=False))
    with lk.use_backend(backend):
        check_against_reference(*call(offset=1.0), [x, w], torch.float64, "dγ only")
    assert x.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_grad(backend, monkeypatch):
    """dx only: the backend is asked for no dγ."""
    x, w = (leaf(a) for a in make_args((21,), 33))
    w.requires_grad_(False)
    impl, asked = op.IMPLS[backend], []

    def spy(*args):
        asked.append(args[-2:])
        return impl.backward(*args)

    monkeypatch.setitem(op.IMPLS, backend, backend_lib.Impl(impl.forward, spy, impl.supports))
    with lk.use_backend(backend):
        check_against_reference(*call(), [x, w], torch.float64, "dx only")
    assert w.grad is None and asked == [(True, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_fp64(backend, affine):
    x, w = (leaf(a) for a in make_args((5,), 7, affine=affine))
    with lk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: lk.rms_norm(*t, eps=1e-5, offset=float(affine)), (x, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    x, w = (leaf(a) for a in make_args((300,), 257, x_grad=False))
    g = randn(300, 257)
    grads = []
    with lk.use_backend(backend):
        for _ in range(2):
            w.grad = None
            lk.rms_norm(x, w).backward(g)
            grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_dim_weight_and_non_contiguous(backend):
    x = randn(6, 4, 10)[:, :, ::2].transpose(0, 1).requires_grad_()   # [4, 6, 5], strided
    w = randn(6, 5, requires_grad=True)
    with lk.use_backend(backend):
        check_against_reference(
            lambda xx, ww: lk.rms_norm(xx, ww, eps=1e-5),
            lambda xx, ww: torch.nn.functional.rms_norm(xx, (6, 5), ww, 1e-5), [x, w], torch.float64,
            "2-D normalized_shape")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [0, 1])
def test_tiny_batches(backend, m):
    x, w = (leaf(a) for a in make_args((m,), 17))
    with lk.use_backend(backend):
        y = lk.rms_norm(x, w)
        y.sum().backward()
    assert y.shape == (m, 17)
    if m == 0:
        assert torch.equal(w.grad, torch.zeros_like(w))


def test_reference_equals_torch_rms_norm():
    x, w = (a.detach() for a in make_args((13, 2), 50))
    assert_close(ref.rms_norm(x, w, 1e-6), torch.nn.functional.rms_norm(x, (50,), w, 1e-6), torch.float64,
                 "F.rms_norm")
    assert_close(ref.rms_norm(x, w, 1e-6, 1.0), torch.nn.functional.rms_norm(x, (50,), 1.0 + w, 1e-6),
                 torch.float64, "offset 1")


def test_reference_backward_matches_autograd():
    for w in (randn(12), None):
        x = randn(10, 12, requires_grad=True)
        w = w if w is None else w.requires_grad_()
        out = ref.rms_norm(x, w, 1e-5, 0.0 if w is None else 0.5)
        g = randn(10, 12)
        out.backward(g)
        y, rstd = ref.forward(x.detach(), None if w is None else w.detach(), 1e-5, 0.0 if w is None else 0.5)
        assert_close(y, out, torch.float64, "forward")
        dx, dw = ref.backward(g, x.detach(), None if w is None else w.detach(), rstd, 0.0 if w is None else 0.5,
                              True, w is not None)
        assert_close(dx, x.grad, torch.float64, "reference dx")
        if w is not None:
            assert_close(dw, w.grad, torch.float64, "reference dγ")


def test_statistics_are_never_half():
    _, rstd = op.rms_norm_fwd(randn(4, 32).to(torch.bfloat16), None, 1e-6, 0.0)
    assert rstd.dtype == torch.float32


def test_opcheck():
    x, w = (a.detach() for a in make_args((5,), 9))
    torch.library.opcheck(op.rms_norm_fwd, (x, w, 1e-6, 1.0))
    torch.library.opcheck(op.rms_norm_fwd, (x, None, 1e-5, 0.0))
    _, rstd = ref.forward(x, w, 1e-6, 1.0)
    for needs in [(True, True), (False, True), (True, False)]:
        torch.library.opcheck(op.rms_norm_bwd, (randn(5, 9), x, w, rstd, 1.0, *needs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """One opaque custom op in the graph, forward and backward, equal to the eager call."""
    torch._dynamo.reset()
    x, w = (leaf(a) for a in make_args((3, 4), 24))
    x2, w2 = leaf(x), leaf(w)
    fn = lambda a, b: lk.rms_norm(a, b, eps=1e-5, offset=1.0)  # noqa: E731
    with lk.use_backend(backend):
        out_c = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w)
        out_e = fn(x2, w2)
        g = randn(3, 4, 24)
        out_c.backward(g)
        out_e.backward(g)
    assert torch.equal(out_c, out_e)
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)
    torch._dynamo.reset()


BAD_INPUTS = [
    ("weight shape", lambda x, w: (x, w[:-1]), {}, ValueError, "normalized_shape"),
    ("int dtype", lambda x, w: (x.long(), w), {}, TypeError, "x must be float"),
    ("mixed dtype", lambda x, w: (x, w.float()), {}, TypeError, "dtype"),
    ("mixed device", lambda x, w: (x, w.to("meta")), {}, ValueError, "device"),
    ("negative eps", lambda x, w: (x, w), {"eps": -1.0}, ValueError, "eps"),
    ("offset without weight", lambda x, w: (x, None), {"offset": 1.0}, ValueError, "offset"),
    ("non-finite offset", lambda x, w: (x, w), {"offset": float("nan")}, ValueError, "offset"),
]


@pytest.mark.parametrize("what,mutate,kwargs,exc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected(what, mutate, kwargs, exc, text):
    args = [a.detach() for a in make_args((4,), 8)]
    with pytest.raises(exc, match=text):
        lk.rms_norm(*mutate(*args), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [37, 20000])
def test_inference_forward_skips_the_statistics_with_the_same_output(monkeypatch, backend, dtype, width):
    """Without a graph nothing reads rstd: the op asks the backend not to keep it (stats=False),
    and y is bitwise the y of a forward that keeps it."""
    x, w = randn(3, width, dtype=dtype), randn(width, dtype=dtype)
    impl, seen = op.IMPLS[backend], []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stats", True))
        return impl.forward(*args, **kwargs)

    monkeypatch.setitem(op.IMPLS, backend, backend_lib.Impl(spy, impl.backward, impl.supports))
    with lk.use_backend(backend):
        with torch.no_grad():
            y = lk.rms_norm(x, w, offset=1.0)
        kept, rstd = impl.forward(x, w, 1e-6, 1.0)
    assert seen == [False]
    assert torch.equal(y, kept) and rstd.shape == (3,)
    if backend in ("triton", "cuda"):
        assert impl.forward(x, w, 1e-6, 1.0, stats=False)[1] is None


# ------------------------------------------------------------------ Triton kernel paths
NEEDS = {"all": (True, True), "x frozen": (False, True), "weight frozen": (True, False), "no weight": (True, None)}


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the Triton kernels' limits so that rows of a few hundred features take the paths of
    rows too wide for registers (chunked sum of squares, a column-tiled backward after a row pass,
    several row groups and a reduction over several blocks of partials) at interpreter cost."""
    from lora_kernels.triton import rms_norm as trms
    for name, value in [("_FWD_MAX_FUSED", 64), ("_BWD_MAX_FUSED", 64), ("_CHUNK", 64), ("_TILE", 64),
                        ("_WIDE_BWD_BLOCK_N", 32), ("_INTERPRETER_PROGRAMS", 20)]:
        monkeypatch.setattr(trms, name, value)
    return trms


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("need", list(NEEDS))
def test_chunked_rows(backend, dtype, need, small_blocks):
    """13 rows of 300 features: 5 chunks of 64 (the last partial), 10 column blocks, 2 row groups."""
    x_grad, weight = NEEDS[need]
    x, w = (leaf(a) for a in make_args((13,), 300, x_grad=x_grad, affine=weight is not None))
    if weight is False:
        w.requires_grad_(False)
    with lk.use_backend(backend):
        (x, w), _ = check_against_reference(*call(offset=0.0 if weight is None else 1.0), [x, w], dtype,
                                            f"chunked {need}")
    assert (x.grad is None) == (need == "x frozen")
    assert w is None or (w.grad is None) == (need == "weight frozen")


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("path", ["whole row", "chunked"])
def test_strided_rows(backend, path, request):
    """A transposed x: both the row and the feature stride differ from a contiguous layout."""
    if path == "chunked":
        request.getfixturevalue("small_blocks")
    x = randn(129, 11).t().requires_grad_()   # [11, 129], strides (1, 11)
    w = randn(129, requires_grad=True)
    with lk.use_backend(backend):
        check_against_reference(*call(), [x, w], torch.float32, f"strided {path}")


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("path", ["whole row", "chunked"])
def test_forward_programs_loop_over_row_tiles(backend, path, monkeypatch, request):
    """Fewer programs than row tiles: each normalises several tiles (γ loaded once per program)."""
    if path == "chunked":
        request.getfixturevalue("small_blocks")
    from lora_kernels.triton import rms_norm as trms
    monkeypatch.setattr(trms, "_INTERPRETER_PROGRAMS", 3)
    x, w = (a.detach() for a in make_args((23,), 100))
    with lk.use_backend(backend), torch.no_grad():
        y, rstd = trms.forward(x.float(), w.float(), 1e-6, 1.0)
        y_infer, none = trms.forward(x.float(), w.float(), 1e-6, 1.0, stats=False)
    assert_close(y, ref.rms_norm(x, w, 1e-6, 1.0), torch.float32, path)
    assert_close(rstd, ref.forward(x, w, 1e-6, 1.0)[1], torch.float32, f"{path} rstd")
    assert torch.equal(y_infer, y) and none is None


@pytest.mark.parametrize("backend", TRITON)
def test_chunked_backward_is_deterministic(backend, small_blocks):
    x, w = (leaf(a) for a in make_args((21,), 100))
    g = randn(21, 100)
    grads = []
    with lk.use_backend(backend):
        for _ in range(2):
            x.grad = w.grad = None
            lk.rms_norm(x, w).backward(g)
            grads.append((x.grad.clone(), w.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ------------------------------------------------------------------ CUDA C++ against Triton
needs_both = pytest.mark.skipif(not {"triton", "cuda"} <= set(BACKENDS) or DEVICE.type != "cuda",
                                reason="needs a GPU with both the Triton and the compiled CUDA backend")


@needs_both
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,width,offset", [((37,), 129, 0.0), ((4, 3), 1000, 1.0), ((5,), 20000, 0.0)])
def test_cuda_matches_triton(dtype, lead, width, offset):
    x, w = make_args(lead, width)
    results = []
    for name in ("cuda", "triton"):
        xl, wl = (leaf(a.detach().to(dtype).requires_grad_()) for a in (x, w))
        with lk.use_backend(name):
            y = lk.rms_norm(xl, wl, offset=offset)
            y.backward(torch.ones_like(y) * 0.5 + xl.detach())
        results.append((y, xl.grad, wl.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) <= 2 * tolerance(dtype)


@needs_both
def test_compiled_ops_schema():
    """Outputs are fresh tensors: nothing aliases or mutates an input."""
    x, w = torch.randn(5, 9, device="cuda"), torch.randn(9, device="cuda")
    lib = torch.ops.lora_kernels
    torch.library.opcheck(lib.rms_norm_fwd_cuda.default, (x, w, 1e-6, 1.0, True), test_utils="test_schema")
    y, rstd = lib.rms_norm_fwd_cuda(x, w, 1e-6, 1.0, True)
    torch.library.opcheck(lib.rms_norm_bwd_cuda.default, (torch.randn_like(y), x, w, rstd, 1.0, False, True),
                          test_utils="test_schema")
    with pytest.raises(ValueError, match=r"weight must have shape \[N\] = \[9\], got \[7\]"):
        lib.rms_norm_fwd_cuda(x, torch.randn(7, device="cuda"), 1e-6, 0.0, True)


# ------------------------------------------------------------------ FusedRMSNorm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_module_matches_torch_rms_norm_and_shares_state_dict(backend, offset):
    """Key ``weight`` both ways with torch.nn.RMSNorm (offset 0) and HF's *RMSNorm; a fresh module
    is the identity scale whatever the offset."""
    fused = lk.FusedRMSNorm(24, eps=1e-5, offset=offset, device=DEVICE, dtype=torch.float64)
    torch_norm = torch.nn.RMSNorm(24, eps=1e-5, device=DEVICE, dtype=torch.float64)
    x = randn(3, 5, 24)
    with lk.use_backend(backend):
        assert_close(fused(x), torch_norm(x), torch.float64, "fresh module")
        assert list(fused.state_dict()) == ["weight"]
        torch_norm.weight.data.normal_()
        fused.load_state_dict({"weight": torch_norm.weight.detach() - offset})
        assert_close(fused(x), torch_norm(x), torch.float64, "loaded weight")
        fused(x).sum().backward()
    assert fused.weight.grad is not None and fused.weight.grad.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
def test_module_fp32_weight_with_half_input(backend, half):
    """HF models in mixed precision hold the norm weight in fp32: the output has the input's dtype,
    the weight's gradient is fp32, both close to float64's."""
    fused = lk.FusedRMSNorm(37, offset=1.0, device=DEVICE)
    with torch.no_grad():
        fused.weight.normal_(0, 0.1)
    x = randn(6, 37, dtype=half, requires_grad=True)
    g = randn(6, 37, dtype=half)
    with lk.use_backend(backend):
        y = fused(x)
        y.backward(g)
    assert y.dtype == half and fused.weight.grad.dtype == torch.float32 and x.grad.dtype == half
    x64 = x.detach().double().requires_grad_()
    w64 = fused.weight.detach().double().requires_grad_()
    expected = ref.rms_norm(x64, w64, 1e-6, 1.0)
    expected.backward(g.double())
    assert rel_err(y, expected) <= tolerance(half)
    assert rel_err(fused.weight.grad, w64.grad) <= tolerance(half)
    assert rel_err(x.grad, x64.grad) <= tolerance(half)


def test_module_options_and_errors():
    m = lk.FusedRMSNorm((3, 4), eps=None, elementwise_affine=False)
    x = randn(2, 3, 4).float()
    assert m.weight is None and list(m.state_dict()) == []
    assert_close(m(x), torch.nn.functional.rms_norm(x, (3, 4)), torch.float32, "eps=None, no affine")
    assert lk.FusedRMSNorm(8, eps=1e-5).variance_epsilon == 1e-5
    with pytest.raises(ValueError, match="hidden_size"):
        lk.FusedRMSNorm(0)
    with pytest.raises(ValueError, match="offset"):
        lk.FusedRMSNorm(8, offset=1.0, elementwise_affine=False)
    with pytest.raises(ValueError, match="normalized_shape"):
        lk.FusedRMSNorm(8)(randn(2, 9).float())


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    m = lk.FusedRMSNorm(24, offset=1.0, device=DEVICE)
    with torch.no_grad():
        m.weight.normal_(0, 0.1)
    x = randn(3, 24, dtype=torch.bfloat16)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out_c, out_e = compiled(x), m(x)
    grads = [torch.autograd.grad(o.float().sum(), [m.weight])[0] for o in (out_c, out_e)]
    assert torch.equal(out_c, out_e) and torch.equal(*grads)
    torch._dynamo.reset()


def test_public_api():
    import inspect
    assert "rms_norm" in lk.__all__ and "FusedRMSNorm" in lk.__all__
    assert str(inspect.signature(lk.rms_norm)) == "(x, weight, eps=1e-06, offset=0.0)"
    assert list(inspect.signature(lk.FusedRMSNorm).parameters)[:3] == ["hidden_size", "eps", "offset"]
    assert callable(lk.surgery.register_rms_norm)
