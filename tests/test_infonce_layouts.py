"""Without a GPU: the index math of csrc/kernels/infonce_mma.cuh (swizzled shared-memory layouts,
the 16-byte groups its loaders write, the TiledMMA C partitions its epilogues use, the resident-X
slot count), checked by a host program built with nvcc against the same CuTe headers
(tests/cuda/infonce_layout_check.cu). Skips where nvcc or the CUTLASS headers are missing."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cutlass_include():
    spec = importlib.util.spec_from_file_location("cuda_ptx_check", ROOT / "benchmarks" / "cuda_ptx_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cutlass_include()


def test_infonce_mma_layouts(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    include = _cutlass_include()
    if include is None:
        pytest.skip("no CUTLASS headers (setup.py's cutlass_include)")
    exe = tmp_path / "infonce_layout_check"
    cmd = ["nvcc", "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'kernels'}", f"-I{include}", "--expt-relaxed-constexpr",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-gencode", "arch=compute_80,code=sm_80", str(ROOT / "tests" / "cuda" / "infonce_layout_check.cu"),
           "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr[-4000:]
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "all checks passed" in done.stdout, done.stdout + done.stderr


def test_infonce_shared_memory_phases_race_free():
    """tests/cuda/infonce_smem_sim.py: the 16-bit InfoNCE kernels' shared-memory phases (cp.async
    stages, resident X, the S tile, the backward's slab) overlap nothing they should not, D = 1..1000.
    Its offsets mirror infonce_mma.cuh by hand: a layout change there must update it."""
    script = ROOT / "tests" / "cuda" / "infonce_smem_sim.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "all phases race-free" in proc.stdout
