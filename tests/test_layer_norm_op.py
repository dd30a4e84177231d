"""layer_norm against the float64 reference, on every backend that can run here."""
import copy

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backend as backend_lib
from lora_kernels.ops import layer_norm as op
from lora_kernels.reference import layer_norm as ref

from conftest import DTYPES, assert_close, backends_for, check_against_reference, randn

BACKENDS = backends_for(op.IMPLS)
SHAPES = [((1,), 1), ((37,), 129), ((2, 5), 1000), ((3,), 65537), ((4, 1, 3), 64)]  # (lead, width)


def make_args(lead, width, x_grad=True, affine=True):
    return [randn(*lead, width, requires_grad=x_grad, scale=2.0) + 0.5 if x_grad else randn(*lead, width),
            randn(width, requires_grad=True) if affine else None,
            randn(width, requires_grad=True) if affine else None]


def leaf(t):
    return t.detach().requires_grad_(t.requires_grad) if t is not None else None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,width", SHAPES)
def test_forward_and_grads(backend, dtype, lead, width):
    args = [leaf(a) for a in make_args(lead, width)]
    if width == 1:  # a single feature normalises to exactly 0: only β and the zero dx remain
        args[0] = args[0].detach().requires_grad_(False)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.layer_norm(*a, eps=1e-5), lambda *a: ref.layer_norm(*a, 1e-5),
                                args, dtype, f"{backend} {lead}x{width}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_mean_is_stable(backend, dtype):
    """x + 1e4: one-pass E[x²] − E[x]² would lose every digit of the variance in fp32.
    The output must keep full accuracy; the gradients recompute x̂ from the stored mean, whose
    fp32 rounding (ulp(1e4)/2 ≈ 5e-4 against std 1) bounds them at ~1e-3."""
    x = (randn(16, 1000) + 1e4).requires_grad_()
    w, b = randn(1000, requires_grad=True), randn(1000, requires_grad=True)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.layer_norm(*a), lambda *a: ref.layer_norm(*a), [x, w, b], dtype,
                                "large mean", grad_tol=1e-3 if dtype == torch.float32 else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_input_gets_no_grad(backend):
    """LN-tuning: x does not require grad, so dx is never computed and x.grad stays None."""
    x, w, b = (leaf(a) for a in make_args((21,), 33, x_grad=False))
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.layer_norm(*a), lambda *a: ref.layer_norm(*a), [x, w, b],
                                torch.float64, "dγ/dβ only")
    assert x.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weights_get_no_grad(backend):
    x, w, b = (leaf(a) for a in make_args((21,), 33))
    w.requires_grad_(False)
    b.requires_grad_(False)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.layer_norm(*a), lambda *a: ref.layer_norm(*a), [x, w, b],
                                torch.float64, "dx only")
    assert w.grad is None and b.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["none", "weight only", "both"])
def test_gradcheck_fp64(backend, affine):
    x, w, b = (leaf(a) for a in make_args((5,), 7))
    args = {"none": (x, None, None), "weight only": (x, w, None), "both": (x, w, b)}[affine]
    with lk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: lk.layer_norm(*t, eps=1e-5), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    x, w, b = (leaf(a) for a in make_args((300,), 257, x_grad=False))
    g = randn(300, 257)
    grads = []
    with lk.use_backend(backend):
        for _ in range(2):
            w.grad = b.grad = None
            lk.layer_norm(x, w, b).backward(g)
            grads.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_dim_normalized_shape_and_non_contiguous(backend):
    x = randn(6, 4, 10)[:, :, ::2].transpose(0, 1).requires_grad_()   # [4, 6, 5], strided
    w, b = randn(6, 5, requires_grad=True), randn(6, 5, requires_grad=True)
    with lk.use_backend(backend):
        check_against_reference(
            lambda *a: lk.layer_norm(*a),
            lambda xx, ww, bb: torch.nn.functional.layer_norm(xx, (6, 5), ww, bb, 1e-5), [x, w, b],
            torch.float64, "2-D normalized_shape")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [0, 1])
