"""Builds the optional CUDA extension ``lora_kernels._C``; otherwise a pure-Python install.

LORA_KERNELS_BUILD_CUDA=1 forces the build (failing loudly), =0 skips it; unset, it is built
when torch has CUDA, nvcc is found and the CUDA sources exist. TORCH_CUDA_ARCH_LIST is
honoured (default "8.0;9.0" when no GPU is visible).
"""
import glob
import os
import re
import shutil

from setuptools import setup

# nvcc flags of the extension besides torch's own (cpp_extension.COMMON_NVCC_FLAGS). No
# --use_fast_math: it lowers tanhf, logf, sqrtf and fp32 division to approximate instructions
# (tanh.approx.f32 errs by ~2^-11) that the fp32 tolerance (1e-5) rules out; the kernels pick fast
# intrinsics themselves where a 16-bit tolerance allows. benchmarks/cuda_ptx_check.py (CI) compiles
# with exactly this list, read from here, and checks the PTX.
NVCC_FLAGS = ["-O3", "-lineinfo"]


def _with_headers(root):
    return root if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) else None


def pin_cuda_home():
    """Points CUDA_HOME at a toolkit that has headers before torch guesses one.

    torch takes the folder above `which nvcc`; when nvcc on the PATH is a wrapper script (say
    /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc) that guess is /usr/local and the
    build dies on a missing cuda_runtime.h.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    versioned = sorted(glob.glob("/usr/local/cuda-*"), reverse=True,  # newest first: 13.0 before 9.2
                       key=lambda d: [int(n) for n in re.findall(r"\d+", os.path.basename(d))])
    guesses = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
               "/usr/local/cuda", *versioned]
    found = next((g for g in map(_with_headers, guesses) if g), None)
    if found:
        os.environ["CUDA_HOME"] = found


def cuda_build():
    flag = os.environ.get("LORA_KERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        return {}
    sources = (sorted(glob.glob("csrc/kernels/*.cu")) + sorted(glob.glob("csrc/glue/*.cpp"))
               + glob.glob("csrc/bindings.cpp"))
    pin_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise SystemExit("LORA_KERNELS_BUILD_CUDA=1 needs torch importable at build time "
                             "(pip install --no-build-isolation ...)")
        return {}
    ready = torch.version.cuda is not None and CUDA_HOME is not None and "csrc/bindings.cpp" in sources
    if not ready:
        if flag == "1":
            raise SystemExit(f"cannot build lora_kernels._C: torch CUDA={torch.version.cuda}, "
                             f"CUDA_HOME={CUDA_HOME}, sources={sources}")
        return {}
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "lora_kernels._C", sources, include_dirs=[os.path.abspath("csrc/kernels")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_build())
