"""lora_linear_multi (many adapters in one batch) against float64 math and against separate
single-adapter lora_linear runs, on every backend that can run here."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import _direct, lora_multi as op
from lora_kernels.reference import lora_multi as ref

from conftest import DEVICE, DTYPES, TOLERANCE, assert_close, backends_for, check_against_reference, randn, rel_err

BACKENDS = backends_for(op.IMPLS)
F64 = torch.float64


def adapters(n, k, n_out, ranks, alphas=None):
    """n adapters of the given ranks zero-padded to r = max(ranks): (lora_A [n, r, K] and
    lora_B [n, N, r] requiring grad, scalings α_i/r_i)."""
    r = max(ranks)
    A, B = torch.zeros(n, r, k, dtype=F64, device=DEVICE), torch.zeros(n, n_out, r, dtype=F64, device=DEVICE)
    for i, ri in enumerate(ranks):
        A[i, :ri] = randn(ri, k, scale=k ** -0.5)
        B[i, :, :ri] = randn(n_out, ri, scale=ri ** -0.5)
    alphas = alphas or [2.0 * ri + i for i, ri in enumerate(ranks)]
    scalings = torch.tensor([a / ri for a, ri in zip(alphas, ranks)], dtype=F64, device=DEVICE)
    return A.requires_grad_(), B.requires_grad_(), scalings


def ids_for(pattern, m, n):
    if pattern == "mixed":  # every adapter and the base, in random order
        return torch.randint(-1, n, (m,), device=DEVICE)
    if pattern == "one":
        return torch.full((m,), n - 1, device=DEVICE)
    if pattern == "base":
        return torch.full((m,), -1, device=DEVICE)
    if pattern == "runs":  # sorted segments, int32, as a server batching by adapter would send
        return (torch.arange(m, device=DEVICE) * n // max(m, 1)).to(torch.int32)
    raise ValueError(pattern)


CASES = [  # (leading dims, K, N, ranks of the n adapters, row pattern)
    ((1,), 16, 8, (3,), "one"),
    ((37,), 33, 20, (1, 4, 2), "mixed"),
    ((2, 20), 40, 33, (8, 2, 5, 1, 3, 8, 4, 6), "mixed"),
    ((13,), 24, 17, (4, 2, 6), "base"),
    ((19,), 20, 36, (2, 5, 3), "runs"),
]


def make_case(lead, k, n_out, ranks, pattern):
    x = randn(*lead, k, requires_grad=True)
    w, b = randn(n_out, k, scale=k ** -0.5), randn(n_out)
    A, B, s = adapters(len(ranks), k, n_out, ranks)
    m = 1
    for d in lead:
        m *= d
    return [x, w, b, A, B], s, ids_for(pattern, m, len(ranks)).reshape(lead)


def _ref(s, ids, mask=None, p=0.0):
    def fn(x, w, b, A, B):
        k = x.shape[-1]
        y = ref.lora_linear_multi(x.reshape(-1, k), w, b, A, B, s, ids.reshape(-1), mask=mask, dropout_p=p)
        # + 0·ΣA·ΣB: adapters without rows get a zero gradient, as from the op, instead of None
        return y.reshape(*x.shape[:-1], w.shape[0]) + 0.0 * (A.sum() + B.sum())
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n_out,ranks,pattern", CASES, ids=str)
def test_forward_and_grads(backend, dtype, lead, k, n_out, ranks, pattern):
    args, s, ids = make_case(lead, k, n_out, ranks, pattern)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.lora_linear_multi(*a, s, ids), _ref(s, ids), args, dtype,
                                f"{backend} {lead}x{k}->{n_out} ranks={ranks} {pattern}")


def _single_adapter_runs(x, w, b, A, B, s, ids, ranks, g, p, seed):
    """For each adapter i: lora_linear on the whole x with (A_i, B_i, s_i) unpadded, the same
    dropout seed, and the output gradient of adapter i's rows only. Returns, per adapter,
    (its rows, y, dx, dA_i, dB_i)."""
    out = []
    for i, ri in enumerate(ranks):
        rows = (ids == i).nonzero().squeeze(1)
        xi = x.detach().clone().requires_grad_()
        ai, bi = A.detach()[i, :ri].clone().requires_grad_(), B.detach()[i, :, :ri].clone().requires_grad_()
        torch.manual_seed(seed)
        y = lk.lora_linear(xi, w, b, ai, bi, float(s[i]), dropout_p=p)
        gi = torch.zeros_like(g)
        gi[rows] = g[rows]
        y.backward(gi)
        out.append((rows, y.detach(), xi.grad, ai.grad, bi.grad))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_each_adapter_gets_what_it_would_get_alone(backend, p):
    """Row m of the mixed batch equals row m of a single-adapter lora_linear with the same seed;
    each adapter's dA/dB equal that run's (padding: exactly zero); base rows get x Wᵀ + b and gW."""
    ranks, m, k, n_out = (3, 1, 5), 29, 36, 20
    x = randn(m, k, requires_grad=True)
    w, b = randn(n_out, k, scale=k ** -0.5), randn(n_out)
    A, B, s = adapters(3, k, n_out, ranks)
    ids = ids_for("mixed", m, 3)
    g = randn(m, n_out)
    with lk.use_backend(backend):
        torch.manual_seed(11)
        y = lk.lora_linear_multi(x, w, b, A, B, s, ids, dropout_p=p)
        y.backward(g)
        alone = _single_adapter_runs(x, w, b, A, B, s, ids, ranks, g, p, seed=11)
    for i, (rows, yi, dxi, dai, dbi) in enumerate(alone):
        assert rows.numel() > 0
        assert_close(y[rows], yi[rows], F64, f"adapter {i} rows")
        assert_close(x.grad[rows], dxi[rows], F64, f"adapter {i} dx")
        assert_close(A.grad[i, :ranks[i]], dai, F64, f"dA_{i}")
        assert_close(B.grad[i, :, :ranks[i]], dbi, F64, f"dB_{i}")
        assert torch.all(A.grad[i, ranks[i]:] == 0) and torch.all(B.grad[i, :, ranks[i]:] == 0), "padding"
    base = (ids == -1).nonzero().squeeze(1)
    assert base.numel() > 0
    assert_close(y[base], x.detach()[base] @ w.T + b, F64, "base rows")
    assert_close(x.grad[base], g[base] @ w, F64, "base rows dx")
    if p:
        assert not torch.allclose(y, lk.lora_linear_multi(x, w, b, A, B, s, ids)), "dropout had no effect"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_the_reference_mask(backend):
    """The same seed gives the reference's mask on the torch backend (the spec's generator)
    and the mask lora_linear's kernels draw on the others (checked above); here: gradients
    against the float64 spec with the mask revealed through A_i = B_i = I."""
    m, k, n, p = 21, 12, 3, 0.4
    x = randn(m, k, requires_grad=True)
    w, b = randn(k, k, scale=k ** -0.5), randn(k)
    eye = torch.eye(k, dtype=F64, device=DEVICE)
    A, B = eye.repeat(n, 1, 1).requires_grad_(), eye.repeat(n, 1, 1).requires_grad_()
    s = torch.tensor([0.5, 1.5, 2.0], dtype=F64, device=DEVICE)
    ids = ids_for("runs", m, n)
    with lk.use_backend(backend):
        y = lk.lora_linear_multi(x, w, b, A, B, s, ids, dropout_p=p)
    dropped = (y - x @ w.T - b).detach() / s[ids.long()][:, None]
    mask = (dropped - x.detach() / (1 - p)).abs() < (dropped.abs() + x.detach().abs()) * 1e-6
    assert_close(dropped, x.detach() * mask / (1 - p), F64, "dropped x")
    assert 0.4 < mask.double().mean().item() < 0.8
    g = randn(m, k)
    y.backward(g)
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    ref.lora_linear_multi(xr, w, b, ar, br, s, ids, mask=mask, dropout_p=p).backward(g)
    for got, want, name in ((x.grad, xr.grad, "dx"), (A.grad, ar.grad, "dA"), (B.grad, br.grad, "dB")):
        assert_close(got, want, F64, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_and_off_in_eval(backend):
    args, s, ids = make_case((8,), 16, 12, (4, 2), "mixed")
    args = [a.detach() for a in args]
    with lk.use_backend(backend):
        run = lambda seed: (torch.manual_seed(seed), lk.lora_linear_multi(*args, s, ids, dropout_p=0.5))[1]  # noqa: E731
        assert torch.equal(run(1), run(1))
        assert not torch.equal(run(1), run(2))
        eval_out = lk.lora_linear_multi(*args, s, ids, dropout_p=0.5, training=False)
    assert_close(eval_out, _ref(s, ids)(*args), F64, "eval mode ignores dropout")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_fp64(backend, p):
    x, w, b, A, B = make_case((6,), 5, 4, (2, 1), "mixed")[0]
    s = torch.tensor([1.5, -0.5], dtype=F64, device=DEVICE)
    ids = torch.tensor([1, -1, 0, 1, 0, 0], device=DEVICE)
    w.requires_grad_(), b.requires_grad_()

    def fn(*t):
        torch.manual_seed(0)
        return lk.lora_linear_multi(*t, s, ids, dropout_p=p)
    with lk.use_backend(backend):
        # fast mode (a random projection of the Jacobian) on Triton: its interpreter is slow
        assert torch.autograd.gradcheck(fn, (x, w, b, A, B), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_per_sample_ids(backend):
    """Strided views everywhere; ids [B] for x [B, T, K] mean one adapter per sample."""
    x = randn(3, 5, 40)[:, :, ::2].requires_grad_()
    w = randn(20, 16).T
    A = randn(3, 20, 2).transpose(1, 2).requires_grad_()
    B = randn(3, 2, 16).transpose(1, 2).requires_grad_()
    b = randn(32)[::2]
    s = torch.tensor([0.5, 1.0, 2.0], dtype=F64, device=DEVICE)
    ids = torch.tensor([2, -1, 0], device=DEVICE)
    with lk.use_backend(backend):
        check_against_reference(lambda *t: lk.lora_linear_multi(*t, s, ids), _ref(s, ids[:, None].expand(3, 5)),
                                [x, w, b, A, B], F64, "non-contiguous, ids per sample")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dx_when_x_is_frozen(backend):
    (x, w, b, A, B), s, ids = make_case((9,), 20, 12, (2, 3), "mixed")
    x.requires_grad_(False)
    with lk.use_backend(backend):
        lk.lora_linear_multi(x, w, b, A, B, s, ids).sum().backward()
    assert x.grad is None and w.grad is None and b.grad is None
    assert A.grad is not None and B.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, A, B = make_case((0,), 16, 8, (2, 3), "mixed")[0]
    with lk.use_backend(backend):
        y = lk.lora_linear_multi(x, w, b, A, B, [1.0, 2.0], torch.zeros(0, dtype=torch.long, device=DEVICE))
        y.sum().backward()
    assert y.shape == (0, 8)
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))


def test_public_signature():
    """DESIGN.md's contract: the name, its parameters and defaults."""
    import inspect
    assert "lora_linear_multi" in lk.__all__
    assert str(inspect.signature(lk.lora_linear_multi)) == (
        "(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, dropout_p=0.0, training=True)")