def test_tiny_batches(backend, m):
    x, w, b = (leaf(a) for a in make_args((m,), 17))
    with lk.use_backend(backend):
        y = lk.layer_norm(x, w, b)
        y.sum().backward()
    assert y.shape == (m, 17)
    if m == 0:
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_reference_equals_torch_layer_norm():
    x, w, b = (a.detach() for a in make_args((13, 2), 50))
    assert_close(ref.layer_norm(x, w, b, 1e-6), torch.nn.functional.layer_norm(x, (50,), w, b, 1e-6),
                 torch.float64, "F.layer_norm")


def test_reference_backward_matches_autograd():
    x, w, b = (leaf(a) for a in make_args((10,), 12))
    out = ref.layer_norm(x, w, b)
    g = randn(10, 12)
    out.backward(g)
    y, mean, rstd = ref.forward(x.detach(), w.detach(), b.detach(), 1e-5)
    assert_close(y, out, torch.float64, "forward")
    for got, t in zip(ref.backward(g, x.detach(), w.detach(), mean, rstd, True, True, True), (x, w, b)):
        assert_close(got, t.grad, torch.float64, "reference backward")


def test_statistics_are_never_half():
    x = randn(4, 32).to(torch.bfloat16)
    _, mean, rstd = op.layer_norm_fwd(x, None, None, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32


def test_opcheck():
    x, w, b = (a.detach() for a in make_args((5,), 9))
    torch.library.opcheck(op.layer_norm_fwd, (x, w, b, 1e-5))
    torch.library.opcheck(op.layer_norm_fwd, (x, None, None, 1e-5))
    _, mean, rstd = ref.forward(x, w, b, 1e-5)
    for needs in [(True, True, True), (False, True, True), (True, False, False)]:
        torch.library.opcheck(op.layer_norm_bwd, (randn(5, 9), x, w, mean, rstd, *needs))


BAD_INPUTS = [
    ("weight shape", lambda x, w, b: (x, w[:-1], b), ValueError, "normalized_shape"),
    ("bias shape", lambda x, w, b: (x, w, b[:-1]), ValueError, "bias"),
    ("int dtype", lambda x, w, b: (x.long(), w, b), TypeError, "x must be float"),
    ("mixed dtype", lambda x, w, b: (x, w.float(), b), TypeError, "dtype"),
    ("mixed device", lambda x, w, b: (x, w, b.to("meta")), ValueError, "device"),
]


@pytest.mark.parametrize("what,mutate,exc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected(what, mutate, exc, text):
    args = [a.detach() for a in make_args((4,), 8)]
    with pytest.raises(exc, match=text):
        lk.layer_norm(*mutate(*args))


def test_negative_eps_is_rejected():
    with pytest.raises(ValueError, match="eps"):
        lk.layer_norm(*[a.detach() for a in make_args((4,), 8)], eps=-1.0)


# ------------------------------------------------------------------ Triton kernel paths
TRITON = [b for b in BACKENDS if b == "triton"]
NEEDS = {"all": (True, True), "x frozen": (False, True), "weights frozen": (True, False), "no affine": (True, None)}


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the Triton kernels' limits so that rows of a few hundred features take the paths
    of rows too wide for registers: chunked statistics merged across chunks, a column-tiled
    backward after a row-statistics pass, several row groups each looping over row tiles, and
    a partial-sum reduction over several blocks of partials."""
    from lora_kernels.triton import layer_norm as tln
    for name, value in [("_FWD_MAX_FUSED", 64), ("_BWD_MAX_FUSED", 64), ("_CHUNK", 64), ("_TILE", 64),
                        ("_WIDE_BWD_BLOCK_N", 32), ("_INTERPRETER_PROGRAMS", 20)]:
        monkeypatch.setattr(tln, name, value)
    return tln


def needs_args(lead, width, need):
    x_grad, weights = NEEDS[need]
    args = [leaf(a) for a in make_args(lead, width, x_grad=x_grad, affine=weights is not None)]
    if weights is False:
        args[1].requires_grad_(False)
        args[2].requires_grad_(False)
    return args


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("need", list(NEEDS))
def test_chunked_rows(backend, dtype, need, small_blocks):
    """13 rows of 300 features: 5 chunks of 64 (the last one partial), 10 column blocks, 2 row
    groups of 2 row tiles each."""
    args = needs_args((13,), 300, need)
    with lk.use_backend(backend):
        (x, w, b), _ = check_against_reference(lambda *a: lk.layer_norm(*a), lambda *a: ref.layer_norm(*a), args,
                                               dtype, f"chunked {need}")
    assert (x.grad is None) == (need == "x frozen")
    assert (w is None or w.grad is None) == (need in ("weights frozen", "no affine"))


@pytest.mark.parametrize("backend", TRITON)
def test_chunked_rows_large_mean_is_stable(backend, small_blocks):
    """Chunk statistics merged with Chan's update keep the variance of x + 1e4 in fp32."""
    x = (randn(5, 300) + 1e4).requires_grad_()
    w, b = randn(300, requires_grad=True), randn(300, requires_grad=True)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.layer_norm(*a), lambda *a: ref.layer_norm(*a), [x, w, b],
                                torch.float32, "chunked large mean", grad_tol=1e-3)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("path", ["whole row", "chunked"])
def test_strided_rows(backend, path, request):
    """A transposed x: both the row and the feature stride differ from a contiguous layout."""
    if path == "chunked":
        request.getfixturevalue("small_blocks")
    x = randn(129, 11).t().requires_grad_()   # [11, 129], strides (1, 11)
    w, b = randn(129, requires_grad=True), randn(129, requires_grad=True)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.layer_norm(*a), lambda *a: ref.layer_norm(*a), [x, w, b],
                                torch.float32, f"strided {path}")


