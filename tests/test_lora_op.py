"""lora_linear against the float64 reference, on every backend that can run here."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import lora as op
from lora_kernels.reference import lora as ref

from conftest import DEVICE, DTYPES, assert_close, backends_for, check_against_reference, randn

BACKENDS = backends_for(op.IMPLS)
SHAPES = [  # (leading dims, K, N, r)
    ((1,), 16, 8, 1),
    ((37,), 129, 33, 3),
    ((2, 5), 64, 48, 8),
    ((3, 1, 7), 24, 130, 16),
]


def make_args(lead, k, n, r, bias=True, grad_base=False):
    return [randn(*lead, k, requires_grad=True),
            randn(n, k, requires_grad=grad_base, scale=k**-0.5),
            randn(n, requires_grad=grad_base) if bias else None,
            randn(r, k, requires_grad=True, scale=k**-0.5),
            randn(n, r, requires_grad=True, scale=r**-0.5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n,r", SHAPES)
def test_forward_and_grads(backend, dtype, lead, k, n, r):
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.lora_linear(*a, scaling=0.75), lambda *a: ref.lora_linear(*a, 0.75),
                                make_args(lead, k, n, r), dtype, f"{backend} {lead}x{k}->{n} r={r}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_weight_grads_when_required(backend, bias):
    """dW = gᵀx and db = Σg are computed when the base weight/bias require grad."""
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.lora_linear(*a, scaling=2.0), lambda *a: ref.lora_linear(*a, 2.0),
                                make_args((19,), 33, 17, 4, bias=bias, grad_base=True), torch.float64, "dW/db")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dx_when_x_is_frozen(backend):
    x, w, b, a, bb = make_args((9,), 20, 12, 2)
    x.requires_grad_(False)
    with lk.use_backend(backend):
        lk.lora_linear(x, w, b, a, bb, 1.0).sum().backward()
    assert x.grad is None and w.grad is None and b.grad is None
    assert a.grad is not None and bb.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    args = make_args((5,), 7, 6, 3, grad_base=True)
    with lk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: lk.lora_linear(*t, scaling=1.5), args)


def _lora_path_of(x, w, b, s, p, backend):
    """With A = B = I (r = K) the LoRA path is s·drop(x): returns y, drop(x) and the keep-mask."""
    k = x.shape[1]
    eye = torch.eye(k, dtype=torch.float64, device=DEVICE)
    a, bb = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    with lk.use_backend(backend):
        y = lk.lora_linear(x, w, b, a, bb, s, dropout_p=p)
    dropped = (y - x @ w.T - b).detach() / s
    kept_value = x.detach() / (1 - p)
    mask = (dropped - kept_value).abs() < (dropped.abs() + kept_value.abs()) * 1e-6
    return y, dropped, mask, a, bb


def _check_grads_with_mask(y, x, w, b, a, bb, s, p, mask):
    """Backpropagate through y; dx, dA, dB must equal the reference's with that very mask."""
    g = randn(*y.shape)
    y.backward(g)
    xr, ar, br = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    ref.lora_linear(xr, w, b, ar, br, s, mask=mask, dropout_p=p).backward(g)
    for got, want, name in ((x.grad, xr.grad, "dx"), (a.grad, ar.grad, "dA"), (bb.grad, br.grad, "dB")):
        assert_close(got, want, torch.float64, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_shared_by_forward_and_backward(backend):
    """With A = B = I the LoRA path returns s·drop(x), which reveals the mask the kernel
    used; the gradients must then equal the reference's with that very mask."""
    m, k, p, s = 37, 24, 0.3, 0.5
    x = randn(m, k, requires_grad=True)
    w, b = randn(k, k, scale=k**-0.5), randn(k)
    y, dropped, mask, a, bb = _lora_path_of(x, w, b, s, p, backend)
    assert_close(dropped, x.detach() * mask / (1 - p), torch.float64, "dropped x")
    keep = mask.double().mean().item()
    assert abs(keep - (1 - p)) < 0.1, f"kept fraction {keep:.3f}, expected about {1 - p}"
    _check_grads_with_mask(y, x, w, b, a, bb, s, p, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_reproducible_with_manual_seed(backend):
    x, w, b, a, bb = make_args((8,), 16, 16, 4)
    torch.nn.init.normal_(bb)
    with lk.use_backend(backend):
        run = lambda seed: (torch.manual_seed(seed), lk.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5))[1]  # noqa: E731
        assert torch.equal(run(1), run(1))
        assert not torch.equal(run(1), run(2))
        eval_out = lk.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=False)
    assert_close(eval_out, ref.lora_linear(x, w, b, a, bb, 1.0), torch.float64, "eval mode ignores dropout")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_with_dropout(backend):
    args = make_args((6,), 5, 4, 2)

    def fn(*t):
        torch.manual_seed(0)
        return lk.lora_linear(*t, scaling=1.0, dropout_p=0.4)
    with lk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    x = randn(12, 40)[:, ::2].requires_grad_()              # row stride 40, column stride 2
    w = randn(20, 18).T.requires_grad_(False)                 # [18, 20] transposed view
    a, bb = randn(20, 3).T.requires_grad_(), randn(3, 18).T.requires_grad_()
    b = randn(36)[::2]
    with lk.use_backend(backend):
        check_against_reference(lambda *t: lk.lora_linear(*t, scaling=0.5), lambda *t: ref.lora_linear(*t, 0.5),
                                [x, w, b, a, bb], torch.float64, "non-contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, b, a, bb = make_args((0,), 16, 8, 2)
    with lk.use_backend(backend):
        y = lk.lora_linear(x, w, b, a, bb, 1.0)
        y.sum().backward()
    assert y.shape == (0, 8)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))


