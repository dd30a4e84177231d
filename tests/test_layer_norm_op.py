"""layer_norm against the float64 reference, on every backend that can run here."""
import pytest
import torch

import lora_kernels as lk
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
