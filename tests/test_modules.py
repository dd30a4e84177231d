"""The nn modules (LoRALinear, BottleneckAdapter, FusedLayerNorm, InfoNCELoss) against the
float64 references and the torch modules they replace; torch.compile over each module;
the public API surface and the backend selection."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels as lk
from lora_kernels import backend
from lora_kernels.ops import layer_norm as ln_op
from lora_kernels.reference import adapter as ref_adapter
from lora_kernels.reference import lora as ref_lora

from conftest import DEVICE, TOLERANCE, assert_close, randn, rel_err

F64 = torch.float64
FACTORY = {"device": DEVICE, "dtype": F64}


def close64(out, ref, what=""):
    assert_close(out, ref, F64, what)


# ----------------------------------------------------------------------------- LoRALinear

def make_lora(k=29, n=17, r=3, alpha=5, dropout=0.0, bias=True, use_rslora=False, perturb=True):
    """A float64 LoRALinear with random (non-zero) lora_B when ``perturb``."""
    m = lk.LoRALinear(k, n, r=r, alpha=alpha, dropout=dropout, bias=bias, use_rslora=use_rslora, **FACTORY)
    if perturb:
        with torch.no_grad():
            m.lora_B.copy_(randn(n, r, dtype=F64, scale=r**-0.5))
    return m


def test_lora_init_equals_base():
    m = make_lora(perturb=False)
    assert torch.count_nonzero(m.lora_B) == 0, "lora_B must start at zero"
    assert torch.count_nonzero(m.lora_A) == m.lora_A.numel(), "lora_A must get a random init"
    assert not m.merged
    x = randn(2, 3, 29, dtype=F64)
    y = m(x)
    assert y.shape == (2, 3, 17)
    close64(y, F.linear(x, m.weight, m.bias), "fresh LoRALinear vs its base linear")


@pytest.mark.parametrize("lead,k,n,r,bias", [
    ((2, 3), 29, 17, 3, True),
    ((1,), 129, 33, 1, True),
    ((37,), 16, 8, 8, False),
    ((2, 1, 5), 7, 130, 2, True),
])
def test_lora_forward_matches_reference(lead, k, n, r, bias):
    m = make_lora(k, n, r=r, alpha=7, bias=bias)
    x = randn(*lead, k, dtype=F64)
    y = m(x)
    ref = ref_lora.lora_linear(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling)
    assert y.shape == (*lead, n)
    close64(y, ref, "LoRALinear forward")
    # The low-rank path really contributes (lora_B was perturbed).
    assert rel_err(y, F.linear(x, m.weight, m.bias)) > 1e-3


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_scaling(use_rslora):
    r, alpha = 4, 6
    m = make_lora(k=21, n=11, r=r, alpha=alpha, use_rslora=use_rslora)
    expected = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert m.scaling == pytest.approx(expected, rel=1e-15)
    x = randn(5, 21, dtype=F64)
    delta = m(x) - F.linear(x, m.weight, m.bias)
    close64(delta, expected * (x @ m.lora_A.T) @ m.lora_B.T, "LoRA path with scaling")


def test_lora_rslora_differs_from_plain():
    plain, rs = make_lora(r=4, alpha=6), make_lora(r=4, alpha=6, use_rslora=True)
    rs.load_state_dict(plain.state_dict())
    x = randn(3, 29, dtype=F64)
    base = F.linear(x, plain.weight, plain.bias)
    close64(rs(x) - base, math.sqrt(4) * (plain(x) - base), "rsLoRA = sqrt(r) x plain LoRA for same A, B")


def test_lora_gradients_only_to_lora_params():
    m = make_lora(k=29, n=17, r=3)
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    x = randn(2, 3, 29, dtype=F64, requires_grad=True)
    g = randn(2, 3, 17, dtype=F64)
    (m(x) * g).sum().backward()
    assert m.weight.grad is None and m.bias.grad is None

    xr = x.detach().clone().requires_grad_(True)
    A = m.lora_A.detach().clone().requires_grad_(True)
    B = m.lora_B.detach().clone().requires_grad_(True)
    (ref_lora.lora_linear(xr, m.weight, m.bias, A, B, m.scaling) * g).sum().backward()
    close64(m.lora_A.grad, A.grad, "dA")
    close64(m.lora_B.grad, B.grad, "dB")
    close64(x.grad, xr.grad, "dx")


@pytest.mark.parametrize("bias", [True, False])
def test_lora_from_linear_shares_and_freezes(bias):
    lin = nn.Linear(23, 11, bias=bias, **FACTORY)
    m = lk.LoRALinear.from_linear(lin, r=3, alpha=7)
    assert m.weight is lin.weight
    assert m.bias is lin.bias
    assert not lin.weight.requires_grad
    if bias:
        assert not lin.bias.requires_grad
    assert (m.in_features, m.out_features, m.r) == (23, 11, 3)
    assert m.lora_A.shape == (3, 23) and m.lora_B.shape == (11, 3)
    assert m.lora_A.dtype == F64 and m.lora_A.device.type == DEVICE.type
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    x = randn(4, 23, dtype=F64)
    close64(m(x), lin(x), "from_linear at init")
    with torch.no_grad():
        m.lora_B.copy_(randn(11, 3, dtype=F64))
    close64(m(x), ref_lora.lora_linear(x, lin.weight, lin.bias, m.lora_A, m.lora_B, 7 / 3), "from_linear perturbed")


def make_conv1d(nx=19, nf=13):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf, nx).to(**FACTORY)
    with torch.no_grad():
        conv.weight.copy_(randn(nx, nf, dtype=F64, scale=nx**-0.5))
        conv.bias.copy_(randn(nf, dtype=F64))
    return conv


def test_lora_from_conv1d():
    conv = make_conv1d()
    m = lk.LoRALinear.from_linear(conv, r=3, alpha=5)
    assert m.weight is conv.weight and m.bias is conv.bias
    assert not conv.weight.requires_grad and not conv.bias.requires_grad
    assert (m.in_features, m.out_features) == (19, 13)
    x = randn(2, 3, 19, dtype=F64)
    close64(m(x), conv(x), "from_linear(Conv1D) at init")
    with torch.no_grad():
        m.lora_B.copy_(randn(13, 3, dtype=F64))
    expected = x @ conv.weight + conv.bias + (5 / 3) * (x @ m.lora_A.T) @ m.lora_B.T
    close64(m(x), expected, "from_linear(Conv1D) perturbed")


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_lora_merge_unmerge_round_trip(layout):
    if layout == "linear":
        m = make_lora(k=29, n=17, r=3, alpha=5)
    else:
        m = lk.LoRALinear.from_linear(make_conv1d(29, 17), r=3, alpha=5)
        with torch.no_grad():
            m.lora_B.copy_(randn(17, 3, dtype=F64))
    x = randn(2, 3, 29, dtype=F64)
    y0 = m(x).detach()
    w0 = m.weight.detach().clone()
    delta = m.scaling * m.lora_B.detach() @ m.lora_A.detach()  # [out, in]
    if layout == "conv1d":
        delta = delta.T

    m.merge()
    assert m.merged is True
    close64(m.weight, w0 + delta, "merged weight = W + s·BA")
    w_merged = m.weight.detach().clone()
    close64(m(x), y0, "output after merge")
    m.merge()  # idempotent: folds the update in only once
    assert m.merged is True
    assert torch.equal(m.weight, w_merged), "a second merge() changed the weight"
    close64(m(x), y0, "output after double merge")

    m.unmerge()
    assert m.merged is False
    close64(m.weight, w0, "weight after unmerge")
    close64(m(x), y0, "output after unmerge")
    w_unmerged = m.weight.detach().clone()
    m.unmerge()  # idempotent too
    assert m.merged is False and torch.equal(m.weight, w_unmerged)


def test_lora_merged_forward_gives_no_lora_gradients():
    m = make_lora()
    m.merge()
    x = randn(5, 29, dtype=F64, requires_grad=True)
    m(x).sum().backward()
    assert m.lora_A.grad is None and m.lora_B.grad is None and m.weight.grad is None
    assert x.grad is not None


def test_lora_dropout_eval_mode_is_deterministic_and_undropped():
    m = make_lora(dropout=0.5)
    m.eval()
    x = randn(2, 3, 29, dtype=F64)
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2)
    close64(y1, ref_lora.lora_linear(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling), "eval mode, no dropout")


def test_lora_dropout_train_mode_seeded():
    m = make_lora(dropout=0.5)
    m.train()
    x = randn(2, 3, 29, dtype=F64)
    torch.manual_seed(1)
    y1 = m(x)
    torch.manual_seed(1)
    y2 = m(x)
    torch.manual_seed(2)
    y3 = m(x)
    assert torch.equal(y1, y2), "same torch.manual_seed must give the same dropout mask"
    assert rel_err(y3, y1) > 1e-3, "different seeds gave the same dropout mask"
    m.eval()
    assert rel_err(y1, m(x)) > 1e-3, "train-mode dropout had no effect"


def test_lora_dropout_only_on_lora_path():
    """With lora_B = 0 the LoRA path vanishes, so training-mode dropout must not touch the output."""
    m = make_lora(dropout=0.5, perturb=False)
    m.train()
    x = randn(7, 29, dtype=F64)
    torch.manual_seed(3)
    close64(m(x), F.linear(x, m.weight, m.bias), "dropout must not reach the base path")


def test_lora_dropout_mask_expectation():
    """E[drop(x)] = x: the LoRA-path output averaged over many masks approaches the undropped one."""
    k, n, draws, p = 29, 17, 4000, 0.5
    m = make_lora(k=k, n=n, dropout=p)
    rows = randn(3, k, dtype=F64)
    x = rows.repeat_interleave(draws, dim=0)  # every row seen under `draws` independent masks
    base = F.linear(rows, m.weight, m.bias)
    m.eval()
    lora_ref = m(rows) - base
    m.train()
    torch.manual_seed(0)
    lora_drawn = (m(x) - base.repeat_interleave(draws, dim=0)).reshape(3, draws, n)
    # One draw is far from the expectation (the mask matters) ...
    assert rel_err(lora_drawn[:, 0], lora_ref) > 0.2
    # ... the mean of 4000 is within a few standard errors (~1/sqrt(4000) ≈ 0.016 relative).
    err = rel_err(lora_drawn.mean(1), lora_ref)
    assert err < 0.1, f"mean over {draws} dropout masks is {err:.3f} away (relative) from the undropped output"


def test_lora_gradcheck_with_dropout():
    m = make_lora(k=13, n=7, r=3, alpha=4, dropout=0.3)
    m.train()
    names = ("weight", "bias", "lora_A", "lora_B")
    params = [getattr(m, nm).detach().clone().requires_grad_(True) for nm in names]
    x = randn(2, 5, 13, dtype=F64, requires_grad=True)

    def f(x, *ps):
        torch.manual_seed(1234)  # the same mask at every evaluation
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    y = f(x, *params)
    m.eval()
    assert rel_err(y, m(x)) > 1e-3, "dropout was not active in the gradcheck function"
    m.train()
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"r": 0}, {"r": -2}, {"r": 2.5}, {"r": True}, {"dropout": 1.0}, {"dropout": -0.1}, {"dropout": 1.5},
    {"alpha": "x"}, {"alpha": None}, {"alpha": float("nan")}, {"alpha": True},
], ids=str)
def test_lora_bad_constructor_args(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        lk.LoRALinear(16, 8, **kwargs)


@pytest.mark.parametrize("features", [(0, 8), (8, -1), (16.0, 8), ("16", 8), (8, True)], ids=str)
def test_lora_bad_features(features):
    with pytest.raises(ValueError, match="in_features" if features[0] != 8 else "out_features"):
        lk.LoRALinear(*features)


# ----------------------------------------------------------------------- BottleneckAdapter

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adapter_identity_at_init(activation):
    m = lk.BottleneckAdapter(37, bottleneck=5, activation=activation, scale=0.7, **FACTORY)
    assert torch.count_nonzero(m.up.weight) == 0 and torch.count_nonzero(m.up.bias) == 0
    x = randn(2, 3, 37, dtype=F64)
    assert torch.equal(m(x), x), "a fresh adapter must be the identity, exactly"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,d,r", [((2, 3), 37, 5), ((1,), 129, 1), ((11,), 64, 16)])
def test_adapter_matches_reference(activation, lead, d, r):
    m = lk.BottleneckAdapter(d, bottleneck=r, activation=activation, scale=0.7, **FACTORY)
    with torch.no_grad():
        m.up.weight.copy_(randn(d, r, dtype=F64, scale=r**-0.5))
        m.up.bias.copy_(randn(d, dtype=F64))
    x = randn(*lead, d, dtype=F64, requires_grad=True)
    g = randn(*lead, d, dtype=F64)
    y = m(x)
    params = [m.down.weight, m.down.bias, m.up.weight, m.up.bias]
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    xr = x.detach().clone().requires_grad_(True)
    ref = ref_adapter.adapter(xr, *ps, activation=activation, scale=0.7)
    close64(y, ref, f"adapter forward ({activation})")
    assert rel_err(y, x) > 1e-3
    (y * g).sum().backward()
    (ref * g).sum().backward()
    close64(x.grad, xr.grad, "dx")
    for name, p, pr in zip(("dW_d", "db_d", "dW_u", "db_u"), params, ps):
        close64(p.grad, pr.grad, name)


def test_adapter_bad_args():
    with pytest.raises(ValueError):
        lk.BottleneckAdapter(16, bottleneck=4, activation="tanh")
    for bottleneck in (0, -3, True, 4.0):
        with pytest.raises(ValueError, match="bottleneck"):
            lk.BottleneckAdapter(16, bottleneck=bottleneck)
    for d_model in (0, -1, 16.0):
        with pytest.raises(ValueError, match="d_model"):
            lk.BottleneckAdapter(d_model, bottleneck=4)
    with pytest.raises(TypeError, match="scale"):
        lk.BottleneckAdapter(16, bottleneck=4, scale="big")


# -------------------------------------------------------------------------- FusedLayerNorm

LN_CONFIGS = [  # (normalized_shape, elementwise_affine, bias)
    (37, True, True),
    ((3, 5), True, True),
    (37, True, False),
    (37, False, True),
]


def ln_id(cfg):
    shape, affine, bias = cfg
    return f"shape={shape}-affine={affine}-bias={bias}"


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(*p.shape, dtype=p.dtype))
    return module


def trailing(shape):
    return (shape,) if isinstance(shape, int) else tuple(shape)


@pytest.mark.parametrize("cfg", LN_CONFIGS, ids=ln_id)
def test_layernorm_state_dict_compatible(cfg):
    shape, affine, bias = cfg
    torch_ln = randomise(nn.LayerNorm(shape, eps=1e-4, elementwise_affine=affine, bias=bias, **FACTORY))
    fused = lk.FusedLayerNorm(shape, eps=1e-4, elementwise_affine=affine, bias=bias, **FACTORY)
    assert fused.state_dict().keys() == torch_ln.state_dict().keys()
    fused.load_state_dict(torch_ln.state_dict(), strict=True)
    x = randn(2, 3, *trailing(shape), dtype=F64)
    close64(fused(x), torch_ln(x), "FusedLayerNorm loaded from nn.LayerNorm")

    fused2 = randomise(lk.FusedLayerNorm(shape, eps=1e-4, elementwise_affine=affine, bias=bias, **FACTORY))
    torch_ln2 = nn.LayerNorm(shape, eps=1e-4, elementwise_affine=affine, bias=bias, **FACTORY)
    torch_ln2.load_state_dict(fused2.state_dict(), strict=True)
    close64(torch_ln2(x), fused2(x), "nn.LayerNorm loaded from FusedLayerNorm")


@pytest.mark.parametrize("cfg", LN_CONFIGS, ids=ln_id)
def test_layernorm_matches_torch(cfg):
    shape, affine, bias = cfg
    torch_ln = randomise(nn.LayerNorm(shape, eps=1e-3, elementwise_affine=affine, bias=bias, **FACTORY))
    fused = lk.FusedLayerNorm(shape, eps=1e-3, elementwise_affine=affine, bias=bias, **FACTORY)
    fused.load_state_dict(torch_ln.state_dict())
    assert (fused.weight is None) == (not affine)
    assert (fused.bias is None) == (not (affine and bias))
    x = randn(2, 3, *trailing(shape), dtype=F64, scale=3.0) + 0.5
    xr = x.detach().clone().requires_grad_(True)
    x.requires_grad_(True)
    g = randn(*x.shape, dtype=F64)
    y, yr = fused(x), torch_ln(xr)
    close64(y, yr, "FusedLayerNorm vs nn.LayerNorm")
    (y * g).sum().backward()
    (yr * g).sum().backward()
    close64(x.grad, xr.grad, "dx")
    for p, pr in zip(fused.parameters(), torch_ln.parameters()):
        close64(p.grad, pr.grad, "d" + "weight/bias")


def test_layernorm_from_layer_norm_shares_parameters():
    torch_ln = randomise(nn.LayerNorm((3, 5), eps=1e-3, **FACTORY))
    fused = lk.FusedLayerNorm.from_layer_norm(torch_ln)
    assert fused.weight is torch_ln.weight and fused.bias is torch_ln.bias
    assert fused.eps == 1e-3 and fused.normalized_shape == (3, 5)
    assert [n for n, _ in fused.named_parameters()] == ["weight", "bias"]
    x = randn(4, 3, 5, dtype=F64)
    close64(fused(x), torch_ln(x), "from_layer_norm")


@pytest.mark.parametrize("affine,bias", [(True, False), (False, False)])
def test_layernorm_from_layer_norm_without_affine_or_bias(affine, bias):
    torch_ln = randomise(nn.LayerNorm(19, elementwise_affine=affine, bias=bias, **FACTORY))
    fused = lk.FusedLayerNorm.from_layer_norm(torch_ln)
    assert fused.weight is torch_ln.weight and fused.bias is torch_ln.bias
    assert fused.state_dict().keys() == torch_ln.state_dict().keys()
    x = randn(6, 19, dtype=F64)
    close64(fused(x), torch_ln(x), "from_layer_norm without affine/bias")


def test_layernorm_frozen_input_gets_no_dx(monkeypatch):
    """LN-tuning: x needs no grad, so only dγ/dβ are computed (and correct), never dx."""
    seen = []
    impl = ln_op.IMPLS["torch"]

    def spy_backward(g, x, weight, mean, rstd, need_dx, need_dw, need_db):
        seen.append((need_dx, need_dw, need_db))
        return impl.backward(g, x, weight, mean, rstd, need_dx, need_dw, need_db)

    monkeypatch.setitem(ln_op.IMPLS, "torch", backend.Impl(impl.forward, spy_backward, impl.supports))
    torch_ln = randomise(nn.LayerNorm(37, **FACTORY))
    fused = lk.FusedLayerNorm(37, **FACTORY)
    fused.load_state_dict(torch_ln.state_dict())
    x = randn(2, 5, 37, dtype=F64)
    g = randn(2, 5, 37, dtype=F64)
    with lk.use_backend("torch"):
        (fused(x) * g).sum().backward()
    (torch_ln(x) * g).sum().backward()
    assert x.grad is None
    close64(fused.weight.grad, torch_ln.weight.grad, "dγ")
    close64(fused.bias.grad, torch_ln.bias.grad, "dβ")
    assert seen == [(False, True, True)], f"backward asked for (dx, dγ, dβ) = {seen}"


# ---------------------------------------------------------------------------- InfoNCELoss

def open_clip_loss(image, text, logit_scale, lambda_=0.5, normalize=False):
    """open_clip's ClipLoss, written out (weighted by lambda_ instead of 1/2)."""
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logits_per_image.T
    labels = torch.arange(image.shape[0], device=image.device)
    return lambda_ * F.cross_entropy(logits_per_image, labels) + (1 - lambda_) * F.cross_entropy(logits_per_text, labels)


