"""The Triton wrappers' host-side arithmetic (lora_kernels/triton/_common.py) against what it
replaces: triton.cdiv / triton.next_power_of_2, and fp32 rounding as torch does it."""
import math
import random

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402

from lora_kernels.triton import _common  # noqa: E402


def test_cdiv_and_next_pow2_match_triton():
    values = list(range(1, 300)) + [1023, 1024, 1025, 65535, 65536, 65537, 3 << 20, (1 << 31) + 5]
    for n in values:
        assert _common.next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 127, 1024):
            assert _common.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert _common.next_pow2(0) == 1 and _common.cdiv(0, 7) == 0


def _fp32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).to(torch.float32))


def test_split_fp32_rounds_like_torch_and_keeps_the_digits():
    rng = random.Random(0)
    values = [0.0, -0.0, 1.0, 1e-5, 1.0 / 3.0, 2.0 / 0.9, -7.25, 1e-40, 3.4028235e38, 1e30]
    values += [rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 30) for _ in range(500)]
    for v in values:
        hi, lo = _common.split_fp32(v)
        assert hi == _fp32(v), v
        assert lo == _fp32(v - hi), v
        if v != 0.0 and abs(v) > 1e-30:
            assert abs((hi + lo) - v) <= abs(v) * 2.0 ** -46, v  # ~48 bits survive, fp32 alone keeps 24
    for huge in (1e39, -1e300):
        assert _common.as_fp32(huge) == math.copysign(math.inf, huge) == _fp32(huge)
        assert _common.split_fp32(huge) == (math.copysign(math.inf, huge), 0.0)
