"""Static gates for the CUDA kernels, no GPU needed (CI runs it from .ci/run).

Compiles every csrc/kernels/*.cu once, with the flags the extension ships (setup.py's
NVCC_FLAGS and its CUTLASS include folder, read from the file so they cannot drift, plus torch's
COMMON_NVCC_FLAGS) for sm_80 and sm_90a (setup.py's default arch list), keeping nvcc's PTX, then
checks:

  approx  no fp32/fp64 kernel's PTX holds an approximate instruction that the fp32 tolerance
          (1e-5 relative) rules out. Allowed there are only the approximations that precise
          libdevice math uses internally, followed by exact range reduction or Newton steps:
          ex2.approx.f32 (expf, tanhf, erff), rcp.approx (division and tanhf seeds) and
          rsqrt.approx (rsqrtf, 2 ulp; __frsqrt_rn's seed). Forbidden: tanh/sin/cos/lg2/sqrt
          .approx and div.approx/div.full (what --use_fast_math produces). Not caught: an explicit
          __expf in fp32 code (its ex2.approx looks like the one inside precise tanhf); the
          kernels use it only under `if constexpr` for 16-bit types (infonce_detail.cuh's ex()).
          16-bit kernels (a __half or __nv_bfloat16 in the kernel's name) may use any: their
          tolerances (3e-3, 2e-2) are 100x looser, and each use is justified where it is made.
  spills  ptxas -v reports no spill stores or loads in any 16-bit or fp32 function (fp64, the
          gradcheck type, is reported but not gated), except the builds KNOWN_SPILLS lists with
          the reason; a listed build that stops spilling fails too, so the list only shrinks.
  tensor  the SASS of every 16-bit GEMM-class kernel (the GEMMs of lora_gemm.cu and adapter_gemm.cuh, the
          single-pass kernels of adapter_fused.cu (forward and backward) and lora_fused.cu, the S
          tiles of infonce_*.cu, cutlass_sm80.cuh's CUTLASS kernels for LoRA (lora_sm80.cu) and the adapter
          (adapter_sm80.cu), one-split and split-K, cutlass_wgrad_sm80.cuh's weight-gradient GEMM
          (wgrad_sm80_*.cu)) holds HMMA instructions, on sm_80 and on sm_90a (cutlass_sm80_[splitk_]kernel,
          wgrad_sm80_kernel: sm_80 only); cutlass_sm90.cuh's wgmma kernels (lora_sm90.cu, adapter_sm90.cu)
          and cutlass_wgrad_sm90.cuh's (wgrad_sm90_*.cu) hold HGMMA on sm_90a. Those compile to empty
          bodies for the other target, which the host never launches. The split-K finish kernel
          (cutlass_splitk.cuh) is memory-bound: not tensor-checked. cuobjdump from the triton wheel, or
          the toolkit's.

Usage: python benchmarks/cuda_ptx_check.py [-j JOBS] [--keep DIR] [FILE.cu ...]
       python benchmarks/cuda_ptx_check.py --cutlass-include   (prints setup.py's CUTLASS folder)
The nvcc time is printed; it replaces the plain compile check .ci/run used to run (same
files, same two targets), so CI compiles each kernel once.
"""
import argparse
import ast
import concurrent.futures
import os
import shutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("80", "90a")
# Kernels whose 16-bit instantiations must run on tensor cores (demangled-name patterns).
GEMM_CLASS = re.compile(r"\bgemm_kernel<|infonce_detail::(?:fwd|grad)_kernel<|\bfused_fwd_kernel<|\blora_fused_kernel<"
                        r"|\bfused_bwd_kernel<|\bcutlass_sm80(?:_splitk)?_kernel<|\bwgrad_sm80_kernel<")
# wgmma kernels: HGMMA on sm_90a; their other builds are empty bodies the host never launches.
WGMMA_CLASS = re.compile(r"\bcutlass_sm90(?:_splitk)?_kernel<|\bwgrad_sm90_kernel<")
# mma.sync kernels that sm_90a code leaves empty (the wgmma kernel replaces them there).
NOT_ON_SM90A = re.compile(r"\bcutlass_sm80(?:_splitk)?_kernel<|\bwgrad_sm80_kernel<")
# (arch, pattern of the demangled name, why not fixed yet). CUDA 13.0's ptxas, sm_80 only.
_ADAPTER_WHY = ("__launch_bounds__(256, 2) caps adapter_gemm.cuh's GEMM at 128 registers; (256, 1) removes "
                "these spills but lets most 16-bit adapter GEMMs take 133-166 registers on sm_80, one "
                "block per SM instead of two. Left to the GEMM rewrite of issue 18 Part 2")