def test_opcheck():
    x, w, b, a, bb = (t.detach() for t in make_args((5,), 9, 7, 2))
    seed = torch.tensor(11)
    torch.library.opcheck(op.lora_linear_fwd, (x, w, b, a, bb, 0.5, 0.25, seed))
    torch.library.opcheck(op.lora_linear_fwd, (x, w, None, a, bb, 0.5, 0.0, seed))
    u = ref.forward(x, w, b, a, bb, 0.5, 0.25, 11)[1]
    g = randn(5, 7)
    for needs in [(True, True, True), (False, False, False)]:
        torch.library.opcheck(op.lora_linear_bwd, (g, x, w, a, bb, u, 0.5, 0.25, seed, *needs))


def test_reference_equals_merged_weight():
    """Independent formula: the LoRA update is the weight delta s·BA."""
    x, w, b, a, bb = (t.detach() for t in make_args((13,), 21, 11, 5))
    assert_close(ref.lora_linear(x, w, b, a, bb, 0.3), x @ (w + 0.3 * bb @ a).T + b, torch.float64, "merged")


def test_reference_backward_matches_autograd():
    x, w, b, a, bb = make_args((10,), 12, 9, 3, grad_base=True)
    p, seed, s = 0.25, 1234, 0.8
    y, u = ref.forward(x.detach(), w.detach(), b.detach(), a.detach(), bb.detach(), s, p, seed)
    mask = ref.dropout_mask(x.shape, p, seed, x.device)
    out = ref.lora_linear(x, w, b, a, bb, s, mask=mask, dropout_p=p)
    assert_close(y, out, torch.float64, "forward")
    g = randn(10, 9)
    out.backward(g)
    dx, da, db_, dw, dbias = ref.backward(g, x.detach(), w.detach(), a.detach(), bb.detach(), u, s, p, seed,
                                          True, True, True)
    for got, t in ((dx, x), (da, a), (db_, bb), (dw, w), (dbias, b)):
        assert_close(got, t.grad, torch.float64, "reference backward")