def clip_inputs(n=13, d=9):
    image = randn(n, d, dtype=F64, scale=0.5, requires_grad=True)
    text = randn(n, d, dtype=F64, scale=0.5, requires_grad=True)
    log_scale = nn.Parameter(torch.tensor(1.2, **FACTORY))
    return image, text, log_scale


def test_infonce_lambda_half_is_open_clip():
    image, text, log_scale = clip_inputs()
    loss = lk.InfoNCELoss()(image, text, log_scale.exp())
    logits = log_scale.exp() * image @ text.T
    labels = torch.arange(13, device=DEVICE)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert loss.shape == ()
    close64(loss, expected, "InfoNCE(λ=0.5) vs open_clip ClipLoss")


@pytest.mark.parametrize("lambda_", [0.5, 0.2])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n,d", [(13, 9), (1, 5), (40, 33)])
def test_infonce_value_and_gradients(lambda_, normalize, n, d):
    image, text, log_scale = clip_inputs(n, d)
    loss = lk.InfoNCELoss(lambda_=lambda_, normalize=normalize)(image, text, log_scale.exp())
    grads = torch.autograd.grad(loss, (image, text, log_scale))
    expected = open_clip_loss(image, text, log_scale.exp(), lambda_, normalize)
    expected_grads = torch.autograd.grad(expected, (image, text, log_scale))
    close64(loss, expected, "loss")
    for name, gr, ge in zip(("d image", "d text", "d log_scale"), grads, expected_grads):
        close64(gr, ge, name)