KNOWN_SPILLS = [
    ("sm_80", r"gemm_kernel<[^<]*Tile<128, 16, 8, 1, 8, 1>, [^<]*DownFwd<__half> >", _ADAPTER_WHY),
    ("sm_80", r"gemm_kernel<[^<]*Tile<128, 16, 8, 1, 8, 1>, [^<]*WuBwd<__nv_bfloat16> >", _ADAPTER_WHY),
    ("sm_80", r"gemm_kernel<[^<]*Tile<64, 64, 4, 4, 4, 2>, [^<]*DhBwd<__half> >", _ADAPTER_WHY),
]
FORBIDDEN = re.compile(r"\b(?:(?:tanh|sin|cos|lg2|sqrt)\.approx|div\.(?:approx|full))[.\w]*")


def cutlass_include():
    """setup.py's cutlass_include(), run from its source (setup.py runs setup() on import)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "cutlass_include"]
    if not found:
        sys.exit("setup.py defines no cutlass_include()")
    namespace = {"__file__": str(ROOT / "setup.py")}
    exec(compile(ast.Module(found, type_ignores=[]), str(ROOT / "setup.py"), "exec"), namespace)
    return namespace["cutlass_include"]()


def shipped_flags():
    """setup.py's NVCC_FLAGS (parsed, not executed: setup.py runs setup() on import), its CUTLASS
    include folder and the define it passes with sm_90a, and torch's COMMON_NVCC_FLAGS, which
    CUDAExtension adds (no implicit half conversions...)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    flags = next((ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets)), None)
    if flags is None:
        sys.exit("setup.py defines no module-level NVCC_FLAGS list")
    include = cutlass_include()
    if include is None:
        sys.exit("no CUTLASS headers (setup.py's cutlass_include): pip install 'nvidia-cutlass>=4.2,<5'")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return ["-std=c++17", *flags, f"-I{include}", "-DLK_BUILT_SM90A", *COMMON_NVCC_FLAGS]


def compile_one(src, out_dir, flags):
    """nvcc -c for sm_80 and sm_90a, keeping the PTX and cubins in out_dir/<stem>/;
    returns (src, seconds, ptxas -v output)."""
    keep = out_dir / src.stem
    keep.mkdir(parents=True, exist_ok=True)
    gencode = [a for arch in ARCHS for a in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    cmd = ["nvcc", "-c", str(src), "-o", str(keep / f"{src.stem}.o"), f"-I{ROOT / 'csrc' / 'kernels'}",
           *gencode, *flags, "--keep", "--keep-dir", str(keep), "-Xptxas", "-v"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return src, seconds, done.stderr


HEADER = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)", re.M)


def functions(ptx):
    """{mangled name: body} of every .entry/.func in a PTX file."""
    heads = list(HEADER.finditer(ptx))
    return {h.group(1): ptx[h.end():(heads[i + 1].start() if i + 1 < len(heads) else len(ptx))]
            for i, h in enumerate(heads)}


def demangle(names):
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def is_16bit(demangled):
    return "__half" in demangled or "__nv_bfloat16" in demangled


def approx_problems(body):
    """The approximations in one function body that fp32/fp64 code must not hold."""
    return [m.group(0) for m in FORBIDDEN.finditer(body)]


def precision(demangled):
    if is_16bit(demangled):
        return "16-bit"
    return "fp64" if "double" in demangled and "float" not in demangled else "fp32"


def check_spills(ptxas_logs):
    """ptxas -v: (functions seen, failures, fp64 functions that spill)."""
    spills, regs = {}, {}  # (mangled, arch) -> (stores, loads) / registers
    for log in ptxas_logs:
        name = arch = None
        for line in log.splitlines():
            if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line):
                name, arch = m.groups()
            elif m := re.search(r"Function properties for (\S+)", line):
                name = m.group(1)
            elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
                spills[(name, arch)] = (int(m.group(1)), int(m.group(2)))
            elif m := re.search(r"Used (\d+) registers", line):
                regs[(name, arch)] = int(m.group(1))
    names = demangle(sorted({n for n, _ in spills}))
    failures, fp64, known = [], [], set()
    for (name, arch), (stores, loads) in sorted(spills.items(), key=lambda kv: names[kv[0][0]]):
        if stores or loads:
            line = (f"{arch}: {names[name]}: {stores} B spill stores, {loads} B spill loads, "
                    f"{regs.get((name, arch), '?')} registers")
            allowed = [k for k, (a, pattern, _) in enumerate(KNOWN_SPILLS)
                       if a == arch and re.search(pattern, names[name])]
            if precision(names[name]) == "fp64":
                fp64.append(line)
            elif allowed:
                known.update(allowed)
                print(f"  known: {line} ({KNOWN_SPILLS[allowed[0]][2]})")
            else:
                failures.append(line)
    # An entry must still spill only where its kernel was compiled for its arch: a run over a subset
    # of the files (or of the archs) says nothing of the others.
    compiled = {(names[n], a) for n, a in spills}
    failures += [f"KNOWN_SPILLS entry no longer spills, remove it: {a} {p}"
                 for k, (a, p, _) in enumerate(KNOWN_SPILLS)
                 if k not in known and any(arch == a and re.search(p, n) for n, arch in compiled)]
    return len(spills), failures, fp64, len(known)