@pytest.mark.parametrize("backend", TRITON)
def test_chunked_backward_is_deterministic(backend, small_blocks):
    x, w, b = (leaf(a) for a in make_args((21,), 100))
    g = randn(21, 100)
    grads = []
    with lk.use_backend(backend):
        for _ in range(2):
            x.grad = w.grad = b.grad = None
            lk.layer_norm(x, w, b).backward(g)
            grads.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ln_tuning_with_lora_and_adapter_in_one_model(backend):
    """Bitfit-style combo: LoRA factors, an adapter and LayerNorm γ/β train together, so the
    LayerNorm needs dx (for the LoRA and adapter upstream) as well as dγ/dβ. Gradients of every
    trainable parameter match the same model run in float64 on the torch reference backend.
    The other ops run on whatever backend ``auto`` picks for them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(lk.LoRALinear(24, 40, r=4), lk.BottleneckAdapter(40, bottleneck=8),
                                lk.FusedLayerNorm(40), torch.nn.GELU(), lk.LoRALinear(40, 16, r=2),
                                lk.FusedLayerNorm(16, elementwise_affine=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    expected = copy.deepcopy(model).double()
    x, g = randn(3, 7, 24), randn(3, 7, 16)  # a normalised row's Σy² is constant: weight it by g
    with lk.use_backend("auto"):
        if backend_lib.selected_name("layer_norm", op.IMPLS, x.float()) != backend:
            pytest.skip(f"auto does not pick {backend} for layer_norm here")
        model(x.float()).backward(g.float())
    with lk.use_backend("torch"):
        expected(x).backward(g)
    trained = [(n, p, q) for (n, p), q in zip(model.named_parameters(), expected.parameters()) if p.requires_grad]
    assert any(n.endswith("weight") and "2." in n for n, _, _ in trained)  # LayerNorm γ trains
    for name, p, q in trained:
        assert_close(p.grad, q.grad, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [37, 20000])  # whole rows in registers, and the chunked wide rows
def test_inference_forward_skips_the_statistics_with_the_same_output(monkeypatch, backend, dtype, width):
    """Without a graph nothing reads mean/rstd: the op asks the backend not to make them
    (stats=False), and y is bitwise the y of a forward that keeps them."""
    x, w, b = randn(3, width, dtype=dtype), randn(width, dtype=dtype), randn(width, dtype=dtype)
    impl, seen = op.IMPLS[backend], []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stats", True))
        return impl.forward(*args, **kwargs)

    monkeypatch.setitem(op.IMPLS, backend, backend_lib.Impl(spy, impl.backward, impl.supports))
    with lk.use_backend(backend):
        with torch.no_grad():
            y = lk.layer_norm(x, w, b)
        kept, mean, rstd = impl.forward(x, w, b, 1e-5)
    assert seen == [False]
    assert torch.equal(y, kept) and mean.shape == rstd.shape == (3,)
    if backend == "triton":
        assert impl.forward(x, w, b, 1e-5, stats=False)[1:] == (None, None)
