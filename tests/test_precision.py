"""Low precision no worse than PyTorch's own: in fp16 and bf16 each op's output and gradients
must be within 2× of the error that eager PyTorch, run in the same dtype, makes on the same
inputs (flash-attention's rule). Both errors are measured against the float64 reference.

The fixed tolerances of the op tests bound the error; this rule catches a kernel that is
needlessly less accurate than the code it replaces (a 16-bit accumulator, a lost fp32 upcast),
even when it stays inside them. Sizes are large enough for accumulation errors to show.
"""
import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels.backend import interpreting
from lora_kernels.ops import adapter as adapter_op, infonce as infonce_op, layer_norm as layer_norm_op
from lora_kernels.ops import lora as lora_op
from lora_kernels.reference import adapter as adapter_ref, infonce as infonce_ref
from lora_kernels.reference import layer_norm as layer_norm_ref, lora as lora_ref

from conftest import DEVICE, backends_for, randn, rel_err

LOW = (torch.float16, torch.bfloat16)
# Below about half a unit roundoff the comparison is noise: rounding the output alone costs that.
FLOOR = {torch.float16: 2.0**-12, torch.bfloat16: 2.0**-9}


def _lora():
    m, k, n, r = 67, 768, 96, 16
    args = [randn(m, k, requires_grad=True), randn(n, k, scale=k**-0.5), randn(n),
            randn(r, k, requires_grad=True, scale=k**-0.5), randn(n, r, requires_grad=True, scale=r**-0.5)]
    s = 2.0

    def eager(x, w, b, a, bb):
        return F.linear(x, w, b) + s * F.linear(F.linear(x, a), bb)
    return (lambda *t: lk.lora_linear(*t, scaling=s), eager, lambda *t: lora_ref.lora_linear(*t, s), args)


def _adapter():
    m, d, h = 67, 768, 48
    args = [randn(m, d, requires_grad=True), randn(h, d, requires_grad=True, scale=d**-0.5),
            randn(h, requires_grad=True), randn(d, h, requires_grad=True, scale=h**-0.5),
            randn(d, requires_grad=True)]

    def eager(x, wd, bd, wu, bu):
        return x + 0.5 * F.linear(F.gelu(F.linear(x, wd, bd)), wu, bu)
    return (lambda *t: lk.adapter(*t, activation="gelu", scale=0.5), eager,
            lambda *t: adapter_ref.adapter(*t, "gelu", 0.5), args)


def _layer_norm():
    m, d = 67, 1000
    args = [randn(m, d, requires_grad=True, scale=3.0), randn(d, requires_grad=True), randn(d, requires_grad=True)]

    def eager(x, w, b):
        return F.layer_norm(x, (d,), w, b, 1e-5)
    return (lambda *t: lk.layer_norm(*t, eps=1e-5), eager, lambda *t: layer_norm_ref.layer_norm(*t, 1e-5), args)


def _infonce():
    n, d = 150, 256
    args = [randn(n, d, requires_grad=True), randn(n, d, requires_grad=True),
            torch.tensor(30.0, dtype=torch.float64, device=DEVICE, requires_grad=True)]

    def eager(image, text, scale):  # open_clip's ClipLoss on normalised features
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        logits = scale * image @ text.T
        labels = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return (lambda *t: lk.infonce(*t, lambda_=0.5, normalize=True), eager,
            lambda *t: infonce_ref.infonce(*t, 0.5, True), args)


CASES = {"lora_linear": (_lora, lora_op.IMPLS), "adapter": (_adapter, adapter_op.IMPLS),
         "layer_norm": (_layer_norm, layer_norm_op.IMPLS), "infonce": (_infonce, infonce_op.IMPLS)}
PARAMS = [(op, b) for op, (_, impls) in CASES.items() for b in backends_for(impls)]


def _run(fn, args, grad):
    """fn's output and the gradients of the arguments that require grad, for upstream ``grad``."""
    args = [a.detach().requires_grad_(a.requires_grad) for a in args]
    out = fn(*args)
    out.backward(grad.to(out.dtype))
    return [out] + [a.grad for a in args if a.requires_grad]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("op,backend", PARAMS)
def test_no_less_accurate_than_eager_pytorch(op, backend, dtype):
    ours, eager, reference, args = CASES[op][0]()
    low = [a.detach().to(dtype).requires_grad_(a.requires_grad) for a in args]
    if op == "infonce":  # the temperature stays an fp32 parameter, as under autocast
        low[2] = args[2].detach().float().requires_grad_(True)
    exact = [a.detach().double().requires_grad_(a.requires_grad) for a in low]
    grad = torch.randn(reference(*exact).shape, dtype=torch.float64, device=DEVICE)

    expected = _run(reference, exact, grad)
    baseline = _run(eager, low, grad)
    with lk.use_backend(backend):
        got = _run(ours, low, grad)

    # Triton's interpreter casts fp32 to bf16 by truncation, not rounding (a GPU rounds), which
    # alone doubles the error of every bf16 store: allow for it there.
    factor = 4 if dtype == torch.bfloat16 and backend == "triton" and interpreting() else 2
    names = ["output"] + [f"grad of argument {i}" for i, a in enumerate(low) if a.requires_grad]
    for name, g, b, e in zip(names, got, baseline, expected):
        ours_err, eager_err = rel_err(g, e), rel_err(b, e)
        bound = max(factor * eager_err, FLOOR[dtype])
        assert ours_err <= bound, (f"{op} on {backend}, {dtype}: {name} has relative error {ours_err:.2e}, "
                                   f"eager PyTorch in the same dtype {eager_err:.2e} (bound {bound:.2e})")
