"""CPU simulation of the host arithmetic of csrc/kernels/wgrad.cu (the CUTLASS weight-gradient GEMM,
compile-only here): the split over M, the padded operand with its ones column, the tiles' epilogue
into partials or outputs, the in-order finish and the column-sum partials. The constants are read
from wgrad.cu and cutlass_wgrad_sm80.cuh, so a change there that this replay does not follow
fails here. Python replays the C++, it does not run it: the GPU tests are test_wgrad_cutlass.py."""
import math
import re
from pathlib import Path

import numpy as np
import pytest

KERNELS = Path(__file__).resolve().parents[1] / "csrc" / "kernels"
SRC = (KERNELS / "wgrad.cu").read_text()
GEMM = (KERNELS / "cutlass_wgrad_sm80.cuh").read_text()


def _const(name, text=SRC):
    found = re.findall(rf"\b{name} = (\d+)", text)
    assert found, f"{name} not found"
    return int(found[0])


K_TARGET, K_MIN_KTILES, K_MAX_SPLITS = _const("kTarget"), _const("kMinKTiles"), _const("kMaxSplits")
BW, BK = _const("kBW"), _const("kBK")


def test_tile_constants_match_the_kernel():
    assert (BW, BK) == (_const("BW", GEMM), _const("BK", GEMM)), "wgrad.cu's kBW/kBK differ from the kernel's tile"
    assert "RB <= 16 ? 16 : RB <= 32 ? 32 : 64" in SRC, "rank_tile changed: update this replay"
    assert "M / (16 * RB)" in SRC and "(R + (ones ? 1 : 0) + 7) / 8 * 8" in SRC, "split or padding rule changed"


