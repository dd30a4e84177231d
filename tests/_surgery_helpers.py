"""Helpers shared by the surgery tests on model families and on PEFT's switches."""
import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.surgery import AdapterAfter, LoRAMultiheadAttention

LORA_MODULES = (lk.LoRALinear, LoRAMultiheadAttention)

TIGHT = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape and torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def perturb(params, scale=0.3, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def inserted(model):
    """{name: [trainable tensors]} of every adapter and LoRA layer in the model."""
    found = {n: list(m.adapter.parameters()) for n, m in model.named_modules() if isinstance(m, AdapterAfter)}
    found.update({n: [m.lora_A, m.lora_B] for n, m in model.named_modules() if isinstance(m, LORA_MODULES)})
    return found


def check_on_path(model, forward, ref):
    """Zero init = original; perturbed = different; each inserted tensor gets a nonzero gradient."""
    modules = inserted(model)
    assert modules, "surgery inserted nothing"
    assert rel_err(forward(model), ref) <= TIGHT
    perturb([m.adapter.up.weight for m in model.modules() if isinstance(m, AdapterAfter)]
            + [m.lora_B for m in model.modules() if isinstance(m, LORA_MODULES)])
    out = forward(model)
    assert rel_err(out, ref) > 1e-3
    out.mul(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)).sum().backward()
    dead = [f"{n}:{i}" for n, ps in modules.items() for i, p in enumerate(ps)
            if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    return modules


def eval64(model):
    return model.double().eval()


class MHABlock(nn.Module):
    """A pre-norm block as many vision/speech models write it: sequence-first MHA, weights asked for."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(d, 2 * d + 1), nn.GELU(), nn.Linear(2 * d + 1, d)
        self.weights = None

    def forward(self, x):
        h = self.norm1(x)
        out, self.weights = self.self_attn(h, h, h, need_weights=True)
        x = x + out
        return x + self.mlp(self.norm2(x))


def _tokens(batch_first=True):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x if batch_first else x.transpose(0, 1)


def _hf():
    return pytest.importorskip("transformers")


def _ids():
    return torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(1))