def cuobjdump():
    """cuobjdump from the toolkit or from the triton wheel (which CI installs)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if os.access(path, os.X_OK) else None


def check_tensor_cores(cubins, tool):
    """(16-bit GEMM-class functions checked, those without HMMA, or HGMMA for the wgmma kernels
    on sm_90a, in their SASS)."""
    bodies = {}
    for cubin in cubins:
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        arch = re.search(r"code for (sm_\d+a?)", sass).group(1)
        for part in re.split(r"^\s*Function : ", sass, flags=re.M)[1:]:
            name, _, body = part.partition("\n")
            bodies[(name.strip(), arch)] = body
    names = demangle(sorted({n for n, _ in bodies}))
    checked, failures = 0, []
    for (name, arch), body in sorted(bodies.items()):
        if not is_16bit(names[name]):
            continue
        if WGMMA_CLASS.search(names[name]):
            if arch == "sm_90a":
                checked += 1
                if not re.search(r"\bHGMMA\.", body):
                    failures.append(f"{arch}: {names[name]} (no HGMMA)")
        elif GEMM_CLASS.search(names[name]) and not (arch == "sm_90a" and NOT_ON_SM90A.search(names[name])):
            checked += 1
            if not re.search(r"\bHMMA\.", body):
                failures.append(f"{arch}: {names[name]}")
    return checked, failures


def check_approx(ptx_files):
    bodies = {}
    for path in ptx_files:
        for name, body in functions(path.read_text()).items():
            bodies.setdefault(name, []).append((path.name, body))
    names = demangle(sorted(bodies))
    failures, wide = [], 0
    for name, where in bodies.items():
        if is_16bit(names[name]):
            continue
        wide += 1
        for file, body in where:
            problems = approx_problems(body)
            if problems:
                failures.append(f"{file}: {names[name]}: {sorted(set(problems))}")
    return wide, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="default: every csrc/kernels/*.cu")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep nvcc's output here (default: a temporary folder)")
    parser.add_argument("--cutlass-include", action="store_true",
                        help="print the CUTLASS include folder setup.py would use, and exit (make cutlass-headers)")
    args = parser.parse_args()
    if args.cutlass_include:
        include = cutlass_include()
        if include is None:
            sys.exit("no CUTLASS headers found: pip install 'nvidia-cutlass>=4.2,<5'")
        print(include)
        return 0
    files = args.files or sorted((ROOT / "csrc" / "kernels").glob("*.cu"))
    flags = shipped_flags()
    print("nvcc flags:", " ".join(flags), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep or Path(tmp)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda f: compile_one(f, out_dir, flags), files))
        for src, seconds, _ in results:
            print(f"nvcc -c {src.name} (sm_{', sm_'.join(ARCHS)}): {seconds:.1f} s")
        print(f"nvcc total: {time.perf_counter() - start:.1f} s wall, {args.jobs} at a time")
        ptx = sorted(out_dir.glob("*/*.ptx"))
        if len(ptx) != len(files) * len(ARCHS):
            sys.exit(f"expected {len(files) * len(ARCHS)} PTX files from nvcc --keep, found {len(ptx)}")
        wide, failures = check_approx(ptx)
        print(f"approx: {wide} fp32/fp64 functions checked, {len(failures)} with forbidden approximations")
        for line in failures:
            print("  " + line)
        seen, spilling, fp64, known = check_spills([log for _, _, log in results])
        print(f"spills: {seen} function builds checked, {len(spilling)} 16-bit/fp32 ones spill besides"
              f" the {known} known above ({len(fp64)} fp64 ones do, not gated)")
        for line in spilling:
            print("  " + line)
        failures += spilling
        tool = cuobjdump()
        if tool is None:
            print("tensor: skipped, no cuobjdump (toolkit or triton wheel)")
        else:
            cubins = sorted(out_dir.glob("*/*.cubin"))
            checked, scalar = check_tensor_cores(cubins, tool)
            print(f"tensor: {checked} 16-bit GEMM-class kernel builds checked, {len(scalar)} without HMMA/HGMMA")
            for line in scalar:
                print("  " + line)
            failures += scalar
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