def test_infonce_normalize_equals_normalising_first():
    image, text, log_scale = clip_inputs(11, 7)
    image = image * 3.0  # far from unit norm
    scale = log_scale.exp()
    a = lk.InfoNCELoss(lambda_=0.3, normalize=True)(image, text, scale)
    b = lk.InfoNCELoss(lambda_=0.3)(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
    close64(a, b, "normalize=True vs normalising first")
    assert rel_err(lk.InfoNCELoss(lambda_=0.3)(image, text, scale), b) > 1e-3


def test_infonce_float_logit_scale():
    image, text, _ = clip_inputs()
    close64(lk.InfoNCELoss(lambda_=0.2)(image, text, 2.5), open_clip_loss(image, text, 2.5, 0.2), "float scale")


def test_infonce_bad_lambda():
    with pytest.raises(ValueError):
        lk.InfoNCELoss(lambda_=1.5)
    with pytest.raises(ValueError):
        lk.InfoNCELoss(lambda_=-0.1)


# -------------------------------------------------------------------------- torch.compile

def _compile_case(name):
    """(module, inputs requiring grad, extra parameter tensors) in float64."""
    if name == "lora":
        m = make_lora(k=29, n=17, r=3)
        return m, [randn(2, 3, 29, dtype=F64, requires_grad=True)]
    if name == "adapter":
        m = lk.BottleneckAdapter(37, bottleneck=5, activation="gelu_tanh", scale=0.5, **FACTORY)
        randomise(m)
        return m, [randn(2, 3, 37, dtype=F64, requires_grad=True)]
    if name == "layernorm":
        m = randomise(lk.FusedLayerNorm((3, 5), **FACTORY))
        return m, [randn(4, 3, 5, dtype=F64, requires_grad=True)]
    image, text, log_scale = clip_inputs(13, 9)
    m = lk.InfoNCELoss(lambda_=0.3, normalize=True)
    m.log_scale = log_scale  # registers it, so it is among m.parameters()
    return m, [image, text]


def _run(fn, m, inputs):
    for p in m.parameters():
        p.grad = None
    for t in inputs:
        t.grad = None
    if isinstance(m, lk.InfoNCELoss):
        out = fn(*inputs, m.log_scale.exp())
    else:
        out = fn(*inputs)
    g = torch.ones_like(out) if out.ndim == 0 else randn(*out.shape, dtype=out.dtype)
    torch.manual_seed(0)
    (out * g.detach()).sum().backward()
    grads = [t.grad.clone() for t in inputs] + [p.grad.clone() for p in m.parameters() if p.requires_grad]
    return out.detach(), grads


@pytest.mark.parametrize("name", ["lora", "adapter", "layernorm", "infonce"])
def test_compile_aot_eager_fullgraph(name):
    torch._dynamo.reset()
    torch.manual_seed(5)
    m, inputs = _compile_case(name)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.manual_seed(7)
    out_c, grads_c = _run(compiled, m, inputs)
    torch.manual_seed(7)
    out_e, grads_e = _run(m, m, inputs)
    assert len(grads_c) == len(grads_e) >= 2
    close64(out_c, out_e, f"compiled {name} forward")
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        close64(gc, ge, f"compiled {name} grad #{i}")
    torch._dynamo.reset()


def test_compile_again_with_a_changed_float_hyper_parameter():
    """A second compile with another scale/scaling makes the float symbolic (automatic dynamic):
    the argument checks must trace it, and the result must use the new value."""
    torch._dynamo.reset()
    x = randn(3, 24, dtype=F64)
    for alpha, scale in ((16.0, 1.0), (8.0, 2.0), (4.0, -0.5)):
        lora = make_lora(k=24, n=24, r=4, alpha=alpha)
        adapter = randomise(lk.BottleneckAdapter(24, bottleneck=5, scale=scale, **FACTORY))
        for m in (lora, adapter):
            close64(torch.compile(m, backend="aot_eager", fullgraph=True)(x), m(x), f"recompiled {type(m).__name__}")
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_inductor_lora():
    torch._dynamo.reset()
    m = lk.LoRALinear(64, 48, r=8, alpha=16, device=DEVICE, dtype=torch.float32)
    with torch.no_grad():
        m.lora_B.copy_(randn(48, 8, dtype=torch.float32))
    x = randn(3, 37, 64, dtype=torch.float32, requires_grad=True)
    g = randn(3, 37, 48, dtype=torch.float32)
    compiled = torch.compile(m, fullgraph=True)  # default backend: inductor

    def run(fn):
        for t in (x, m.lora_A, m.lora_B):
            t.grad = None
        y = fn(x)
        (y * g).sum().backward()
        return y.detach(), [x.grad.clone(), m.lora_A.grad.clone(), m.lora_B.grad.clone()]

    y_c, grads_c = run(compiled)
    y_e, grads_e = run(m)
    tol = TOLERANCE[torch.float32]
    assert rel_err(y_c, y_e) <= tol
    for gc, ge in zip(grads_c, grads_e):
        assert rel_err(gc, ge) <= tol
    assert m.weight.grad is None
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- Public API

API_NAMES = ("lora_linear", "adapter", "layer_norm", "infonce", "LoRALinear", "BottleneckAdapter",
             "FusedLayerNorm", "InfoNCELoss", "apply_lora", "add_adapters", "ln_tuning", "from_peft",
             "set_backend", "use_backend")


@pytest.mark.parametrize("name", API_NAMES)
def test_public_name_exists(name):
    assert callable(getattr(lk, name, None)), f"lora_kernels.{name} is missing"
    assert name in lk.__all__


# The parameter lists of DESIGN.md's contract (names and defaults).
SIGNATURES = {
    "lora_linear": "(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True)",
    "adapter": "(x, w_down, b_down, w_up, b_up, activation='gelu', scale=1.0)",
    "layer_norm": "(x, weight, bias, eps=1e-05)",
    "infonce": "(image, text, logit_scale, lambda_=0.5, normalize=False)",
}
CTOR_PREFIXES = {  # leading parameters of the constructors, in order, with defaults
    "LoRALinear": [("in_features", None), ("out_features", None), ("r", 8), ("alpha", 16), ("dropout", 0.0),
                   ("bias", True), ("use_rslora", False)],
    "BottleneckAdapter": [("d_model", None), ("bottleneck", 64), ("activation", "gelu"), ("scale", 1.0)],
    "FusedLayerNorm": [("normalized_shape", None), ("eps", 1e-5), ("elementwise_affine", True)],
    "InfoNCELoss": [("lambda_", 0.5), ("normalize", False), ("gather_distributed", False)],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_function_signatures(name):
    assert str(inspect.signature(getattr(lk, name))) == SIGNATURES[name]


@pytest.mark.parametrize("name", sorted(CTOR_PREFIXES))
def test_module_signatures(name):
    params = list(inspect.signature(getattr(lk, name).__init__).parameters.values())[1:]
    got = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got[:len(CTOR_PREFIXES[name])] == CTOR_PREFIXES[name]


def test_lora_linear_api():
    for attr in ("from_linear", "merge", "unmerge"):
        assert callable(getattr(lk.LoRALinear, attr, None)), f"LoRALinear.{attr} is missing"
    params = list(inspect.signature(lk.LoRALinear.from_linear).parameters)
    assert params[:4] == ["linear", "r", "alpha", "dropout"]
    m = lk.LoRALinear(8, 4)
    assert m.merged is False
    assert isinstance(m.weight, nn.Parameter) and m.weight.shape == (4, 8)  # nn.Linear layout
    assert isinstance(m.bias, nn.Parameter) and m.bias.shape == (4,)
    assert lk.LoRALinear(8, 4, bias=False).bias is None
    forward_params = list(inspect.signature(lk.InfoNCELoss.forward).parameters)
    assert forward_params[1:] == ["image_features", "text_features", "logit_scale"]


# ------------------------------------------------------------------------------- Backends

def lora_args():
    return (randn(3, 8, dtype=F64), randn(5, 8, dtype=F64), randn(5, dtype=F64), randn(2, 8, dtype=F64),
            randn(5, 2, dtype=F64), 0.5)


def test_set_backend_torch():
    lk.set_backend("torch")
    assert lk.get_backend() == "torch"
    args = lora_args()
    close64(lk.lora_linear(*args), ref_lora.lora_linear(*args), "lora_linear on the torch backend")
    lk.set_backend("auto")
    assert lk.get_backend() == "auto"


def test_backend_names_ignore_case_and_spaces_as_the_environment_variable_does(monkeypatch):
    lk.set_backend(" TORCH")
    assert lk.get_backend() == "torch"
    with lk.use_backend("Auto "):
        assert lk.get_backend() == "auto"
    lk.set_backend("auto")
    monkeypatch.setattr(backend, "_default", None)
    monkeypatch.setenv(backend.ENV_VAR, " Torch ")
    assert lk.get_backend() == "torch"


def test_set_backend_bogus():
    for name in ("bogus", "", None, 3):
        with pytest.raises(ValueError, match="backend must be one of"):
            lk.set_backend(name)
        with pytest.raises(ValueError, match="backend must be one of"):
            with lk.use_backend(name):
                pass


def test_set_backend_cuda_unavailable_explains():
    reason = backend.why_unavailable("cuda")
    if torch.cuda.is_available() and reason is None:
        lk.set_backend("cuda")  # a GPU machine with the extension built: it must work
        assert lk.get_backend() == "cuda"
        return
    assert reason is not None, "no GPU, yet the cuda backend claims to be available"
    with pytest.raises(lk.BackendUnavailable) as info:
        lk.set_backend("cuda")
    msg = str(info.value)
    assert "cuda" in msg
    assert any(word in msg for word in ("GPU", "extension", "_C")), msg
    assert lk.get_backend() != "cuda"


def test_set_backend_triton_without_gpu_explains(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so triton can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(lk.BackendUnavailable) as info:
        lk.set_backend("triton")
    assert any(word in str(info.value) for word in ("GPU", "TRITON_INTERPRET", "not installed")), str(info.value)


def test_use_backend_restores_previous():
    lk.set_backend("auto")
    with lk.use_backend("torch"):
        assert lk.get_backend() == "torch"
        with lk.use_backend("auto"):
            assert lk.get_backend() == "auto"
        assert lk.get_backend() == "torch"
    assert lk.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="inside"):
        with lk.use_backend("torch"):
            raise RuntimeError("inside")
    assert lk.get_backend() == "auto"


def test_env_var_torch(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert lk.get_backend() == "torch"
    args = lora_args()
    close64(lk.lora_linear(*args), ref_lora.lora_linear(*args), "lora_linear with env backend torch")


def test_env_var_bogus_raises_at_op_call(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    import lora_kernels  # noqa: F401  importing never fails on a bad env value
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        lk.lora_linear(*lora_args())
    lk.set_backend("torch")  # an explicit choice wins over the environment
    lk.lora_linear(*lora_args())


def test_env_var_explicit_unavailable_backend_never_falls_back(monkeypatch):
    if backend.why_unavailable("cuda") is None:
        pytest.skip("the cuda backend is available here")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(lk.BackendUnavailable):
        lk.lora_linear(*lora_args())