BAD_INPUTS = [  # (description, mutate(args) -> args, exception, text in message)
    ("K mismatch", lambda x, w, b, a, bb: (x, w[:, :-1], b, a, bb), ValueError, "weight"),
    ("N mismatch in B", lambda x, w, b, a, bb: (x, w, b, a, bb[:-1]), ValueError, "lora_B"),
    ("r mismatch", lambda x, w, b, a, bb: (x, w, b, a, bb[:, :-1]), ValueError, "lora_B"),
    ("A width", lambda x, w, b, a, bb: (x, w, b, a[:, :-1], bb), ValueError, "lora_A"),
    ("r = 0", lambda x, w, b, a, bb: (x, w, b, a[:0], bb[:, :0]), ValueError, "r must be >= 1"),
    ("1-D weight", lambda x, w, b, a, bb: (x, w[0], b, a, bb), ValueError, "weight must be 2-D"),
    ("bias shape", lambda x, w, b, a, bb: (x, w, b[:-1], a, bb), ValueError, "bias"),
    ("int dtype", lambda x, w, b, a, bb: (x.long(), w, b, a, bb), TypeError, "x must be float"),
    ("mixed dtype", lambda x, w, b, a, bb: (x, w.float(), b, a, bb), TypeError, "dtype"),
    ("mixed device", lambda x, w, b, a, bb: (x, w.to("meta"), b, a, bb), ValueError, "device"),
    ("not a tensor", lambda x, w, b, a, bb: (x.tolist(), w, b, a, bb), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("what,mutate,exc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected(what, mutate, exc, text):
    args = [t.detach() for t in make_args((4,), 8, 6, 2)]
    with pytest.raises(exc, match=text):
        lk.lora_linear(*mutate(*args), 1.0)


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_bad_dropout_is_rejected(p):
    args = [t.detach() for t in make_args((4,), 8, 6, 2)]
    with pytest.raises(ValueError, match="dropout_p"):
        lk.lora_linear(*args, 1.0, dropout_p=p)


# ---- Triton kernel paths: both forward strategies, split reductions, rank chunks, dropout ----

TRITON = [b for b in BACKENDS if b == "triton"]


@pytest.fixture
def kernels(monkeypatch):
    """The Triton module, with its per-shape choices open to monkeypatching."""
    return pytest.importorskip("lora_kernels.triton.lora")


def _force(monkeypatch, kernels, fused, splits):
    monkeypatch.setattr(kernels, "_fuse_down_projection", lambda *a: fused)
    # 1: one program per tile, no split reductions; 10**6: every split as fine as it goes.
    monkeypatch.setattr(kernels, "_target_programs", lambda device: splits)


KERNEL_CASES = [  # (fused forward, target programs, leading dims, K, N, r, dtype)
    (True, 1, (37,), 129, 70, 3, torch.float32),
    (False, 1, (37,), 129, 70, 3, torch.float32),
    (False, 10**6, (37,), 129, 70, 3, torch.float32),
    (False, 10**6, (2, 40), 70, 33, 80, torch.float64),   # r > 64: rank chunks everywhere
    (True, 10**6, (1,), 129, 70, 48, torch.bfloat16),     # decode row, several column tiles
    (False, 10**6, (1,), 129, 70, 5, torch.float16),
    (True, 1, (70,), 40, 20, 16, torch.float16),
    (False, 10**6, (70,), 40, 20, 16, torch.bfloat16),
]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("fused,splits,lead,k,n,r,dtype", KERNEL_CASES, ids=str)
def test_kernel_paths(backend, kernels, monkeypatch, fused, splits, lead, k, n, r, dtype):
    _force(monkeypatch, kernels, fused, splits)
    with lk.use_backend(backend):
        check_against_reference(lambda *a: lk.lora_linear(*a, scaling=0.75), lambda *a: ref.lora_linear(*a, 0.75),
                                make_args(lead, k, n, r), dtype, f"fused={fused} splits={splits}")


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("fused,splits,m,k", [(True, 1, 37, 40), (False, 10**6, 37, 70), (False, 1, 5, 70)])
def test_kernel_dropout_paths(backend, kernels, monkeypatch, fused, splits, m, k):
    """The keep-mask regenerated by each backward kernel equals the forward's, on both forward
    paths, across tiles, partial groups of four columns (K = 70) and rank chunks (r = 70)."""
    _force(monkeypatch, kernels, fused, splits)
    p, s = 0.3, 0.5
    x = randn(m, k, requires_grad=True)
    w, b = randn(k, k, scale=k**-0.5), randn(k)
    y, dropped, mask, a, bb = _lora_path_of(x, w, b, s, p, backend)
    assert_close(dropped, x.detach() * mask / (1 - p), torch.float64, "dropped x")
    _check_grads_with_mask(y, x, w, b, a, bb, s, p, mask)


@pytest.mark.parametrize("backend", TRITON)
def test_kernel_mask_is_independent_of_the_path(backend, kernels, monkeypatch):
    """Same seed, fused or split forward: the same mask (it depends on the element, not the tiling)."""
    x, w, b, a, bb = (t.detach() for t in make_args((37,), 44, 20, 6))
    outs = []
    for fused, wide in ((True, False), (False, False), (False, True)):
        _force(monkeypatch, kernels, fused, 10**6)
        # wide: the 64-bit Philox counters of huge inputs (M·K >= 2^33) draw the same words
        monkeypatch.setattr(kernels, "_wide_counters", lambda m, k: wide)
        torch.manual_seed(3)
        with lk.use_backend(backend):
            outs.append(lk.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5))
    assert_close(outs[0], outs[1], torch.float64, "fused vs split with dropout")
    assert_close(outs[2], outs[1], torch.float64, "64-bit vs 32-bit counters")
    assert not torch.allclose(outs[0], ref.lora_linear(x, w, b, a, bb, 1.0)), "dropout had no effect"


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_mask_statistics(backend, p):
    m, k = 128, 64
    x = randn(m, k) + 3.0  # away from zero, so every kept element is recognisable
    _, _, mask, _, _ = _lora_path_of(x, randn(k, k), randn(k), 1.0, p, backend)
    keep = mask.double()
    assert abs(keep.mean().item() - (1 - p)) < 0.03, f"kept fraction {keep.mean():.3f} for p={p}"
    # each of the four Philox words that groups of four columns share is used, and independent
    for j in range(4):
        assert abs(keep[:, j::4].mean().item() - (1 - p)) < 0.06, f"word {j}"
    for i, j in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]:
        same = (mask[:, i::4] == mask[:, j::4]).double().mean().item()
        assert abs(same - (p * p + (1 - p) ** 2)) < 0.06, f"columns {i} and {j} of four agree {same:.3f}"
    rows_same = (mask[0::2] == mask[1::2]).all(dim=1).double().mean().item()
    assert rows_same < 0.1, "rows repeat their mask"


@pytest.mark.parametrize("backend", TRITON)
def test_kernel_opcheck(backend):
    x, w, b, a, bb = (t.detach() for t in make_args((5,), 9, 7, 2))
    seed = torch.tensor(11)
    with lk.use_backend(backend):
        torch.library.opcheck(op.lora_linear_fwd, (x, w, b, a, bb, 0.5, 0.25, seed))
        torch.library.opcheck(op.lora_linear_fwd, (x, w, None, a, bb, 0.5, 0.0, seed))
        u = op.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.25, seed)[1]
        g = randn(5, 7)
        for needs in [(True, True, True), (False, False, False)]:
            torch.library.opcheck(op.lora_linear_bwd, (g, x, w, a, bb, u, 0.5, 0.25, seed, *needs))
