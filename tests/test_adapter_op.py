"""adapter against the float64 reference, on every backend that can run here."""
import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import adapter as op
from lora_kernels.reference import adapter as ref

from conftest import DTYPES, assert_close, backends_for, check_against_reference, randn

BACKENDS = backends_for(op.IMPLS)
ACTS = ref.ACTIVATIONS
SHAPES = [((1,), 16, 1), ((37,), 129, 3), ((2, 5), 64, 16), ((3, 1, 7), 24, 40)]  # (lead, K, r)


def make_args(lead, k, r, bias=True):
    return [randn(*lead, k, requires_grad=True),
            randn(r, k, requires_grad=True, scale=k**-0.5), randn(r, requires_grad=True) if bias else None,
            randn(k, r, requires_grad=True, scale=r**-0.5), randn(k, requires_grad=True) if bias else None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("lead,k,r", SHAPES)
def test_forward_and_grads(backend, dtype, activation, lead, k, r):
    fn = lambda *a: lk.adapter(*a, activation=activation, scale=0.7)  # noqa: E731
    with lk.use_backend(backend):
        check_against_reference(fn, lambda *a: ref.adapter(*a, activation, 0.7), make_args(lead, k, r), dtype,
                                f"{backend} {activation} {lead}x{k} r={r}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_biases(backend):
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.adapter(*a), lambda *a: ref.adapter(*a),
                                make_args((11,), 20, 4, bias=False), torch.float64, "no bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_fp64(backend, activation):
    args = make_args((5,), 7, 3)
    with lk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: lk.adapter(*t, activation=activation, scale=1.3), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dx_when_x_is_frozen(backend):
    x, wd, bd, wu, bu = make_args((9,), 12, 3)
    x.requires_grad_(False)
    bd.requires_grad_(False)
    with lk.use_backend(backend):
        lk.adapter(x, wd, bd, wu, bu).sum().backward()
    assert x.grad is None and bd.grad is None
    assert all(t.grad is not None for t in (wd, wu, bu))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty(backend):
    x = randn(10, 30)[:, ::2].requires_grad_()
    wd, wu = randn(15, 4).T.requires_grad_(), randn(4, 15).T.requires_grad_()
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.adapter(*a, activation="silu"), lambda *a: ref.adapter(*a, "silu"),
                                [x, wd, None, wu, None], torch.float64, "non-contiguous")
        empty = lk.adapter(randn(0, 15), wd, None, wu, None)
    assert empty.shape == (0, 15)


def test_activation_derivatives_match_autograd():
    h = randn(257, requires_grad=True, scale=3.0)
    for name in ACTS:
        (grad,) = torch.autograd.grad(ref.act(h, name).sum(), h)
        assert_close(ref.act_grad(h.detach(), name), grad, torch.float64, name)


def test_reference_activations_match_independent_formulas():
    h = randn(300, scale=3.0)
    gelu_erf = h * 0.5 * torch.special.erfc(-h / math.sqrt(2.0))
    assert_close(ref.act(h, "gelu"), gelu_erf, torch.float64, "gelu")
    assert_close(ref.act(h, "gelu_tanh"), torch.nn.functional.gelu(h, approximate="tanh"), torch.float64, "tanh")
    assert_close(ref.act(h, "relu"), torch.where(h > 0, h, 0.0), torch.float64, "relu")
    assert_close(ref.act(h, "silu"), h / (1 + torch.exp(-h)), torch.float64, "silu")


def test_reference_equals_module_composition():
    x, wd, bd, wu, bu = (t.detach() for t in make_args((13,), 21, 5))
    expected = x + 0.5 * torch.nn.functional.linear(torch.nn.functional.gelu(
        torch.nn.functional.linear(x, wd, bd)), wu, bu)
    assert_close(ref.adapter(x, wd, bd, wu, bu, "gelu", 0.5), expected, torch.float64, "composition")


def test_reference_backward_matches_autograd():
    args = make_args((10,), 12, 3)
    x, wd, bd, wu, bu = args
    out = ref.adapter(*args, "gelu_tanh", 0.9)
    g = randn(10, 12)
    out.backward(g)
    y, h = ref.forward(*(t.detach() for t in args), "gelu_tanh", 0.9)
    assert_close(y, out, torch.float64, "forward")
    grads = ref.backward(g, x.detach(), wd.detach(), wu.detach(), h, "gelu_tanh", 0.9, True, True, True)
    for got, t in zip(grads, args):
        assert_close(got, t.grad, torch.float64, "reference backward")


def test_opcheck():
    x, wd, bd, wu, bu = (t.detach() for t in make_args((5,), 9, 2))
    torch.library.opcheck(op.adapter_fwd, (x, wd, bd, wu, bu, "gelu", 0.5))
    torch.library.opcheck(op.adapter_fwd, (x, wd, None, wu, None, "relu", 1.0))
    h = ref.forward(x, wd, bd, wu, bu, "gelu", 0.5)[1]
    for needs in [(True, True, True), (False, False, False)]:
        torch.library.opcheck(op.adapter_bwd, (randn(5, 9), x, wd, wu, h, "gelu", 0.5, *needs))


BAD_INPUTS = [
    ("K mismatch", lambda x, wd, bd, wu, bu: (x, wd[:, :-1], bd, wu, bu), ValueError, "w_down"),
    ("r mismatch", lambda x, wd, bd, wu, bu: (x, wd, bd, wu[:, :-1], bu), ValueError, "w_up"),
    ("b_down shape", lambda x, wd, bd, wu, bu: (x, wd, bd[:-1], wu, bu), ValueError, "b_down"),
    ("b_up shape", lambda x, wd, bd, wu, bu: (x, wd, bd, wu, bu[:-1]), ValueError, "b_up"),
    ("r = 0", lambda x, wd, bd, wu, bu: (x, wd[:0], bd[:0], wu[:, :0], bu), ValueError, "r must be >= 1"),
    ("1-D w_down", lambda x, wd, bd, wu, bu: (x, wd[0], bd, wu, bu), ValueError, "w_down must be 2-D"),
    ("int dtype", lambda x, wd, bd, wu, bu: (x.int(), wd, bd, wu, bu), TypeError, "x must be float"),
    ("mixed dtype", lambda x, wd, bd, wu, bu: (x.half(), wd, bd, wu, bu), TypeError, "dtype"),
    ("mixed device", lambda x, wd, bd, wu, bu: (x, wd, bd, wu.to("meta"), bu), ValueError, "device"),
]


@pytest.mark.parametrize("what,mutate,exc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected(what, mutate, exc, text):
    args = [t.detach() for t in make_args((4,), 8, 2)]
    with pytest.raises(exc, match=text):
        lk.adapter(*mutate(*args))


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        lk.adapter(*[t.detach() for t in make_args((4,), 8, 2)], activation="tanh")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_give_zero_weight_grads(backend):
    x = randn(0, 15, requires_grad=True)
    wd, bd, wu, bu = (t.requires_grad_() for t in (randn(4, 15), randn(4), randn(15, 4), randn(15)))
    with lk.use_backend(backend):
        lk.adapter(x, wd, bd, wu, bu).sum().backward()
    for t in (wd, bd, wu, bu):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    assert x.grad.shape == (0, 15)


# ---- Triton kernel paths: bottleneck tiles, row-stripe reductions, strides ----

TRITON = [b for b in BACKENDS if b == "triton"]


@pytest.fixture
def kernels():
    return pytest.importorskip("lora_kernels.triton.adapter")


def _force(monkeypatch, kernels, dtype, max_block_r, stripe_rows):
    """max_block_r: the widest register tile of the bottleneck (None: the kernel's own);
    stripe_rows: rows per stripe of the weight-gradient reduction (None: the kernel's own rule)."""
    if max_block_r is not None:
        monkeypatch.setitem(kernels._MAX_BLOCK_R, dtype, max_block_r)
    if stripe_rows is not None:
        monkeypatch.setattr(kernels, "_row_splits",
                            lambda m, r, tiles, device: (-(-m // stripe_rows), stripe_rows))


KERNEL_CASES = [  # (max BLOCK_R, rows per stripe, leading dims, K, r, dtype, activation)
    (None, None, (37,), 129, 300, torch.float32, "gelu"),         # r = 300: 3 tiles of 128
    (None, None, (37,), 129, 300, torch.bfloat16, "gelu_tanh"),   # 2 tiles of 256
    (None, None, (3, 7), 40, 1024, torch.float16, "silu"),        # the widest r: 4 tiles of 256
    (None, None, (4, 275), 24, 3, torch.float32, "gelu"),         # M = 1100: stripes by the kernel's rule
    (16, 16, (37,), 70, 40, torch.float64, "relu"),               # 3 tiles of 16, a stripe per row block
    (16, 16, (70,), 33, 17, torch.bfloat16, "gelu"),
    (16, 32, (50,), 48, 16, torch.float16, "gelu_tanh"),          # exactly one tile, stripes of 2 blocks
    (None, 16, (1,), 129, 3, torch.float32, "silu"),              # one decode row
]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("max_block_r,stripe_rows,lead,k,r,dtype,activation", KERNEL_CASES)
def test_kernel_paths(backend, kernels, monkeypatch, max_block_r, stripe_rows, lead, k, r, dtype, activation):
    _force(monkeypatch, kernels, dtype, max_block_r, stripe_rows)
    fn = lambda *a: lk.adapter(*a, activation=activation, scale=0.7)  # noqa: E731
    with lk.use_backend(backend):
        check_against_reference(fn, lambda *a: ref.adapter(*a, activation, 0.7), make_args(lead, k, r), dtype,
                                f"max_block_r={max_block_r} stripe_rows={stripe_rows} {lead}x{k} r={r}")


@pytest.mark.parametrize("backend", TRITON)
def test_kernel_rule_splits_long_inputs(backend, kernels):
    """The M = 1100 case above really reduces over several row stripes (then sums them)."""
    assert kernels._row_splits(1100, 3, 1, torch.device("cpu"))[0] > 1
    assert kernels._row_splits(37, 3, 1, torch.device("cpu"))[0] == 1


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("frozen_biases", [False, True])
def test_kernel_striped_grads_are_deterministic(backend, kernels, monkeypatch, frozen_biases):
    """Row stripes reduce in a fixed order: two runs agree bit for bit; frozen biases and a
    transposed x (column stride 1 along M) take the same path."""
    _force(monkeypatch, kernels, torch.float32, 16, 16)
    x = randn(40, 70).T.to(torch.float32).requires_grad_()  # [70, 40] with strides (1, 70)
    wd, bd, wu, bu = (t.to(torch.float32).requires_grad_(not (frozen_biases and t.ndim == 1))
                      for t in (randn(24, 40, scale=40**-0.5), randn(24), randn(40, 24, scale=24**-0.5), randn(40)))
    g = randn(70, 40).to(torch.float32)
    grads = []
    with lk.use_backend(backend):
        for _ in range(2):
            for t in (x, wd, bd, wu, bu):
                t.grad = None
            lk.adapter(x, wd, bd, wu, bu, activation="silu", scale=1.5).backward(g)
            grads.append([None if t.grad is None else t.grad.clone() for t in (x, wd, bd, wu, bu)])
    xr, wdr, bdr, wur, bur = (t.detach().double().requires_grad_() for t in (x, wd, bd, wu, bu))
    ref.adapter(xr, wdr, bdr, wur, bur, "silu", 1.5).backward(g.double())
    for i, (first, second, want) in enumerate(zip(grads[0], grads[1], (xr, wdr, bdr, wur, bur))):
        if frozen_biases and i in (2, 4):
            assert first is None and second is None
            continue
        assert torch.equal(first, second), f"argument {i} differs between runs"
        assert_close(first, want.grad, torch.float32, f"argument {i}")
