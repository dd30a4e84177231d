"""Builds the optional CUDA extension ``lora_kernels._C``; otherwise a pure-Python install.

LORA_KERNELS_BUILD_CUDA=1 forces the build (failing loudly), =0 skips it; unset, it is built
when torch has CUDA, nvcc is found, the CUDA sources exist and CUTLASS's headers are found
(cutlass_include below). TORCH_CUDA_ARCH_LIST is honoured; unset, it is "8.0;9.0a" when no GPU
is visible, else the visible GPUs' capabilities with 9.0 built as 9.0a (wgmma/TMA need it).
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


def cutlass_include(root=None):
    """The CUTLASS/CuTe include folder for the CUDA build, or None. In this order: env
    LORA_KERNELS_CUTLASS_INCLUDE (alone, when set), the installed nvidia-cutlass wheel
    (cutlass_library/source/include, found without importing it), the repo's ignored
    .cutlass/include (`make cutlass-headers`; GPU machines without network carry it), root being
    the repo (default: this file's folder). benchmarks/cuda_ptx_check.py runs this very function,
    read from this file (setup.py cannot be imported: it runs setup()), hence the local imports."""
    import importlib.util
    import os

    root = root or os.path.dirname(os.path.abspath(__file__))

    def has_cute(d):
        return bool(d) and os.path.isfile(os.path.join(d, "cute", "tensor.hpp"))

    env = os.environ.get("LORA_KERNELS_CUTLASS_INCLUDE")
    if env:
        return os.path.abspath(env) if has_cute(env) else None
    spec = importlib.util.find_spec("cutlass_library")
    wheel = [os.path.join(p, "source", "include") for p in (spec.submodule_search_locations or [])] if spec else []
    return next((os.path.abspath(d) for d in [*wheel, os.path.join(root, ".cutlass", "include")] if has_cute(d)),
                None)


def arch_list(capabilities):
    """TORCH_CUDA_ARCH_LIST when unset: sm_80 and sm_90a without a visible GPU, else the visible
    capabilities, 9.0 as 9.0a (the LoRA forward's wgmma/TMA kernel exists only there). No plain 9.0
    beside 9.0a: both are sm_90 cubins, and the host could not tell which one the driver loaded."""
    if not capabilities:
        return "8.0;9.0a"
    return ";".join(sorted({"9.0a" if c == (9, 0) else f"{c[0]}.{c[1]}" for c in capabilities}))


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
    cutlass = cutlass_include()
    if cutlass is None:
        why = ("no CUTLASS headers: pip install 'nvidia-cutlass>=4.2,<5' (the [cuda] extra), set "
               "LORA_KERNELS_CUTLASS_INCLUDE to a folder holding cute/tensor.hpp, or run `make cutlass-headers` "
               "where the wheel is installed (it copies them to .cutlass/include)")
        if flag == "1":
            raise SystemExit(f"cannot build lora_kernels._C: {why}")
        print(f"lora_kernels: skipping the CUDA extension, {why}")
        return {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list(caps)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
    # The host launches cutlass_sm90.cuh's kernel (LoRA's, the adapter's) only when this build holds its sm_90a code.
    sm90a = ["-DLK_BUILT_SM90A"] if any(a.startswith("9.0a") for a in archs) and not any(
        a.split("+")[0] == "9.0" for a in archs) else []
    ext = CUDAExtension(
        "lora_kernels._C", sources, include_dirs=[os.path.abspath("csrc/kernels"), cutlass],
        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS + sm90a})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_build())