def cdiv(a, b):
    return -(-a // b)


def rank_tile(rb):
    return 16 if rb <= 16 else 32 if rb <= 32 else 64


def split_m(m, w, rb):
    tiles = cdiv(w, BW) * cdiv(rb, rank_tile(rb))
    kt = max(1, cdiv(m, BK))
    s = cdiv(K_TARGET, max(tiles, 1))
    s = min(s, max(1, kt // K_MIN_KTILES))
    s = min(s, max(1, m // (16 * rb)))
    s = max(1, min(s, K_MAX_SPLITS))
    per = cdiv(kt, s)
    return cdiv(kt, per), per * BK


def prep_rows(m):
    return max(128, (cdiv(m, 256) + 7) // 8 * 8)


SHAPES = [(1, 8, 1), (37, 1024, 8), (4101, 1024, 8), (4101, 1024, 64), (8192, 4096, 16), (65536, 4096, 128),
          (129, 136, 3), (100_000, 8, 200), (512, 1024, 31)]


@pytest.mark.parametrize("m,w,r", SHAPES)
@pytest.mark.parametrize("ones", [False, True])
def test_split_ranges(m, w, r, ones):
    """Every row in exactly one split, in order; whole 64-row k-tiles except the last split's end;
    no empty split; the documented bounds on S hold."""
    rb = (r + ones + 7) // 8 * 8
    s, chunk = split_m(m, w, rb)
    assert chunk % BK == 0 and 1 <= s <= K_MAX_SPLITS
    ranges = [(z * chunk, min(m, (z + 1) * chunk)) for z in range(s)]
    assert ranges[0][0] == 0 and ranges[-1][1] == m
    assert all(a < b for a, b in ranges), "an empty split"
    assert all(ranges[z][1] == ranges[z + 1][0] for z in range(s - 1))
    if s > 1:
        assert chunk // BK >= K_MIN_KTILES
        assert 8 * s * w * (r + ones) <= 2 * m * w / 4, "partials cost more than a quarter of A's bytes"
        assert s * cdiv(w, BW) * cdiv(rb, rank_tile(rb)) <= K_TARGET + cdiv(w, BW) * cdiv(rb, rank_tile(rb))
    # the last split's residue, which the collective reads first: (rows - BK·⌈rows/BK⌉) in (-BK, 0]
    rows = ranges[-1][1] - ranges[-1][0]
    assert -BK < rows - BK * cdiv(rows, BK) <= 0


def simulate(a, src, scale, ones_scale, ones, colsum, transpose, act=lambda v: v, dtype=np.float16):
    """wgrad(): operand kernel, tiles (per split, per 128 × RT tile), finish; fp32 like the GPU, with
    the 16-bit operands rounded as the kernels round them."""
    m, w = a.shape
    r = src.shape[1]
    rb, nc = (r + ones + 7) // 8 * 8, r + ones
    b = np.zeros((m, rb), np.float32)
    b[:, :r] = act(src)
    if ones:
        b[:, r] = 1.0
    b = b.astype(dtype).astype(np.float32)
    s, chunk = split_m(m, w, rb)
    rt = rank_tile(rb)
    out = np.full((r, w) if transpose else (w, r), np.nan, np.float32)
    ones_out = np.full(w, np.nan, np.float32)
    part = np.full((s, w, nc), np.nan, np.float32) if s > 1 else None
    for z in range(s):
        m0, m1 = z * chunk, min(m, (z + 1) * chunk)
        for tw in range(cdiv(w, BW)):
            for tr in range(cdiv(rb, rt)):
                acc = a[m0:m1, tw * BW:(tw + 1) * BW].T @ b[m0:m1, tr * rt:(tr + 1) * rt]
                for i, j in np.ndindex(*acc.shape):
                    ww, rr = tw * BW + i, tr * rt + j
                    if ww >= w or rr >= nc:
                        continue
                    if part is not None:
                        part[z, ww, rr] = acc[i, j]
                    elif rr < r:
                        out[(rr, ww) if transpose else (ww, rr)] = scale * acc[i, j]
                    else:
                        ones_out[ww] = ones_scale * acc[i, j]
    if part is not None:
        total = np.zeros((w, nc), np.float32)
        for z in range(s):  # in order
            total += part[z]
        out[...] = scale * (total[:, :r].T if transpose else total[:, :r])
        if ones:
            ones_out[:] = ones_scale * total[:, r]
    sums = None
    if colsum:
        rows = prep_rows(m)
        blocks = [src[i:i + rows].sum(0, dtype=np.float32) for i in range(0, m, rows)]
        sums = np.zeros(r, np.float32)
        for p in blocks:
            sums += p
    return out, (ones_out if ones else None), sums


@pytest.mark.parametrize("m,w,r", [(37, 136, 8), (1100, 264, 16), (2000, 128, 3), (700, 8, 64), (4101, 256, 33)])
def test_simulated_wgrad_matches_reference(m, w, r):
    """LoRA's dB with db (ones column, [W, R] output) and the adapter's dW_down with db_down
    (transposed [R, W] output, column sums): every output element written once, none left NaN, and
    the float64 product within the fp16 tolerance."""
    rng = np.random.default_rng(m * 7 + w + r)
    g = rng.standard_normal((m, w)).astype(np.float16).astype(np.float32)
    u = rng.standard_normal((m, r)).astype(np.float32)
    dB, db, _ = simulate(g, u, 0.75, 1.0, ones=True, colsum=False, transpose=False)
    u16 = u.astype(np.float16).astype(np.float64)
    ref = 0.75 * g.astype(np.float64).T @ u16
    assert not np.isnan(dB).any() and not np.isnan(db).any()
    assert np.linalg.norm(dB - ref) / np.linalg.norm(ref) < 1e-5
    assert np.allclose(db, g.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3)
    dW, _, db_d = simulate(g, u, 1.0, 0.0, ones=False, colsum=True, transpose=True)
    assert not np.isnan(dW).any()
    assert np.linalg.norm(dW - ref.T / 0.75) / np.linalg.norm(ref) < 1e-5
    assert np.allclose(db_d, u.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3)


def test_several_splits_are_simulated():
    """The shapes above reach the partials and the finish (not only the direct epilogue)."""
    assert split_m(1100, 264, 24)[0] > 1 and split_m(4101, 256, 40)[0] > 1 and split_m(37, 136, 16)[0] == 1
    assert math.prod(split_m(2000, 128, 8)) >= 2000
