"""The ops under torch.autocast: each casts its inputs by the rule of the eager code it replaces
(ops/_autocast.py) and runs with autocast off, so the backends see one dtype, the output has
eager's dtype, and the gradients come back in each input's own dtype."""
import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.ops import _direct, adapter as adapter_op, infonce as infonce_op
from lora_kernels.ops import layer_norm as layer_norm_op, lora as lora_op, rms_norm as rms_norm_op
from lora_kernels.reference import adapter as ref_adapter, infonce as ref_infonce
from lora_kernels.reference import layer_norm as ref_ln, lora as ref_lora, rms_norm as ref_rms

from conftest import DEVICE, TOLERANCE, backends_for, randn, rel_err

LOW = torch.bfloat16
F32 = torch.float32


def autocast():
    return torch.autocast(DEVICE.type, dtype=LOW)


# op -> (x dtype, the call's tensors and kwargs, the float64 meaning, output dtype, tolerance).
# LoRA and InfoNCE compute in the autocast dtype (F.linear, open_clip's image @ text.T);
# the adapter and LayerNorm in x's dtype, fp32 or half.
def _lora(x_dtype):
    args = [randn(2, 5, 24, dtype=x_dtype), randn(16, 24, dtype=F32), randn(16, dtype=F32),
            randn(4, 24, dtype=F32, scale=0.3), randn(16, 4, dtype=F32, scale=0.3)]
    ref = lambda x, w, b, a, bb: ref_lora.lora_linear(x, w, b, a, bb, 0.5)  # noqa: E731
    return lk.lora_linear, args, {"scaling": 0.5}, ref, LOW, TOLERANCE[LOW], (0, 3, 4)


def _adapter(x_dtype):
    args = [randn(7, 24, dtype=x_dtype), randn(6, 24, dtype=F32), randn(6, dtype=F32),
            randn(24, 6, dtype=F32), randn(24, dtype=F32)]
    ref = lambda *a: ref_adapter.adapter(*a, activation="gelu", scale=0.5)  # noqa: E731
    return lk.adapter, args, {"scale": 0.5}, ref, x_dtype, TOLERANCE[x_dtype], (0, 1, 2, 3, 4)


def _layer_norm(x_dtype):
    args = [randn(3, 7, 33, dtype=x_dtype), randn(33, dtype=F32), randn(33, dtype=F32)]
    return lk.layer_norm, args, {}, ref_ln.layer_norm, x_dtype, TOLERANCE[x_dtype], (0, 1, 2)


def _rms_norm(x_dtype):
    args = [randn(3, 7, 33, dtype=x_dtype), randn(33, dtype=F32)]
    ref = lambda x, w: ref_rms.rms_norm(x, w, 1e-6, 1.0)  # noqa: E731
    return lk.rms_norm, args, {"offset": 1.0}, ref, x_dtype, TOLERANCE[x_dtype], (0, 1)


def _infonce(x_dtype):
    args = [randn(9, 16, dtype=x_dtype), randn(9, 16, dtype=F32), torch.tensor(3.0, device=DEVICE)]
    ref = lambda i, t, s: ref_infonce.infonce(i, t, s)  # noqa: E731
    return lk.infonce, args, {}, ref, F32, TOLERANCE[LOW], (0, 1, 2)


CASES = {"lora_linear": (_lora, lora_op.IMPLS), "adapter": (_adapter, adapter_op.IMPLS),
         "layer_norm": (_layer_norm, layer_norm_op.IMPLS), "rms_norm": (_rms_norm, rms_norm_op.IMPLS),
         "infonce": (_infonce, infonce_op.IMPLS)}
PARAMS = [(op, x_dtype, b) for op, (_, impls) in CASES.items() for x_dtype in (F32, LOW) for b in backends_for(impls)]


@pytest.mark.parametrize("path", ["direct", "custom_op"])
@pytest.mark.parametrize("op,x_dtype,backend", PARAMS)
def test_op_under_autocast_matches_float64(monkeypatch, op, x_dtype, backend, path):
    if path == "custom_op":  # forward and backward through the custom ops, as under torch.compile
        monkeypatch.setattr(_direct, "plain", lambda *t: False)
    fn, args, kwargs, ref_fn, out_dtype, tol, grad_of = CASES[op][0](x_dtype)
    args = [a.requires_grad_(i in grad_of) for i, a in enumerate(args)]
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
    with lk.use_backend(backend), autocast():
        out = fn(*args, **kwargs)
        # Backward inside the autocast region too (on CPU it runs on this thread, autocast on).
        grad = torch.randn(out.shape, device=DEVICE, dtype=torch.float64).to(out.dtype)
        out.backward(grad)
    expected = ref_fn(*ref_args)
    expected.backward(grad.double())
    assert out.dtype == out_dtype
    assert rel_err(out, expected) <= tol, f"{op} output under autocast"
    for i in grad_of:
        assert args[i].grad is not None and args[i].grad.dtype == args[i].dtype, f"{op}: grad of argument {i}"
        assert rel_err(args[i].grad, ref_args[i].grad) <= tol, f"{op}: grad of argument {i} under autocast"


