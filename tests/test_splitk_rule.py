"""Split-K of the CUTLASS GEMMs (csrc/kernels/splitk_rule.h), without a GPU.

The rule and the k-ranges are simulated here in Python, and the simulation is checked two ways
against the C++: its constants are parsed from the header, and the header's functions, compiled
with g++ in a tiny harness, must give the same split counts and ranges. The simulation then
checks what the kernels rely on, for many (M, N, K, K2): no split is empty; the first phase's k
elements are each covered by exactly one split on both kernels (cutlass_sm80.cuh: CUTLASS's
cp.async mainloop on a sub-GEMM whose partial tile comes first; cutlass_sm90.cuh: TMA tiles from
k = 0, zero-filled past K); the partial k-tile and the second phase fall in exactly one split;
the sm_80 mainloop never reads unpredicated past its range; the workspace stays bounded.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "kernels" / "splitk_rule.h"

# The Python mirror of splitk_rule.h.
TILE_M, TILE_N, TILE_K = 128, 128, 64
SPLIT_TARGET, MIN_TILES_PER_SPLIT = 132, 4


def k_tiles(k):
    return -(-k // TILE_K)


def split_count(m, n, k):
    tiles = -(-m // TILE_M) * -(-n // TILE_N)
    s = SPLIT_TARGET // tiles if tiles > 0 else 1
    return max(1, min(s, k_tiles(k) // MIN_TILES_PER_SPLIT))


def split_tiles(nk, splits, s):
    base, extra = divmod(nk, splits)
    return s * base + min(s, extra), base + (s < extra)


def sm80_k_begin(k, t):
    rem = k - TILE_K * (k_tiles(k) - 1)
    return 0 if t == 0 else rem + TILE_K * (t - 1)


# Shapes: M around the tile and the small-M cases the split is for, N of LoRA layers and adapter
# bottlenecks, K with and without a partial k-tile (multiples of 8, as the kernels' callers ask,
# and a few that are not, which the range arithmetic must handle too).
MS = [1, 7, 37, 64, 100, 127, 128, 129, 300, 512, 1000, 4096, 8192]
NS = [8, 64, 96, 520, 1024, 4096, 11008]
KS = [1, 8, 64, 129, 200, 256, 264, 1000, 1024, 1032, 4096, 4104, 11008]


def test_constants_match_header():
    text = HEADER.read_text()
    found = {name: int(value) for name, value in re.findall(r"\b(k\w+) = (\d+)\b", text)}
    assert found.get("kTileM") == TILE_M and found.get("kTileN") == TILE_N and found.get("kTileK") == TILE_K, found
    assert found.get("kSplitTarget") == SPLIT_TARGET and found.get("kMinTilesPerSplit") == MIN_TILES_PER_SPLIT, found


def test_header_matches_simulation(tmp_path):
    """splitk_rule.h's functions, compiled by g++, against the Python mirror above."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to compile splitk_rule.h (the constants test still compares the header)")
    cases = [(m, n, k) for m in MS for n in NS for k in KS]
    ranges = [(nk, s) for nk in (1, 2, 5, 16, 17, 64, 65, 172) for s in range(1, min(nk, 20) + 1)]
    harness = tmp_path / "harness.cpp"
    harness.write_text(
        '#include <cstdio>\n#include "splitk_rule.h"\nusing namespace lk::splitk;\nint main() {\n'
        + "".join(f"  std::printf(\"S %d\\n\", split_count({m}, {n}, {k}));\n" for m, n, k in cases)
        + "".join(f"  for (int s = 0; s < {S}; ++s) {{ TileRange r = split_tiles({nk}, {S}, s); "
                  f"std::printf(\"R %d %d\\n\", r.first, r.count); }}\n" for nk, S in ranges)
        + "".join(f"  for (int t = 0; t <= {k_tiles(k)}; ++t) std::printf(\"B %d\\n\", sm80_k_begin({k}, t));\n"
                  for k in KS)
        + "  return 0;\n}\n")
    exe = tmp_path / "harness"
    subprocess.run([cxx, "-std=c++17", "-O0", f"-I{HEADER.parent}", str(harness), "-o", str(exe)], check=True)
    got = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    want = [f"S {split_count(m, n, k)}" for m, n, k in cases]
    want += [f"R {f} {c}" for nk, S in ranges for f, c in (split_tiles(nk, S, s) for s in range(S))]
    want += [f"B {sm80_k_begin(k, t)}" for k in KS for t in range(k_tiles(k) + 1)]
    assert got[:-1] == want