def test_scalings_as_a_list_and_in_any_float_dtype():
    args, s, ids = make_case((9,), 12, 7, (2, 3), "mixed")
    args = [a.detach() for a in args]
    want = lk.lora_linear_multi(*args, s, ids)
    assert torch.equal(lk.lora_linear_multi(*args, s.tolist(), ids), want)
    assert_close(lk.lora_linear_multi(*args, s.float(), ids), want, torch.float32, "fp32 scalings")


def test_opcheck():
    (x, w, b, A, B), s, ids = make_case((7,), 9, 6, (2, 3), "mixed")
    x, A, B = x.detach(), A.detach(), B.detach()
    seed = torch.tensor(11)
    for backend in BACKENDS:
        with lk.use_backend(backend):
            torch.library.opcheck(op.lora_multi_fwd, (x, w, b, A, B, s, ids, 0.25, seed))
            torch.library.opcheck(op.lora_multi_fwd, (x, w, None, A, B, s, ids, 0.0, seed))
            u = op.lora_multi_fwd(x, w, b, A, B, s, ids, 0.25, seed)[1]
            g = randn(7, 6)
            for needs in [(True, True, True), (False, False, False)]:
                torch.library.opcheck(op.lora_multi_bwd, (g, x, w, A, B, u, s, ids, 0.25, seed, *needs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    (x, w, b, A, B), s, ids = make_case((2, 5), 12, 10, (3, 1, 2), "mixed")
    torch._dynamo.reset()
    fn = lambda *t: lk.lora_linear_multi(*t, s, ids, dropout_p=0.2)  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    with lk.use_backend(backend):
        for f in (compiled, fn):
            for t in (x, A, B):
                t.grad = None
            torch.manual_seed(3)
            y = f(x, w, b, A, B)
            y.backward(torch.ones_like(y))
            results.append([y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()])
    torch._dynamo.reset()
    for c, e in zip(*results):
        assert_close(c, e, F64, "compiled vs eager")


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_calls_match_the_custom_op(monkeypatch, backend):
    """Plain eager calls skip the dispatcher (ops/_direct.py) and give bitwise what the custom op gives."""
    args, s, ids = make_case((6,), 10, 8, (2, 3), "mixed")

    def run():
        for a in args[::3] + args[4:]:
            a.grad = None
        y = lk.lora_linear_multi(*args, s, ids)
        y.backward(torch.ones_like(y))
        with torch.no_grad():
            y0 = lk.lora_linear_multi(*args, s, ids)
        return [y.detach(), y0, args[0].grad.clone(), args[3].grad.clone(), args[4].grad.clone()]
    with lk.use_backend(backend):
        direct = run()
        with monkeypatch.context() as patch:
            patch.setattr(_direct, "plain", lambda *t: False)
            through_op = run()
    for d, o in zip(direct, through_op):
        assert torch.equal(d, o)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_like_f_linear(backend):
    """Under autocast x and the weights run in the autocast dtype (scalings stay as given); the
    output has that dtype and each gradient its input's dtype."""
    low = torch.bfloat16
    (x, w, b, A, B), s, ids = make_case((11,), 24, 16, (4, 2), "mixed")
    x32, A32, B32 = (t.detach().float().requires_grad_() for t in (x, A, B))
    with lk.use_backend(backend), torch.autocast(DEVICE.type, dtype=low):
        y = lk.lora_linear_multi(x32, w.float(), b.float(), A32, B32, s, ids)
        y.backward(torch.ones_like(y))
    expected = _ref(s, ids)(x, w, b, A, B)
    expected.backward(torch.ones_like(expected))
    assert y.dtype == low and x32.grad.dtype == A32.grad.dtype == torch.float32
    assert rel_err(y, expected) <= TOLERANCE[low]
    for got, want in ((x32.grad, x.grad), (A32.grad, A.grad), (B32.grad, B.grad)):
        assert rel_err(got, want) <= TOLERANCE[low]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_no_less_accurate_than_eager_pytorch(backend, dtype):
    """tests/test_precision.py's rule: in fp16/bf16 within 2x (4x for bf16 under the
    interpreter, which truncates) of the error of eager PyTorch's mixed-batch loop (PEFT's)
    in the same dtype, against float64."""
    from lora_kernels.backend import interpreting
    args, s, ids = make_case((67,), 512, 96, (16, 8, 12), "mixed")
    low = [a.detach().to(dtype).requires_grad_(a.requires_grad) for a in args]
    exact = [a.detach().double().requires_grad_(a.requires_grad) for a in low]

    def eager(x, w, b, A, B):
        y = torch.nn.functional.linear(x, w, b)
        for i in range(A.shape[0]):
            rows = (ids == i).nonzero().squeeze(1)
            y[rows] += torch.nn.functional.linear(torch.nn.functional.linear(x[rows], A[i]), B[i]) * float(s[i])
        return y

    def run(fn, tensors):
        tensors = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        out = fn(*tensors)
        out.backward(grad.to(out.dtype))
        return [out] + [t.grad for t in tensors if t.requires_grad]
    grad = randn(67, 96)
    expected, baseline = run(_ref(s, ids), exact), run(eager, low)
    with lk.use_backend(backend):
        got = run(lambda *t: lk.lora_linear_multi(*t, s, ids), low)
    factor = 4 if dtype == torch.bfloat16 and backend == "triton" and interpreting() else 2
    floor = {torch.float16: 2.0**-12, torch.bfloat16: 2.0**-9}[dtype]
    for name, g, b, e in zip(["output", "dx", "dA", "dB"], got, baseline, expected):
        bound = max(factor * rel_err(b, e), floor)
        assert rel_err(g, e) <= bound, f"{name}: {rel_err(g, e):.2e} > {bound:.2e} (eager {rel_err(b, e):.2e})"


def _bad(what):
    (x, w, b, A, B), s, ids = make_case((4,), 8, 6, (2, 2), "mixed")
    x, A, B = x.detach(), A.detach(), B.detach()
    args = dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B, scalings=s, adapter_ids=ids)
    args.update(what(**args))
    return args


BAD_INPUTS = [  # (description, replaced arguments, exception, text in message)
    ("id too large", lambda **a: dict(adapter_ids=torch.tensor([0, 2, 1, -1])), ValueError,
     r"adapter_ids must be in \[-1, n\)"),
    ("id below -1", lambda **a: dict(adapter_ids=torch.tensor([0, -2, 1, -1])), ValueError, "adapter_ids must be in"),
    ("float ids", lambda **a: dict(adapter_ids=a["adapter_ids"].float()), TypeError, "adapter_ids must be an int32"),
    ("ids shape", lambda **a: dict(adapter_ids=a["adapter_ids"][:3]), ValueError, "adapter_ids must have the shape"),
    ("ids not a tensor", lambda **a: dict(adapter_ids=[0, 1, 0, 1]), TypeError, "adapter_ids must be"),
    ("scalings length", lambda **a: dict(scalings=a["scalings"][:1]), ValueError, r"scalings must have shape \[n\]"),
    ("scalings int", lambda **a: dict(scalings=torch.ones(2, dtype=torch.long)), TypeError,
     "scalings must be a floating"),
    ("scalings grad", lambda **a: dict(scalings=a["scalings"].clone().requires_grad_()), ValueError,
     "must not require grad"),
    ("scalings nan", lambda **a: dict(scalings=[1.0, float("nan")]), ValueError, "scalings must be finite"),
    ("2-D lora_A", lambda **a: dict(lora_A=a["lora_A"][0]), ValueError, "lora_A must be 3-D"),
    ("A width", lambda **a: dict(lora_A=a["lora_A"][..., :-1]), ValueError, "lora_A"),
    ("B adapters", lambda **a: dict(lora_B=a["lora_B"][:1]), ValueError, r"lora_B must have shape \[n, N, r\]"),
    ("B rank", lambda **a: dict(lora_B=a["lora_B"][..., :1]), ValueError, "lora_B"),
    ("no adapters", lambda **a: dict(lora_A=a["lora_A"][:0], lora_B=a["lora_B"][:0], scalings=a["scalings"][:0]),
     ValueError, "n >= 1"),
    ("K mismatch", lambda **a: dict(weight=a["weight"][:, :-1]), ValueError, "weight"),
    ("mixed dtype", lambda **a: dict(lora_B=a["lora_B"].float()), TypeError, "dtype"),
]


@pytest.mark.parametrize("what,replace,exc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected(what, replace, exc, text):
    args = _bad(replace)
    with pytest.raises(exc, match=text):
        lk.lora_linear_multi(**args)


# ---- Triton kernel paths: decode and segment down projections, split reductions, rank chunks ----

TRITON = [b for b in BACKENDS if b == "triton"]


@pytest.fixture
def kernels():
    return pytest.importorskip("lora_kernels.triton.lora_multi")


KERNEL_CASES = [  # (decode path up to M rows, target programs, M, K, N, ranks, pattern, dtype)
    (16, 10**6, 5, 70, 40, (3, 1, 2), "mixed", torch.float32),     # decode rows, K chunks
    (0, 10**6, 5, 70, 40, (3, 1, 2), "mixed", torch.float32),      # the same rows by segments
    (0, 1, 37, 40, 33, (2, 4, 3, 1), "mixed", torch.float16),      # segment tiles, no splits
    (0, 10**6, 40, 33, 20, (80, 3), "runs", F64),                  # r > 64: rank chunks everywhere
    (64, 10**6, 40, 33, 20, (80, 3), "mixed", torch.bfloat16),     # decode kernel with rank chunks
]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("decode_m,splits,m,k,n_out,ranks,pattern,dtype", KERNEL_CASES, ids=str)
def test_kernel_paths(backend, kernels, monkeypatch, decode_m, splits, m, k, n_out, ranks, pattern, dtype):
    monkeypatch.setattr(kernels, "_DECODE_M", decode_m)
    monkeypatch.setattr(kernels, "_target_programs", lambda device: splits)
    args, s, ids = make_case((m,), k, n_out, ranks, pattern)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.lora_linear_multi(*a, s, ids), _ref(s, ids), args, dtype,
                                f"decode<={decode_m} splits={splits}")


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("decode_m", [0, 64])
def test_kernel_mask_equals_lora_linear_kernels(backend, kernels, monkeypatch, decode_m):
    """Both down projections, 32- and 64-bit Philox counters: the mask of triton/lora.py."""
    monkeypatch.setattr(kernels, "_DECODE_M", decode_m)
    (x, w, b, A, B), s, _ = make_case((37,), 44, 20, (6,), "one")
    x, A, B = x.detach(), A.detach(), B.detach()
    torch.manual_seed(3)
    with lk.use_backend(backend):
        single = lk.lora_linear(x, w, b, A[0], B[0], float(s[0]), dropout_p=0.5)
        for wide in (False, True):
            monkeypatch.setattr(kernels, "_wide_counters", lambda m, k: wide)
            torch.manual_seed(3)
            multi = lk.lora_linear_multi(x, w, b, A, B, s, ids_for("one", 37, 1), dropout_p=0.5)
            assert_close(multi, single, F64, f"wide={wide}")
    assert not torch.allclose(single, _ref(s, ids_for("one", 37, 1))(x, w, b, A, B)), "dropout had no effect"


@pytest.mark.parametrize("backend", TRITON)
def test_kernel_results_are_deterministic(backend, kernels, monkeypatch):
    monkeypatch.setattr(kernels, "_target_programs", lambda device: 10**6)  # every split reduction on
    args, s, ids = make_case((45,), 40, 24, (3, 5, 2), "mixed")
    results = []
    with lk.use_backend(backend):
        for _ in range(2):
            for a in (args[0], args[3], args[4]):
                a.grad = None
            y = lk.lora_linear_multi(*args, s, ids)
            y.backward(torch.ones_like(y))
            results.append([y.detach(), args[0].grad.clone(), args[3].grad.clone(), args[4].grad.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU only: the tuned tiles (64-128 rows) at serving sizes; "
                    "the interpreter would take minutes")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("m,pattern", [(16, "mixed"), (3000, "mixed"), (4096, "runs")])
def test_large_batches_on_gpu(backend, m, pattern):
    ranks = (16, 8, 16, 4, 12, 16, 2, 16, 16, 1, 16, 8, 16, 16, 5, 16)
    args, s, ids = make_case((m,), 1024, 1536, ranks, pattern)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.lora_linear_multi(*a, s, ids), _ref(s, ids), args, torch.bfloat16,
                                f"{backend} M={m} {pattern}")
