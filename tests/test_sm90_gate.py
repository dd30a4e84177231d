"""benchmarks/triton_sm90.py (the sm_90 compile gate CI runs under Triton 3.6) still drives every
launcher with the installed Triton: its --dry-run captures each op's launches on meta tensors and
runs the autotuners' pruners, without compiling anything (a few seconds)."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gate_dry_run_covers_every_launcher():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/triton_sm90.py", "--quick", "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = dict(re.findall(r"^(\w+): (\d+) distinct compiles", proc.stdout, re.M))
    assert set(counts) >= {"lora", "adapter", "layer_norm", "infonce", "rms_norm", "dora", "lora_multi"}, proc.stdout
    assert "not gated" not in proc.stderr, proc.stderr
    assert all(int(n) > 0 for n in counts.values()), counts


def _tiles(configs, out, red):
    return [(c.kwargs["BLOCK_M"], c.kwargs[out], c.kwargs[red], c.num_warps, c.num_stages) for c in configs]


@pytest.mark.parametrize("m", [1, 64, 8192])
def test_lora_multi_fp32_gemms_choose_among_their_own_tiles(m):
    """fp32 IEEE launches (CUDA cores) of lora_multi's GEMMs keep only the tiles measured clean for
    them (lora_multi_configs._FMA_TILES), first in that list's order (LORA_KERNELS_AUTOTUNE=0 runs the
    first); 16-bit launches never see a tile that is only in the fp32 list."""
    import torch

    from lora_kernels.triton import lora_multi_configs as cfg

    def named(dtype, first):
        return {first: torch.empty(1, dtype=dtype, device="meta"), "M_BUCKET": m, "N": 4096, "K": 4096,
                "stride_gm": 4096, "stride_gn": 1, "stride_wn": 4096, "stride_wk": 1, "stride_xm": 4096,
                "stride_xk": 1}

    for name, configs, prune, first, out, red in (
            ("dx", cfg._dx_configs, cfg._dx_prune, "G", "BLOCK_K", "BLOCK_N"),
            ("fwd", cfg._fwd_configs, cfg._fwd_prune, "X", "BLOCK_N", "BLOCK_K")):
        fma_tiles, tc_tiles = cfg._FMA_TILES[name], cfg._GEMM_TILES
        for dropout in (False, True):
            kw = dict(HAS_DROPOUT=dropout, BLOCK_R=16, FUSED=False)
            kept = _tiles(prune(configs, named(torch.float32, first), PRECISION="ieee", **kw), out, red)
            assert kept and set(kept) <= set(fma_tiles), (name, m, kept)
            assert kept == sorted(kept, key=fma_tiles.index), (name, m, kept)
            for dt in (torch.float16, torch.bfloat16):
                half = _tiles(prune(configs, named(dt, first), PRECISION="ieee", **kw), out, red)
                assert half and set(half) <= set(tc_tiles), (name, m, dt, half)
