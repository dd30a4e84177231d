"""Symmetric InfoNCE (CLIP loss) of image, text [N, d] with a learnable logit scale.

Providers: lk-<backend> (``lk.infonce``: tiled, the N×N logits never stored), eager (open_clip's
ClipLoss: both logit matrices, two cross-entropies) and, on a GPU, compile (torch.compile of
eager). Modes: fwd (no_grad), bwd (d image, d text, d logit_scale of one recorded forward),
fwd+bwd. ``peak_extra_mib`` (GPU) is the memory one call allocates beyond its inputs: O(N²)
for eager, O(N·d) for a tiled kernel. Eager runs out of memory at large N: recorded as "OOM".
"""
import pytest
import torch
import torch.nn.functional as F

import floors
from lk_bench import SHAPES, Case, compiled, default_dtype, providers, randn, rows, run_row, step
from lora_kernels.ops.infonce import IMPLS

import lora_kernels as lk

if SHAPES == "full":
    SHAPE_LIST = [dict(N=n, d=d) for n in (4096, 16384, 65536, 262144) for d in (512, 768)]
elif SHAPES == "default":  # the targets
    SHAPE_LIST = [dict(N=n, d=512) for n in (16384, 65536)]
else:  # CPU: tiny
    SHAPE_LIST = [dict(N=256, d=64)]

LOGIT_SCALE = 1 / 0.07  # CLIP's initial exp(log(1/τ))
PROVIDERS = providers(IMPLS)
ROWS = rows(SHAPE_LIST, [default_dtype()], floors.MODES, PROVIDERS)


def eager_clip_loss(image, text, logit_scale):
    """open_clip's ClipLoss (one rank): logits both ways, mean of the two cross-entropies."""
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logit_scale * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def build(shape, dtype, mode, provider):
    n, d = shape["N"], shape["d"]
    train = mode != "fwd"
    image = F.normalize(randn(n, d, dtype=torch.float32), dim=-1).to(dtype).requires_grad_(train)
    text = F.normalize(randn(n, d, dtype=torch.float32), dim=-1).to(dtype).requires_grad_(train)
    logit_scale = torch.tensor(LOGIT_SCALE, device=image.device, requires_grad=train)
    inputs = [image, text, logit_scale]
    if provider == "eager":
        forward = eager_clip_loss
    elif provider == "compile":
        forward = compiled(eager_clip_loss)
    else:
        forward = lambda image, text, scale: lk.infonce(image, text, scale)  # noqa: E731
    return Case(step(mode, forward, inputs, inputs), floors.infonce(n, d, mode, dtype))


@pytest.mark.parametrize("shape, dtype, mode, provider", ROWS)
def test_infonce(benchmark, shape, dtype, mode, provider):
    cost = floors.infonce(shape["N"], shape["d"], mode, dtype)
    run_row(benchmark, "infonce", shape, dtype, mode, provider, build, cost)
