"""Builds the optional CUDA extension ``lora_kernels._C``; otherwise a pure-Python install.

LORA_KERNELS_BUILD_CUDA=1 forces the build (failing loudly), =0 skips it; unset, it is built
when torch has CUDA, nvcc is found and the CUDA sources exist. TORCH_CUDA_ARCH_LIST is
honoured (default "8.0;9.0" when no GPU is visible).
"""
import glob
import os

from setuptools import setup


def cuda_build():
    flag = os.environ.get("LORA_KERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        return {}
    sources = sorted(glob.glob("csrc/kernels/*.cu")) + glob.glob("csrc/bindings.cpp")
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
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_build())