def test_modules_under_autocast_have_eager_dtypes():
    """The dtypes eager PyTorch gives in the same places: nn.Linear's, the residual's, nn.LayerNorm's."""
    fused_ln = lk.FusedLayerNorm(24, device=DEVICE)  # x's dtype (torch's CUDA autocast: fp32)
    lora = lk.LoRALinear.from_linear(nn.Linear(24, 16, device=DEVICE), r=4)
    adapter = lk.BottleneckAdapter(24, bottleneck=6, device=DEVICE)
    x32 = randn(3, 24, dtype=F32)
    with autocast():
        x16 = nn.functional.linear(x32, torch.eye(24, device=DEVICE))  # an autocast output: bf16
        assert lora(x32).dtype == nn.functional.linear(x32, lora.weight).dtype == LOW
        for x in (x32, x16):
            assert fused_ln(x).dtype == x.dtype
            assert adapter(x).dtype == (x + adapter.up(adapter.down(x))).dtype
        lora.merge()
        assert lora(x32).dtype == LOW


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_fused_layer_norm_keeps_fp32_parameters_under_half_input(half):
    """nn.LayerNorm takes fp32 γ/β with a half input (the usual mixed-precision set-up); so does
    FusedLayerNorm: the output is half, the parameter gradients fp32 and close to float64's."""
    torch_ln = nn.LayerNorm(37, device=DEVICE)
    with torch.no_grad():
        torch_ln.weight.copy_(randn(37, dtype=F32))
        torch_ln.bias.copy_(randn(37, dtype=F32))
    fused = lk.FusedLayerNorm.from_layer_norm(torch_ln)
    assert isinstance(fused, nn.LayerNorm)
    x = randn(5, 37, dtype=half, requires_grad=True)
    y = fused(x)
    assert y.dtype == half
    g = randn(5, 37, dtype=half)
    y.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    w64, b64 = (p.detach().double().requires_grad_(True) for p in (torch_ln.weight, torch_ln.bias))
    ref = ref_ln.layer_norm(x64, w64, b64)
    ref.backward(g.double())
    assert rel_err(y, ref) <= TOLERANCE[half]
    assert torch_ln.weight.grad.dtype == F32 and rel_err(torch_ln.weight.grad, w64.grad) <= TOLERANCE[half]
    assert rel_err(torch_ln.bias.grad, b64.grad) <= TOLERANCE[half]
    assert rel_err(x.grad, x64.grad) <= TOLERANCE[half]


@pytest.mark.parametrize("module", ["lora", "adapter", "layernorm"])
def test_compile_fullgraph_under_autocast(module):
    """torch.compile traces the autocast rule (a per-device query, then casts) without a break."""
    torch._dynamo.reset()
    m = {"lora": lambda: lk.LoRALinear(24, 16, r=4, device=DEVICE),
         "adapter": lambda: lk.BottleneckAdapter(24, bottleneck=6, device=DEVICE),
         "layernorm": lambda: lk.FusedLayerNorm(24, device=DEVICE)}[module]()
    for p in m.parameters():
        p.requires_grad_(True)
    x = randn(3, 24, dtype=LOW if module != "lora" else F32)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with autocast():
        out_c, out_e = compiled(x), m(x)
        grads = [torch.autograd.grad(o.float().sum(), list(m.parameters())) for o in (out_c, out_e)]
    assert out_c.dtype == out_e.dtype
    assert rel_err(out_c, out_e) == 0.0
    for gc, ge in zip(*grads):
        assert gc.dtype == ge.dtype == F32 and rel_err(gc, ge) == 0.0
    torch._dynamo.reset()


def test_float64_is_left_alone_as_autocast_does():
    """Autocast casts float32 and half tensors, never float64: neither do the ops."""
    args = [randn(4, 24), randn(16, 24), randn(16), randn(4, 24), randn(16, 4)]
    with autocast():
        y = lk.lora_linear(*args, scaling=0.5)
        loss = lk.infonce(randn(5, 8), randn(5, 8), 2.0)
    assert y.dtype == loss.dtype == torch.float64
    assert rel_err(y, ref_lora.lora_linear(*args, 0.5)) <= TOLERANCE[torch.float64]
