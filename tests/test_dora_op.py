"""dora_linear against the float64 reference (PEFT's DoRA math), on every backend that can run here."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import dora as op
from lora_kernels.reference import dora as ref
from lora_kernels.reference.lora import dropout_mask

from conftest import DEVICE, DTYPES, assert_close, backends_for, check_against_reference, randn

BACKENDS = backends_for(op.IMPLS)
SHAPES = [  # (leading dims, K, N, r): ragged M/N/K, r in {1, 8, 64}
    ((1,), 16, 8, 1),
    ((37,), 129, 33, 8),
    ((2, 5), 40, 70, 64),
    ((3, 1, 7), 24, 130, 1),
]


def make_args(lead, k, n, r, bias=True, grad_base=False):
    w = randn(n, k, requires_grad=grad_base, scale=k**-0.5)
    # magnitude near the row norms (as PEFT initialises it) but not equal, so c ≠ 1 is exercised
    mag = (w.detach().norm(dim=1) * (1.0 + 0.3 * torch.rand(n, device=DEVICE, dtype=torch.float64)))
    return [randn(*lead, k, requires_grad=True), w,
            randn(n, requires_grad=grad_base) if bias else None,
            randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(n, r, requires_grad=True, scale=r**-0.5),
            mag.requires_grad_()]


def _seed_of(manual_seed):
    """The dropout seed ops/lora._seed draws right after torch.manual_seed(manual_seed)."""
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def test_reference_norm_equals_explicit_norm():
    """The low-rank formula against ‖W0 + s·BA‖ taken on the materialised matrix (what PEFT does)."""
    _, w, _, a, b, _ = (t.detach() for t in make_args((1,), 129, 33, 8))
    for s in (0.0, 0.5, 2.0):
        explicit = torch.linalg.norm(w + s * b @ a, dim=1)
        assert_close(ref.row_norm(w, a, b, s), explicit, torch.float64, f"norm s={s}")
        assert_close(ref.row_norm(w, a, b, s, w_sq=ref.weight_sq_norm(w)), explicit, torch.float64, "cached ‖W0‖²")


def test_reference_equals_peft_formula():
    """PEFT's formula, spelled out: W0x + b + (m/‖W0+sBA‖ − 1)·W0x' + (m/‖·‖)·s·BAx'."""
    x, w, bias, a, b, m = (t.detach() for t in make_args((13,), 21, 11, 5))
    p, s = 0.3, 0.7
    mask = dropout_mask(x.shape, p, 5, x.device)
    xd = x * mask / (1 - p)
    c = m / torch.linalg.norm(w + s * b @ a, dim=1)
    want = x @ w.T + bias + (c - 1) * (xd @ w.T) + c * s * (xd @ a.T @ b.T)
    assert_close(ref.dora_linear(x, w, bias, a, b, m, s, mask=mask, dropout_p=p), want, torch.float64, "dropout")
    assert_close(ref.dora_linear(x, w, bias, a, b, m, s), c * (x @ (w + s * b @ a).T) + bias, torch.float64, "merged")


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_reference_backward_matches_autograd(p):
    x, w, b, a, bb, m = make_args((10,), 12, 9, 3, grad_base=True)
    seed, s = 1234, 0.8
    d = [t.detach() for t in (x, w, b, a, bb, m)]
    y, u, c, rn, z = ref.forward(*d, None, s, p, seed, True)
    out = ref.dora_linear(x, w, b, a, bb, m, s, mask=dropout_mask(x.shape, p, seed, x.device), dropout_p=p)
    assert_close(y, out, torch.float64, "forward")
    g = randn(10, 9)
    out.backward(g)
    grads = ref.backward(g, d[0], d[1], d[3], d[4], u, c, rn, z, s, p, seed, True, True, True, True)
    for got, t in zip(grads, (x, a, bb, m, w, b)):
        assert_close(got, t.grad, torch.float64, "reference backward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r", SHAPES)