def sm80_loads(k, splits, s):
    """The global k-intervals split s's CUTLASS cp.async mainloop loads (sm80_mma_multistage.hpp):
    the sub-GEMM over [k0, k0 + K_s) shifts its tiles by its residue K_s - 64·⌈K_s/64⌉ <= 0, loads
    tile 0 predicated on k >= 0 and the others unpredicated. Also returns whether an unpredicated
    tile would read outside [0, K_s)."""
    first, count = split_tiles(k_tiles(k), splits, s)
    k0 = sm80_k_begin(k, first)
    k_s = sm80_k_begin(k, first + count) - k0
    residue = k_s - TILE_K * k_tiles(k_s)
    out, overrun = [], False
    for t in range(k_tiles(k_s)):
        lo, hi = residue + TILE_K * t, residue + TILE_K * (t + 1)
        if t == 0:
            lo = max(lo, 0)
        elif lo < 0 or hi > k_s:
            overrun = True
        out.append((k0 + lo, k0 + hi))
    return out, overrun


def sm90_loads(k, splits, s):
    """The global k-intervals split s's TMA loads cover (tiles from k = 0; past K zero-filled)."""
    first, count = split_tiles(k_tiles(k), splits, s)
    return [(TILE_K * t, min(TILE_K * (t + 1), k)) for t in range(first, first + count)]


def covers_once(intervals, k):
    pos = 0
    for lo, hi in sorted(intervals):
        if lo != pos or hi <= lo:
            return False
        pos = hi
    return pos == k


@pytest.mark.parametrize("k2", [0, 16, 64, 80])
def test_split_ranges(k2):
    checked = 0
    for m in MS:
        for n in NS:
            for k in KS:
                S = split_count(m, n, k)
                nk = k_tiles(k)
                assert 1 <= S <= nk
                tiles = -(-m // TILE_M) * -(-n // TILE_N)
                if S > 1:
                    assert S * tiles <= SPLIT_TARGET and S * m * n <= SPLIT_TARGET * TILE_M * TILE_N
                # every S the kernels accept (grid_splits: 1..k_tiles), not only the rule's
                for splits in sorted({S, 1, 2, 3, min(nk, 7), nk}):
                    if splits > nk:
                        continue
                    counts = [split_tiles(nk, splits, s)[1] for s in range(splits)]
                    assert min(counts) >= 1, (k, splits, counts)
                    if splits == S and S > 1:
                        assert min(counts) >= MIN_TILES_PER_SPLIT
                    sm80 = [sm80_loads(k, splits, s) for s in range(splits)]
                    assert not any(over for _, over in sm80), (k, splits)
                    assert covers_once([iv for loads, _ in sm80 for iv in loads], k), (k, splits)
                    sm90 = [sm90_loads(k, splits, s) for s in range(splits)]
                    assert covers_once([iv for loads in sm90 for iv in loads], k), (k, splits)
                    if k % TILE_K:  # the partial tile: first split on sm_80, last on sm_90a
                        partial80 = [s for s, (loads, _) in enumerate(sm80)
                                     if any(hi - lo < TILE_K for lo, hi in loads)]
                        partial90 = [s for s, loads in enumerate(sm90) if any(hi - lo < TILE_K for lo, hi in loads)]
                        assert partial80 == [0] and partial90 == [splits - 1], (k, splits, partial80, partial90)
                    # the second phase in the last split only; producer and consumer counts agree
                    low = [k_tiles(k2) if s == splits - 1 else 0 for s in range(splits)]
                    assert sum(1 for c in low if c) == (1 if k2 else 0)
                    assert all(counts[s] + low[s] >= 1 for s in range(splits))
                    checked += 1
    assert checked > 1000


def test_small_m_gets_splits():
    """The shapes the split is for get more than one split; large M keeps one (today's kernel)."""
    assert [split_count(m, 4096, 4096) for m in (1, 37, 100, 128, 256, 512)] == [4, 4, 4, 4, 2, 1]
    assert split_count(1, 1024, 1024) == 4 and split_count(1, 1024, 4096) == 16
    assert split_count(8192, 4096, 4096) == 1 and split_count(4096, 11008, 4096) == 1
