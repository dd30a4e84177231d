"""infonce against the float64 reference, on every backend that can run here."""
import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import infonce as op
from lora_kernels.reference import infonce as ref

from conftest import DEVICE, DTYPES, assert_close, backends_for, check_against_reference, randn

BACKENDS = backends_for(op.IMPLS)


def make_args(n, d, scale=10.0):
    return [randn(n, d, requires_grad=True), randn(n, d, requires_grad=True),
            torch.tensor(scale, dtype=torch.float64, device=DEVICE, requires_grad=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 8), (37, 24), (300, 64)])
@pytest.mark.parametrize("lambda_", [0.5, 0.2])
@pytest.mark.parametrize("normalize", [False, True])
def test_loss_and_grads(backend, dtype, n, d, lambda_, normalize):
    # Unnormalised features get a temperature that keeps logits O(10), as after training.
    args = make_args(n, d, scale=10.0 if normalize else 10.0 / math.sqrt(d))
    fn = lambda *a: lk.infonce(*a, lambda_=lambda_, normalize=normalize)  # noqa: E731
    with lk.use_backend(backend):
        check_against_reference(fn, lambda *a: ref.infonce(*a, lambda_, normalize), args, dtype,
                                f"{backend} N={n} d={d} λ={lambda_} normalize={normalize}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_fp64(backend, normalize):
    args = make_args(6, 5, scale=2.0)
    with lk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: lk.infonce(*t, lambda_=0.3, normalize=normalize), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_at_logit_scale_100_stays_finite(backend):
    """CLIP's maximal temperature with bf16 features: no inf/NaN anywhere."""
    image, text = (randn(64, 32).to(torch.bfloat16).requires_grad_() for _ in range(2))
    scale = torch.tensor(math.log(100.0), device=DEVICE, requires_grad=True)
    with lk.use_backend(backend):
        loss = lk.infonce(image, text, scale.exp(), normalize=True)
        loss.backward()
    for t in (loss, image.grad, text.grad, scale.grad):
        assert torch.isfinite(t).all()
    expected = ref.infonce(image.detach().double(), text.detach().double(), 100.0, 0.5, True)
    assert_close(loss, expected, torch.bfloat16, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_zero_logit_scale_has_finite_gradients(backend, dtype, normalize):
    """At c = 0 the loss is log N and smooth: d logit_scale = Σ G⊙(I Tᵀ) must not be (Σ G⊙S)/c = 0/0."""
    args = make_args(11, 7, scale=0.0)
    fn = lambda *a: lk.infonce(*a, lambda_=0.3, normalize=normalize)  # noqa: E731
    with lk.use_backend(backend):
        check_against_reference(fn, lambda *a: ref.infonce(*a, 0.3, normalize), args, dtype,
                                f"{backend} c=0 normalize={normalize}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_normalize_keeps_zero_rows_finite_as_f_normalize(backend, dtype):
    """open_clip normalises with F.normalize, max(‖z‖, 1e-12): a zero feature row (padding) gives
    zero logits, not a NaN loss; loss and gradients are those of that formula."""
    image, text, scale = make_args(9, 6, scale=4.0)
    with torch.no_grad():
        image[3] = 0.0
        text[5] = 0.0

    def open_clip_loss(i, t, c):
        i, t = torch.nn.functional.normalize(i, dim=-1), torch.nn.functional.normalize(t, dim=-1)
        return ref.infonce(i, t, c, 0.4, False)

    fn = lambda *a: lk.infonce(*a, lambda_=0.4, normalize=True)  # noqa: E731
    with lk.use_backend(backend):
        check_against_reference(fn, open_clip_loss, [image, text, scale], dtype, f"{backend} zero rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_logit_scale_with_half_features(backend):
    """open_clip keeps logit_scale in fp32 while features may be bf16/fp16."""
    image, text = (randn(20, 16).to(torch.float16).requires_grad_() for _ in range(2))
    scale = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    with lk.use_backend(backend):
        loss = lk.infonce(image, text, scale)
        loss.backward()
    assert scale.grad.dtype == torch.float32 and image.grad.dtype == torch.float16
    i64, t64 = (t.detach().double().requires_grad_() for t in (image, text))
    s64 = torch.tensor(5.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ref.infonce(i64, t64, s64).backward()
    assert_close(scale.grad, s64.grad, torch.float16, "d logit_scale")
    assert_close(image.grad, i64.grad, torch.float16, "d image")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_logit_scale_and_frozen_text(backend):
    image, text, _ = make_args(9, 4)
    text.requires_grad_(False)
    with lk.use_backend(backend):
        loss = lk.infonce(image, text, 3.0)
        loss.backward()
    assert text.grad is None and image.grad is not None
    assert_close(loss, ref.infonce(image, text, 3.0), torch.float64, "loss")


def test_reference_equals_log_softmax_formula():
    """Independent formula: mean over rows of −log softmax on the diagonal, both directions."""
    image, text, scale = (a.detach() for a in make_args(11, 6))
    logits = scale * image @ text.T
    row = -torch.log_softmax(logits, 1).diagonal().mean()
    col = -torch.log_softmax(logits, 0).diagonal().mean()
    assert_close(ref.infonce(image, text, scale, 0.3), 0.3 * row + 0.7 * col, torch.float64, "formula")


def test_reference_backward_matches_autograd():
    for normalize in (False, True):
        args = make_args(10, 7)
        loss = ref.infonce(*args, 0.4, normalize)
        loss.backward(torch.tensor(1.7, dtype=torch.float64))
        detached = [a.detach() for a in args]
        out, lse_row, lse_col = ref.forward(*detached, 0.4, normalize)
        assert_close(out, loss, torch.float64, "forward")
        grads = ref.backward(torch.tensor(1.7, dtype=torch.float64), *detached, lse_row, lse_col, 0.4, normalize,
                             True, True, True)
        for got, t in zip(grads, args):
            assert_close(got, t.grad, torch.float64, f"reference backward normalize={normalize}")


def test_opcheck():
    image, text, scale = (a.detach() for a in make_args(7, 5))
    for normalize in (False, True):
        torch.library.opcheck(op.infonce_fwd, (image, text, scale, 0.5, normalize))
        _, lse_row, lse_col = ref.forward(image, text, scale, 0.5, normalize)
        for needs in [(True, True, True), (True, False, False)]:
            torch.library.opcheck(op.infonce_bwd, (torch.tensor(1.0, dtype=torch.float64), image, text, scale,
                                                   lse_row, lse_col, 0.5, normalize, *needs))


BAD_INPUTS = [
    ("batch mismatch", lambda i, t, s: (i, t[:-1], s), ValueError, "same N"),
    ("dim mismatch", lambda i, t, s: (i, t[:, :-1], s), ValueError, "same N and d"),
    ("1-D image", lambda i, t, s: (i[0], t, s), ValueError, "image must be 2-D"),
    ("int dtype", lambda i, t, s: (i, t.long(), s), TypeError, "text must be float"),
    ("mixed dtype", lambda i, t, s: (i, t.float(), s), TypeError, "dtype"),
    ("mixed device", lambda i, t, s: (i, t.to("meta"), s), ValueError, "device"),
    ("vector scale", lambda i, t, s: (i, t, s.expand(3)), ValueError, "logit_scale must hold one value"),
]


@pytest.mark.parametrize("what,mutate,exc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected(what, mutate, exc, text):
    args = [a.detach() for a in make_args(4, 3)]
    with pytest.raises(exc, match=text):
        lk.infonce(*mutate(*args))


@pytest.mark.parametrize("lambda_", [-0.1, 1.5])
def test_bad_lambda_is_rejected(lambda_):
    with pytest.raises(ValueError, match="lambda_"):
        lk.infonce(*[a.detach() for a in make_args(4, 3)], lambda_=lambda_)


KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["dimage", "dtext", "dscale"])
@pytest.mark.parametrize("normalize", [False, True])
def test_each_gradient_alone(backend, need, normalize):
    """One gradient at a time (the kernels skip the others' work), over several tiles, row
    stripes and column splits; fp64 so that any mistake shows far above rounding."""
    n, d, lambda_ = 150, 40, 0.3
    image, text, scale = (a.detach() for a in make_args(n, d, scale=30.0 if normalize else 10.0 / math.sqrt(d)))
    _, lse_row, lse_col = ref.forward(image, text, scale, lambda_, normalize)
    gloss = torch.tensor(0.7, dtype=torch.float64, device=DEVICE)
    expected = ref.backward(gloss, image, text, scale, lse_row, lse_col, lambda_, normalize, True, True, True)
    with lk.use_backend(backend):
        got = op.infonce_bwd(gloss, image, text, scale, lse_row, lse_col, lambda_, normalize, *need)
    for name, g, e, needed in zip(("d image", "d text", "d logit_scale"), got, expected, need):
        if needed:
            assert g.shape == e.shape and g.dtype == e.dtype, f"{name}: {g.shape} {g.dtype}"
            assert_close(g, e, torch.float64, name)
        else:
            assert g.numel() == 0, f"{name} was not asked for but has shape {tuple(g.shape)}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_wide_features_and_determinism(backend):
    """Non-contiguous features (a transposed view, a strided column slice), d wider than one
    block, and bitwise-identical loss and gradients from run to run."""
    n, d = 70, 150
    image = randn(d, n, dtype=torch.float32).T
    text = randn(n, 2 * d, dtype=torch.float32)[:, ::2]
    scale = torch.tensor(12.0, device=DEVICE)
    assert not image.is_contiguous() and not text.is_contiguous()

    def run():
        i, t, s = (x.detach().requires_grad_() for x in (image, text, scale))
        with lk.use_backend(backend):
            loss = lk.infonce(i, t, s, lambda_=0.4, normalize=True)
            return (loss, *torch.autograd.grad(loss, (i, t, s)))

    first, second = run(), run()
    i64, t64, s64 = (x.detach().double().requires_grad_() for x in (image, text, scale))
    expected = ref.infonce(i64, t64, s64, 0.4, True)
    expected = (expected, *torch.autograd.grad(expected, (i64, t64, s64)))
    for name, got, again, want in zip(("loss", "d image", "d text", "d logit_scale"), first, second, expected):
        assert_close(got, want, torch.float32, name)
        assert torch.equal(got, again), f"{name} differs between two identical runs"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_on_backend(backend):
    image, text, scale = (a.detach() for a in make_args(7, 5))
    with lk.use_backend(backend):
        torch.library.opcheck(op.infonce_fwd, (image, text, scale, 0.5, True))
        _, lse_row, lse_col = ref.forward(image, text, scale, 0.5, True)
        torch.library.opcheck(op.infonce_bwd, (torch.tensor(1.0, dtype=torch.float64, device=DEVICE), image, text,
                                               scale, lse_row, lse_col, 0.5, True, True, True, True))


# ---- one direction on a rectangular block with a diagonal offset (the distributed loss) ----

ROWS_BACKENDS = backends_for(op.ROWS_IMPLS)


def rows_spec(queries, keys, logit_scale, offset, normalize):
    """Σᵢ CE(row i of S, target i + offset) / n_keys, by autograd."""
    if normalize:
        queries, keys = (z / z.norm(dim=-1, keepdim=True) for z in (queries, keys))
    logits = logit_scale * queries @ keys.T
    targets = offset + torch.arange(queries.shape[0], device=queries.device)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / keys.shape[0]


ROWS_SHAPES = [(1, 1, 0, 8), (1, 9, 8, 8), (37, 100, 63, 24), (70, 140, 0, 24), (140, 140, 0, 8)]


@pytest.mark.parametrize("backend", ROWS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,offset,d", ROWS_SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_rows_part_and_grads(backend, dtype, m, n, offset, d, normalize):
    args = [randn(m, d, requires_grad=True), randn(n, d, requires_grad=True),
            torch.tensor(10.0 if normalize else 10.0 / math.sqrt(d), dtype=torch.float64, device=DEVICE,
                         requires_grad=True)]
    with lk.use_backend(backend):
        check_against_reference(lambda q, k, c: op.infonce_rows(q, k, c, offset, normalize),
                                lambda q, k, c: rows_spec(q, k, c, offset, normalize), args, dtype,
                                f"{backend} rows m={m} n={n} offset={offset} d={d} normalize={normalize}")


@pytest.mark.parametrize("backend", ROWS_BACKENDS)
def test_rows_blocks_of_every_rank_add_up_to_the_loss(backend):
    """Split the batch into 3 ranks' rows: λ·Σ rows(I_r, T) + (1−λ)·Σ rows(T_r, I) is the loss."""
    n, d, lam, world = 36, 16, 0.3, 3
    image, text, scale = make_args(n, d, scale=2.0)
    local = n // world
    with lk.use_backend(backend):
        whole = lk.infonce(image, text, scale, lambda_=lam, normalize=True)
        parts = sum(lam * op.infonce_rows(image[r * local:(r + 1) * local], text, scale, r * local, True)
                    + (1 - lam) * op.infonce_rows(text[r * local:(r + 1) * local], image, scale, r * local, True)
                    for r in range(world))
    assert_close(parts, whole, torch.float64, "sum of the ranks' blocks")


@pytest.mark.parametrize("backend", ROWS_BACKENDS)
def test_rows_gradcheck_fp64(backend):
    q, k = randn(4, 5, requires_grad=True), randn(9, 5, requires_grad=True)
    c = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with lk.use_backend(backend):
        for normalize in (False, True):
            assert torch.autograd.gradcheck(lambda *t: op.infonce_rows(*t, 3, normalize), (q, k, c))


@pytest.mark.parametrize("backend", ROWS_BACKENDS)
def test_rows_opcheck(backend):
    q, k = randn(3, 4), randn(7, 4)
    c = torch.tensor(1.5, dtype=torch.float64, device=DEVICE)
    with lk.use_backend(backend):
        torch.library.opcheck(op.infonce_rows_fwd, (q, k, c, 2, True))
        part, lse = op.infonce_rows_fwd(q, k, c, 2, False)
        torch.library.opcheck(op.infonce_rows_bwd, (torch.ones(()), q, k, c, lse, 2, False, True, True, True))


@pytest.mark.parametrize("offset", [-1, 5])
def test_rows_bad_offset_is_rejected(offset):
    with pytest.raises(ValueError, match="offset"):
        op.infonce_rows(randn(3, 4), randn(7, 4), 1.0, offset)