def test_forward_and_grads(backend, dtype, lead, k, n, r):
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.dora_linear(*a, scaling=0.75), lambda *a: ref.dora_linear(*a, 0.75),
                                make_args(lead, k, n, r), dtype, f"{backend} {lead}x{k}->{n} r={r}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_weight_grads_when_required(backend, bias):
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.dora_linear(*a, scaling=2.0), lambda *a: ref.dora_linear(*a, 2.0),
                                make_args((19,), 33, 17, 4, bias=bias, grad_base=True), torch.float64, "dW/db")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_fp64(backend, p):
    """gradcheck over x, bias and magnitude: W0, A and B also move the norm, which the op holds
    constant (detached, as DoRA §4.3), so finite differences in them cannot agree by design; their
    gradients are checked against the reference's autograd above."""
    x, w, b, a, bb, m = make_args((4,), 6, 5, 3, grad_base=True)
    w, a, bb = w.detach(), a.detach(), bb.detach()

    def fn(x, b, m):
        torch.manual_seed(0)
        return lk.dora_linear(x, w, b, a, bb, m, scaling=1.5, dropout_p=p)
    with lk.use_backend(backend):  # fast mode (random projections) in the slow interpreter
        assert torch.autograd.gradcheck(fn, (x, b, m), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_dropout_matches_reference_with_the_same_mask(backend, dtype):
    """Forward and every gradient with dropout equal the reference's with the mask of the drawn seed."""
    p, s = 0.3, 0.5
    args = make_args((37,), 24, 20, 4, grad_base=True)
    mask = dropout_mask((37, 24), p, _seed_of(7), DEVICE)

    def fn(*t):
        torch.manual_seed(7)
        return lk.dora_linear(*t, scaling=s, dropout_p=p)
    with lk.use_backend(backend):
        check_against_reference(fn, lambda *t: ref.dora_linear(*t, s, mask=mask, dropout_p=p), args, dtype, "dropout")
        eval_out = lk.dora_linear(*[t.detach() for t in args], s, dropout_p=0.5, training=False)
    assert_close(eval_out, ref.dora_linear(*[t.detach() for t in args], s), torch.float64, "eval ignores dropout")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_without_bias_y_stands_for_z(backend, dtype):
    """No bias, no dropout: d magnitude comes from the output y = c⊙z (no M×N tensor saved)."""
    args = make_args((2, 19), 33, 40, 8, bias=False)
    with lk.use_backend(backend):
        check_against_reference(lambda *t: lk.dora_linear(*t, scaling=0.75), lambda *t: ref.dora_linear(*t, 0.75),
                                args, dtype, "no bias")
        x, w, a, bb, m = (t.detach() for t in args if t is not None)
        outs = op.dora_linear_fwd(x.reshape(-1, 33), w, None, a, bb, m, None, 0.75, 0.0, torch.tensor(0), False)
    assert outs[4].numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    x = randn(12, 40)[:, ::2].requires_grad_()
    w = randn(20, 18).T                                     # [18, 20] transposed view (GPT-2 Conv1D)
    a, bb = randn(20, 3).T.requires_grad_(), randn(3, 18).T.requires_grad_()
    b, m = randn(36)[::2], (randn(36)[::2].abs() + 1).requires_grad_()
    with lk.use_backend(backend):
        check_against_reference(lambda *t: lk.dora_linear(*t, scaling=0.5), lambda *t: ref.dora_linear(*t, 0.5),
                                [x, w, b, a, bb, m], torch.float64, "non-contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_weight_norm_and_frozen_magnitude(backend):
    x, w, b, a, bb, m = make_args((9,), 20, 12, 2)
    m.requires_grad_(False)
    w_sq = ref.weight_sq_norm(w)
    with lk.use_backend(backend):
        y = op.dora_linear_cached(x, w, b, a, bb, m, 0.5, weight_sq_norm=w_sq)
        y.sum().backward()
    assert_close(y, ref.dora_linear(x, w, b, a, bb, m, 0.5), torch.float64, "cached ‖W0‖²")
    assert m.grad is None and a.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, a, bb, m = make_args((0,), 16, 8, 2)
    with lk.use_backend(backend):
        y = lk.dora_linear(x, w, b, a, bb, m, 1.0)
        y.sum().backward()
    assert y.shape == (0, 8)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(m.grad, torch.zeros_like(m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b, a, bb, m = (t.detach() for t in make_args((5,), 9, 7, 2))
    seed = torch.tensor(11)
    with lk.use_backend(backend):
        torch.library.opcheck(op.dora_linear_fwd, (x, w, b, a, bb, m, None, 0.5, 0.25, seed, True))
        torch.library.opcheck(op.dora_linear_fwd, (x, w, None, a, bb, m, ref.weight_sq_norm(w), 0.5, 0.0, seed, False))
        _, u, c, rn, z = op.dora_linear_fwd(x, w, b, a, bb, m, None, 0.5, 0.25, seed, True)
        g = randn(5, 7)
        for needs in [(True, True, True, True, False), (False, False, False, False, False)]:
            torch.library.opcheck(op.dora_linear_bwd, (g, x, w, a, bb, u, c, rn, z, 0.5, 0.25, seed, *needs))
        y = op.dora_linear_fwd(x, w, None, a, bb, m, None, 0.5, 0.0, seed, False)[0]
        torch.library.opcheck(op.dora_linear_bwd, (g, x, w, a, bb, u, c, rn, y, 0.5, 0.0, seed, True, True, True,
                                                   True, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_compile_fullgraph(backend, bias):
    """Through the custom ops, with z saved (bias) or y standing for it (no bias)."""
    args = make_args((2, 3), 16, 12, 4, bias=bias)
    fn = lambda *t: lk.dora_linear(*t, scaling=0.5)  # noqa: E731
    with lk.use_backend(backend):
        check_against_reference(torch.compile(fn, backend="aot_eager", fullgraph=True),
                                lambda *t: ref.dora_linear(*t, 0.5), args, torch.float64, "compiled")


BAD_INPUTS = [  # (description, mutate(args) -> args, exception, text in message)
    ("K mismatch", lambda x, w, b, a, bb, m: (x, w[:, :-1], b, a, bb, m), ValueError, "weight"),
    ("r mismatch", lambda x, w, b, a, bb, m: (x, w, b, a, bb[:, :-1], m), ValueError, "lora_B"),
    ("r = 0", lambda x, w, b, a, bb, m: (x, w, b, a[:0], bb[:, :0], m), ValueError, "r must be >= 1"),
    ("magnitude shape", lambda x, w, b, a, bb, m: (x, w, b, a, bb, m[:-1]), ValueError, "magnitude"),
    ("magnitude 2-D", lambda x, w, b, a, bb, m: (x, w, b, a, bb, m[None]), ValueError, "magnitude must be 1-D"),
    ("magnitude dtype", lambda x, w, b, a, bb, m: (x, w, b, a, bb, m.float()), TypeError, "magnitude"),
    ("not a tensor", lambda x, w, b, a, bb, m: (x, w, b, a, bb, m.tolist()), TypeError, "magnitude must be a torch"),
]


@pytest.mark.parametrize("what,mutate,exc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected(what, mutate, exc, text):
    args = [t.detach() for t in make_args((4,), 8, 6, 2)]
    with pytest.raises(exc, match=text):
        lk.dora_linear(*mutate(*args), 1.0)


def test_bad_cached_norm_is_rejected():
    x, w, b, a, bb, m = (t.detach() for t in make_args((4,), 8, 6, 2))
    with pytest.raises(ValueError, match="weight_sq_norm"):
        op.dora_linear_cached(x, w, b, a, bb, m, 1.0, weight_sq_norm=torch.ones(5, dtype=torch.float64, device=DEVICE))


# The torch reference computes half inputs on an fp32 copy of W0 (for its GEMMs, not the norm): fp32 only there.
@pytest.mark.parametrize("backend,dtype", [(b, d) for b in BACKENDS for d in (torch.float32, torch.bfloat16)
                                           if b != "torch" or d == torch.float32], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_out_by_in_temporary(backend, dtype, p):
    """Forward and backward allocate nothing of W0's size (PEFT builds W0 + s·BA, N×K, every step)."""
    if DEVICE.type != "cpu":
        pytest.skip("counts CPU allocations with the profiler")
    from torch.profiler import ProfilerActivity, profile
    x, w, b, a, bb, m = (t.detach().to(dtype) for t in make_args((4,), 256, 192, 8))
    for t in (x, a, bb, m):
        t.requires_grad_()
    with lk.use_backend(backend), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lk.dora_linear(x, w, b, a, bb, m, 0.5, dropout_p=p).sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < w.numel() * w.element_size() // 4, f"an allocation of {largest} B"


# ---- Triton kernel paths: u fused or from torch (r > 64), dropout's two base products, r limit ----

TRITON = [b for b in BACKENDS if b == "triton"]
KERNEL_CASES = [  # (leading dims, K, N, r, dtype, dropout_p, u fused in the GEMM)
    ((37,), 70, 33, 80, torch.float32, 0.0, False),    # r > 64: u computed before the GEMM
    ((2, 20), 33, 40, 100, torch.bfloat16, 0.2, False),
    ((37,), 70, 33, 5, torch.float16, 0.3, True),      # fused u from drop(x), two accumulators
    ((37,), 70, 33, 5, torch.float16, 0.3, False),
    ((1,), 129, 70, 16, torch.float64, 0.5, True),
    ((40,), 33, 70, 16, torch.bfloat16, 0.0, False),
]


@pytest.fixture
def kernels():
    return pytest.importorskip("lora_kernels.triton.dora")


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("lead,k,n,r,dtype,p,fused", KERNEL_CASES, ids=str)
def test_kernel_paths(backend, kernels, monkeypatch, lead, k, n, r, dtype, p, fused):
    monkeypatch.setattr(kernels, "_fuse_u", lambda M, N, K, r, esize: fused and r <= 64)
    m = 1
    for d in lead:
        m *= d
    mask = dropout_mask((m, k), p, _seed_of(3), DEVICE) if p else None

    def fn(*t):
        torch.manual_seed(3)
        return lk.dora_linear(*t, scaling=0.75, dropout_p=p)
    def ref_fn(x, *t):
        return ref.dora_linear(x.reshape(m, k), *t, 0.75, mask=mask, dropout_p=p).reshape(*lead, n)
    with lk.use_backend(backend):
        check_against_reference(fn, ref_fn, make_args(lead, k, n, r, grad_base=p > 0), dtype, f"r={r} p={p}")


@pytest.mark.parametrize("backend", TRITON)
def test_kernel_rank_limit_is_explained(backend):
    args = [t.detach() for t in make_args((3,), 16, 8, 130)]
    with lk.use_backend(backend), pytest.raises(lk.BackendUnavailable, match="ranks up to 128"):
        lk.dora_linear(*args, 1.0)


def test_public_signature():
    import inspect
    assert str(inspect.signature(lk.dora_linear)) == (
        "(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=True)")
    assert "dora_linear" in lk.__all__


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_like_f_linear(backend):
    """Under autocast every tensor goes to the autocast dtype (as F.linear's); gradients come back
    in each input's own dtype (fp32 here)."""
    x, w, b, a, bb, m = (t.detach().float() for t in make_args((2, 5), 24, 16, 4))
    for t in (x, a, bb, m):
        t.requires_grad_()
    with lk.use_backend(backend), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = lk.dora_linear(x, w, b, a, bb, m, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (x, a, bb, m))
    assert_close(y, ref.dora_linear(*(t.detach().double() for t in (x, w, b, a, bb, m)), 0.5),
                 torch.bfloat16, "autocast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_magnitude_entry_is_loud_without_bias(backend):
    """The documented limit of the y-for-z saving: an entry of m exactly 0 gets a NaN gradient
    (never a plausible wrong number); with a bias z is saved and the gradient is exact."""
    x, w, b, a, bb, m = make_args((6,), 12, 5, 2)
    with torch.no_grad():
        m[1] = 0.0
    with lk.use_backend(backend):
        lk.dora_linear(x, w, None, a, bb, m, 0.5).sum().backward()
        assert torch.isnan(m.grad[1]) and torch.isfinite(m.grad[[0, 2, 3, 4]]).all()
        m.grad = None
        lk.dora_linear(x, w, b, a, bb, m, 0.5).sum().backward()
    want = m.detach().clone().requires_grad_()
    ref.dora_linear(x.detach(), w, b, a.detach(), bb.detach(), want, 0.5).sum().backward()
    assert_close(m.grad, want.grad, torch.float64, "d magnitude with a zero entry, bias")
