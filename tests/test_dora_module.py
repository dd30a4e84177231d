"""LoRALinear(use_dora=True) / from_linear / apply_lora(use_dora=True): PEFT's DoRA as a module."""
import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.reference import dora as ref

from conftest import DEVICE, assert_close, randn

F64 = torch.float64
FACTORY = {"device": DEVICE, "dtype": F64}


def close64(out, want, what=""):
    assert_close(out, want, F64, what)


def perturb(m):
    """Random lora_B and a magnitude off the row norms, so the DoRA terms are all non-trivial."""
    with torch.no_grad():
        m.lora_B.copy_(randn(*m.lora_B.shape, scale=m.r**-0.5))
        m.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(m.out_features, dtype=F64, device=DEVICE))
    return m


def make_conv1d(nx=19, nf=13):
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(nf, nx).to(**FACTORY)
    with torch.no_grad():
        conv.weight.copy_(randn(nx, nf, scale=nx**-0.5))
        conv.bias.copy_(randn(nf))
    return conv


def test_init_equals_base_and_magnitude_is_row_norm():
    lin = nn.Linear(23, 11).to(**FACTORY)
    m = lk.LoRALinear.from_linear(lin, r=3, alpha=7, use_dora=True)
    assert m.weight is lin.weight and m.use_dora
    close64(m.lora_magnitude_vector, lin.weight.detach().norm(dim=1), "magnitude = ‖W0‖ by rows")
    x = randn(4, 23)
    close64(m(x), lin(x), "DoRA at init equals the base layer")
    fresh = lk.LoRALinear(23, 11, r=3, use_dora=True, **FACTORY)
    close64(fresh.lora_magnitude_vector, fresh.weight.detach().norm(dim=1), "constructor init")


def test_forward_and_grads_match_reference():
    m = perturb(lk.LoRALinear(29, 17, r=3, alpha=5, dropout=0.0, use_dora=True, **FACTORY))
    x = randn(2, 3, 29, requires_grad=True)
    y = m(x)
    params = [x, m.lora_A, m.lora_B, m.lora_magnitude_vector]
    refs = [t.detach().clone().requires_grad_() for t in params]
    want = ref.dora_linear(refs[0], m.weight, m.bias, refs[1], refs[2], refs[3], m.scaling)
    close64(y, want, "forward")
    g = randn(*y.shape)
    y.backward(g)
    want.backward(g)
    for p, r in zip(params, refs):
        close64(p.grad, r.grad, "grad")
    assert m.weight.grad is None and m.bias.grad is None


def test_state_dict_key_and_repr():
    m = lk.LoRALinear(8, 4, r=2, use_dora=True)
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_magnitude_vector"}
    assert m.lora_magnitude_vector.shape == (4,) and m.lora_magnitude_vector.requires_grad
    assert "use_dora=True" in repr(m)
    assert "lora_magnitude_vector" not in lk.LoRALinear(8, 4, r=2).state_dict()


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(layout):
    if layout == "linear":
        m = perturb(lk.LoRALinear(29, 17, r=3, alpha=5, use_dora=True, **FACTORY))
    else:
        conv = make_conv1d(29, 17)
        m = perturb(lk.LoRALinear.from_linear(conv, r=3, alpha=5, use_dora=True))
        assert m.fan_in_fan_out and m.weight is conv.weight
    x = randn(2, 3, 29)
    y0 = m(x).detach()
    w0 = m.base_weight().detach().clone()
    delta = m.scaling * m.lora_B.detach() @ m.lora_A.detach()
    c = m.lora_magnitude_vector.detach() / torch.linalg.norm(w0 + delta, dim=1)
    m.merge()
    assert m.merged
    close64(m.base_weight(), c[:, None] * (w0 + delta), "merged weight = c ⊙ (W0 + s·BA)")
    close64(m(x), y0, "output after merge")
    m.merge()
    close64(m(x), y0, "merge is idempotent")
    m.unmerge()
    assert not m.merged
    close64(m.base_weight(), w0, "weight after unmerge")
    close64(m(x), y0, "output after unmerge")


def test_conv1d_forward():
    conv = make_conv1d()
    m = perturb(lk.LoRALinear.from_linear(conv, r=3, alpha=5, use_dora=True))
    x = randn(2, 19)
    want = ref.dora_linear(x, conv.weight.T, conv.bias, m.lora_A, m.lora_B, m.lora_magnitude_vector, 5 / 3)
    close64(m(x), want, "Conv1D layout")


def test_apply_lora_use_dora_trains_lora_and_magnitude_only():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)).to(**FACTORY)
    x = randn(5, 12)
    before = model(x).detach()
    lk.apply_lora(model, ["0", "2"], r=2, alpha=4, use_dora=True)
    assert all(isinstance(model[i], lk.LoRALinear) and model[i].use_dora for i in (0, 2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{k}" for i in (0, 2) for k in ("lora_A", "lora_B", "lora_magnitude_vector")}
    close64(model(x), before, "apply_lora(use_dora=True) at init equals the base model")
