#!/usr/bin/env python
"""The sm_90 compile gate: compile lora_kernels' Triton kernels for an H100 on a machine without
a GPU and report what ptxas made of every config the autotuner could pick.

    python benchmarks/triton_sm90.py --quick   # CI (.ci/run): bf16/fp32, the quick shapes
    python benchmarks/triton_sm90.py           # + the default shapes
    python benchmarks/triton_sm90.py --full --markdown benchmarks/results/triton-sm90-3.6.0.md
    python benchmarks/triton_sm90.py --kernel lora_fwd --only-flagged

Run it from the project root with any Python that has torch (CPU is fine) and triton; the
project is imported from the current directory (no install, no .pyc written). CI runs it with
Triton 3.6.0 (the GPU image's version); 3.9.0 works too. Adapted from the session tool
../shared/tools/triton_sm90.py.

How: each op's real launchers (``lora_kernels/triton/<op>.py`` ``forward``/``backward``) run on
``meta`` tensors of the shapes in benchmarks/sm90_shapes.py, with ``JITFunction.run`` and
``Autotuner.run`` patched to record the launch instead of running it, and the launchers' SM-count
hooks (sm90_shapes.SM_HOOKS) patched to an H100's 132. So the constexprs, fixed num_warps and
argument specialisations (pointer alignment, ints divisible by 16 or equal to 1) are exactly the
launcher's. For an autotuned launch, the configs are those the autotuner itself keeps
(``Autotuner.prune_configs``, i.e. the project's early_config_prune, LORA_KERNELS_AUTOTUNE=1);
the first of them is the one LORA_KERNELS_AUTOTUNE=0 runs (marked "*"). Each distinct
(kernel, specialisation, config) is compiled once with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``;
the ptxas bundled in the wheel runs with -v (TRITON_DUMP_PTXAS_LOG), whose log gives registers
and spills; ``metadata.shared`` gives the shared memory; the TTGIR tells how each tl.dot was
lowered (wgmma = ttng.warp_group_dot, mma = mma.sync / nvidia_mma v2, fma = CUDA cores),
cross-checked against the PTX.

Every launcher module of lora_kernels/triton/ (``<op>.py`` with a ``forward``) is picked up; one
without a shape table in sm90_shapes.OPS is listed as not gated (sm90_shapes.py says how to add it).

Internals used (same in Triton 3.6 and 3.9): triton.runtime.jit.create_function_from_signature,
JITFunction._pack_args, Autotuner.prune_configs/.nargs/.keys, knobs TRITON_DUMP_PTXAS_LOG and
TRITON_ALWAYS_COMPILE. Triton 3.9 compiles sm_90 with ptxas 13.x and --regAllocOptLevel=2 (3.6:
ptxas 12.8, default options), which can move a few bytes of spill either way: the gate runs 3.6.

sm90_compile.py compiles the jobs and reads the logs. Table: one row per distinct compile; see
sm90_report.py for the columns and the flags. Exit
status 1 when any compiled config spills registers, asks for more than 227 KB of shared memory,
runs a 16-bit tl.dot off the tensor cores, is a memory-bound kernel held to one block per SM by
its shared memory, or fails to compile; 0 otherwise.

Results are cached per Triton version in --cache-dir (key: Triton's own source hash of the
kernel and its callees, the specialisation and the options), so a rerun recompiles only what
changed; --no-cache forces every compile (CI: a clean machine, nothing cached).
"""
import argparse
import atexit
import glob
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# ------------------------------------------------------------------ environment, before triton
sys.dont_write_bytecode = True               # the checkout stays untouched
os.environ["TRITON_INTERPRET"] = "0"         # the real kernels, not the interpreter's plain ones
os.environ["LORA_KERNELS_AUTOTUNE"] = "1"    # every config the GPU autotuner would try
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"    # ptxas -v log (registers, spills) on stdout
os.environ["TRITON_ALWAYS_COMPILE"] = "1"    # never a Triton cache hit: the log must be printed
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; 1 is the default
# Triton's own artifacts (~1.5 MB a compile, never reused with ALWAYS_COMPILE) go to a folder
# removed at exit; the results worth keeping are cached in --cache-dir.
_MAIN_PID, _TRITON_TMP = os.getpid(), tempfile.mkdtemp(prefix="triton_sm90_")
os.environ["TRITON_CACHE_DIR"] = _TRITON_TMP
atexit.register(lambda: os.getpid() == _MAIN_PID and shutil.rmtree(_TRITON_TMP, ignore_errors=True))

import sm90_report as report  # noqa: E402  (this folder; no triton inside)
import sm90_shapes as shapes  # noqa: E402

DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
DTYPE_SHORT = {}  # torch dtype -> short name, filled once torch is imported


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="the shapes tagged quick (CI)")
    level.add_argument("--full", action="store_true", help="every shape in sm90_shapes.py")
    p.add_argument("--ops", default=None, help="comma-separated subset of the ops (default: all with shapes)")
    p.add_argument("--kernel", default=None, help="only kernels whose name matches this regex (e.g. lora_fwd)")
    p.add_argument("--dtypes", default=None, help="comma-separated of fp16,bf16,fp32,fp64 (default fp16,bf16,fp32; "
                   "--quick: bf16,fp32, fp16 compiles like bf16 and the committed full table has it)")
    p.add_argument("--tf32", action="store_true", help="fp32 GEMMs as with torch.backends.cuda.matmul.allow_tf32")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--json", help="also write every row (and the shapes that use it) here")
    p.add_argument("--markdown", help="also write the summary and the table here")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "triton_sm90", "results"))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--verbose", action="store_true", help="list every shape that uses a row")
    p.add_argument("--dry-run", action="store_true", help="count the distinct compiles and stop")
    p.add_argument("--only-flagged", action="store_true", help="print only rows that are flagged")
    p.add_argument("--all-configs", action="store_true", help="compile every listed config of each autotuned "
                   "launch, the pruners off (to see what they keep out; fails on the spills it finds)")
    return p.parse_args()


ARGS = parse_args()

if not os.path.isdir(os.path.join(os.getcwd(), "lora_kernels", "triton")):
    sys.exit("run this from the project checkout (the folder holding lora_kernels/)")
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from lora_kernels.triton import _common  # noqa: E402
from sm90_compile import BACKEND, run_jobs  # noqa: E402

assert not getattr(_common, "INTERPRET", False), "TRITON_INTERPRET leaked in: the modules hold plain kernels"

DTYPE_SHORT.update({getattr(torch, v): k for k, v in DTYPE_NAMES.items()})
torch.backends.cuda.matmul.allow_tf32 = ARGS.tf32


def launcher_modules():
    """{op: module} for every lora_kernels/triton/<op>.py that defines ``forward`` (kernels and
    config modules, <op>_kernels.py / <op>_configs.py, and _private ones are not launchers)."""
    found = {}
    for path in sorted(glob.glob(os.path.join("lora_kernels", "triton", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name.startswith("_") or name.endswith(("_kernels", "_configs")):
            continue
        module = importlib.import_module(f"lora_kernels.triton.{name}")
        if callable(getattr(module, "forward", None)):
            found[name] = module
    return found


MODULES = launcher_modules()
# The launchers size grids and split reductions by the SM count, and fall back to a handful of
# "programs" off CUDA; give them an H100's (module globals, looked up at call time).
for _module in MODULES.values():
    for _name, _fn in shapes.SM_HOOKS.items():
        if hasattr(_module, _name):
            setattr(_module, _name, _fn)


# ------------------------------------------------------------------ capturing launches
class Capture:
    """Records kernel[grid](*args, **kwargs) calls instead of running them."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        cap = self
        self._jit_run, self._tune_run = JITFunction.run, Autotuner.run

        def jit_run(fn, *args, grid=None, warmup=False, **kwargs):
            cap.launches.append((fn, None, args, kwargs))

        def tune_run(tuner, *args, **kwargs):
            kwargs.pop("grid", None)
            kwargs.pop("warmup", None)
            cap.launches.append((tuner.fn, tuner, args, kwargs))

        JITFunction.run, Autotuner.run = jit_run, tune_run
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._jit_run, self._tune_run


def candidate_configs(tuner, args, kwargs):
    """The configs tuner would benchmark for this launch: its own pruning, as in Autotuner.run.
    With LORA_KERNELS_AUTOTUNE=0 (perf_model, top_k=1) it would run the first of them."""
    if len(tuner.configs) == 1 or ARGS.all_configs:
        return list(tuner.configs)
    tuner.nargs = dict(zip(tuner.arg_names, args))
    try:
        return list(tuner.prune_configs(dict(kwargs)))
    finally:
        tuner.nargs = None


def tune_key(tuner, args, kwargs):
    """The autotuner's cache key for this launch (Autotuner.run): one tuning per distinct key."""
    all_args = {**dict(zip(tuner.arg_names, args)), **kwargs}
    key = [all_args[k] for k in tuner.keys if k in all_args]
    key += [str(a.dtype) for k, a in all_args.items() if k in tuner.arg_names and hasattr(a, "dtype")]
    return (id(tuner), tuple(key))


def config_kwargs(config):
    return dict(config.all_kwargs()) if hasattr(config, "all_kwargs") else {
        **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def scenarios(ops, level, dtypes):
    """(op, shape label, dtype, thunk) for every shape of ``ops`` up to ``level``."""
    upto = shapes.LEVELS[:shapes.LEVELS.index(level) + 1]
    for op in ops:
        run, table = shapes.OPS[op]
        for dt in dtypes:
            for tag, shape in table:
                if tag in upto:
                    yield op, shapes.label(shape), dt, (lambda run=run, m=MODULES[op], dt=dt, s=shape: run(m, dt, **s))


# ------------------------------------------------------------------ compile jobs
_BINDERS = {}
_SHORT = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "BLOCK_R": "BR", "GROUP_M": "G",
          "BLOCK_P": "BP", "BLOCK": "B"}
_HIDDEN = {"ACC", "UPCAST", "PRECISION", "PREC", "num_warps", "num_stages", "num_ctas", "debug",
           "instrumentation_mode", "fpsan_homomorphic_casts"}


def specialise(fn, args, kwargs):
    """(options, signature, constexprs, attrs) exactly as JITFunction.run builds them."""
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    if fn not in _BINDERS:
        _BINDERS[fn] = create_function_from_signature(fn.signature, fn.params, BACKEND)
    bound, spec, opts = _BINDERS[fn](*args, **kwargs)
    return fn._pack_args(BACKEND, kwargs, bound, spec, opts)


def label_of(kwargs, keys):
    parts = []
    for k in keys:
        v = kwargs[k]
        if k in _HIDDEN or v is None or v is False:
            continue
        parts.append(k if v is True else f"{_SHORT.get(k, k)}={v}")
    return " ".join(parts)


def build_jobs(ops, dtypes, level):
    """The distinct compiles, and per (op, shape, dtype) the configs its first call tunes."""
    jobs, by_key, first_call = [], {}, []
    for op_name, shape, dt, run in scenarios(ops, level, dtypes):
        with Capture() as cap:
            run()
        tuned = {}  # autotuner key -> configs timed
        for fn, tuner, args, kwargs in cap.launches:
            if tuner is not None:
                kept = candidate_configs(tuner, args, kwargs)
                configs = [config_kwargs(c) for c in kept]
                tuned.setdefault(tune_key(tuner, args, kwargs), len(kept))
            else:
                configs = [{}]
            for ci, ckw in enumerate(configs):
                full = {**kwargs, **ckw}
                options, signature, constexprs, attrs = specialise(fn, args, full)
                key = hashlib.sha256(repr((
                    triton.__version__, fn.cache_key, sorted(signature.items()),
                    sorted((k, repr(v)) for k, v in constexprs.items()),
                    sorted((k, repr(v)) for k, v in attrs.items()), options.hash(),
                )).encode()).hexdigest()
                dname = DTYPE_SHORT[dt]
                use = f"{shape} [{dname}]"
                default = tuner is not None and ci == 0
                if key in by_key:
                    job = by_key[key]
                    if use not in job["uses"]:
                        job["uses"].append(use)
                    if dname not in job["dtypes"]:
                        job["dtypes"].append(dname)
                    job["default"] = job["default"] or default
                    continue
                job = dict(
                    key=key, op=op_name, kernel=fn.__name__.strip("_").removesuffix("_kernel"),
                    fn=fn, dtype=dname, dtypes=[dname], tuned=tuner is not None, default=default,
                    variant=label_of(kwargs, [k for k in kwargs if k not in ckw]),
                    config=(label_of(ckw, list(ckw)) + " " if ckw else "")
                    + f"w{options.num_warps} s{options.num_stages}" + ("" if ckw else " (fixed)"),
                    precision=str(kwargs.get("PRECISION", kwargs.get("PREC", ""))),
                    src=(signature, constexprs, attrs, options), uses=[use],
                    cost=math.prod(v for k, v in full.items() if k.startswith("B") and isinstance(v, int)
                                   and not isinstance(v, bool)) * options.num_stages,
                )
                job["spec"] = int_specialisation(fn, signature, constexprs, attrs)
                by_key[key] = job
                jobs.append(job)
        first_call.append(dict(op=op_name, shape=shape, dtype=DTYPE_SHORT[dt], tunings=len(tuned),
                               configs=sum(tuned.values())))
    # Rows that differ only in how runtime arguments specialise (an int == 1 becomes a constant,
    # % 16 an alignment hint, a pointer its dtype; the GPU compiles each too) name the arguments
    # that tell them apart.
    groups = {}
    for job in jobs:
        groups.setdefault((job["kernel"], job["variant"], job["config"], job["dtype"]), []).append(job)
    for group in groups.values():
        if len(group) > 1:
            names = [n for n in group[0]["spec"] if len({j["spec"].get(n) for j in group}) > 1]
            for job in group:
                job["variant"] += " [" + " ".join(f"{n}{job['spec'][n]}" or n for n in names) + "]"
    return jobs, first_call


def int_specialisation(fn, signature, constexprs, attrs):
    """{runtime param: how the launch specialised it}: ints "=1" (a constant), "%16" (divisible)
    or ""; pointers their element type, "!" when not 16-byte aligned."""
    spec = {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr:
            continue
        name = fn.arg_names[i]
        kind = signature.get(name, "")
        aligned = any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))
        if kind == "constexpr":
            spec[name] = f"={constexprs.get((i,))}"
        elif kind.startswith("*"):
            spec[name] = kind + ("" if aligned else "!")
        elif kind.startswith("i") or kind.startswith("u"):
            spec[name] = "%16" if aligned else ""
    return spec


def checkout():
    """The commit the kernels came from, "+ uncommitted changes" when they or the gate differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--", "lora_kernels", "benchmarks/triton_sm90.py", "benchmarks/sm90_*.py")
        return f"commit {git('rev-parse', '--short', 'HEAD')}" + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "a checkout without git"


def main():
    if ARGS.ops:
        ops = [o.strip() for o in ARGS.ops.split(",") if o.strip()]
        unknown = set(ops) - (set(shapes.OPS) & set(MODULES))
        if unknown:
            sys.exit(f"unknown op(s) {sorted(unknown)}; choose from {sorted(set(shapes.OPS) & set(MODULES))}")
    else:
        ops = [op for op in shapes.OPS if op in MODULES]
    ungated = sorted(set(MODULES) - set(shapes.OPS))
    if ungated:
        print(f"note: no shapes in benchmarks/sm90_shapes.py for {', '.join(ungated)}: not gated",
              file=sys.stderr)
    ARGS.dtypes = ARGS.dtypes or ("bf16,fp32" if ARGS.quick else "fp16,bf16,fp32")
    dtypes = [getattr(torch, DTYPE_NAMES[d.strip()]) for d in ARGS.dtypes.split(",")]

    t0 = time.time()
    level = "quick" if ARGS.quick else "full" if ARGS.full else "default"
    jobs, first_call = build_jobs(ops, dtypes, level)
    if ARGS.kernel:
        jobs = [j for j in jobs if re.search(ARGS.kernel, j["kernel"])]
    if ARGS.dry_run:
        for op in ops:
            mine = [j for j in jobs if j["op"] == op]
            kernels = sorted({j["kernel"] for j in mine})
            print(f"{op}: {len(mine)} distinct compiles over {', '.join(kernels)}")
        return 0
    try:
        ptxas_version = BACKEND.hash()
    except Exception:  # noqa: BLE001
        ptxas_version = "?"
    ptxas = (re.search(r"release [0-9.]+", ptxas_version) or [ptxas_version])[0]
    versions = f"triton {triton.__version__}, torch {torch.__version__}, target sm_90a, ptxas {ptxas}"
    print(f"{versions}; launches captured in {time.time() - t0:.1f} s", file=sys.stderr)

    cache_dir = None
    if not ARGS.no_cache:
        cache_dir = os.path.join(ARGS.cache_dir, triton.__version__)
        os.makedirs(cache_dir, exist_ok=True)
    results, compiled = run_jobs(jobs, max(1, ARGS.jobs), cache_dir)
    rows = [report.analyse(j, r, shapes.COMPUTE_BOUND) for j, r in zip(jobs, results)]
    order = {op: i for i, op in enumerate(shapes.OPS)}
    dorder = {"fp16": 0, "bf16": 1, "fp32": 2, "fp64": 3}
    rows.sort(key=lambda r: (order[r["op"]], r["kernel"], r["variant"], dorder[r["dtype"].split("/")[0]],
                             r["config"]))
    report.print_table(rows, ARGS.verbose, ARGS.only_flagged)

    n = len(rows)
    counts = {f: sum(f in r["flags"] for r in rows) for f in report.FAILING}
    no_dot = sum(1 for r in rows if "error" not in r and not r["dots"])
    low_occ = sum(1 for r in rows if "error" not in r and r["warps_sm"] < 8)
    by_dtype = {}
    for r in rows:
        if "SPILL" in r["flags"]:
            by_dtype[r["dtype"]] = by_dtype.get(r["dtype"], 0) + 1
    detail = (f"triton {triton.__version__}: {n} configs compiled for sm_90 ({compiled} in this run, "
              f"{n - compiled} from --cache-dir, {time.time() - t0:.0f} s); "
              f"spilling by dtype {by_dtype or '{}'}; {no_dot} have no tl.dot; {low_occ} below 8 warps/SM; "
              f"{counts['SMEM>227K']} over 227 KB shared memory; {counts['1BLK-SMEM']} memory-bound at one "
              f"block per SM (shared memory); {counts['compile-error']} failed to compile")
    totals = f"{n} configs, {counts['SPILL']} spill, {counts['NO-TC']} without tensor cores"
    print("\n" + detail)
    print("\nconfigs the first call on a new shape compiles and times (forward + backward):")
    for f in report.first_call_summary(first_call):
        print(f"  {f['op']:<11} {f['dtype']:<5} {f['configs']:>7} configs over {f['tunings']} tuned launches "
              f"({f['shapes']} shapes; most at {f['worst']})")
    print(totals)

    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(dict(triton=triton.__version__, versions=versions, level=level,
                           rows=[{k: v for k, v in r.items()} for r in rows], first_call=first_call), f, indent=1)
    if ARGS.markdown:
        cmd = " ".join(["python benchmarks/triton_sm90.py", f"--{level}", f"--dtypes {ARGS.dtypes}"]
                       + (["--tf32"] if ARGS.tf32 else []) + ([f"--ops {ARGS.ops}"] if ARGS.ops else []))
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(ARGS.markdown, "w") as f:
            f.write(report.markdown(rows, first_call, [f"`{cmd}` ({versions}), run {when} on {checkout()}.", "",
                                                       detail], totals))
    failed = sum(counts.values())
    if failed:
        print(f"FAILED: {failed} flagged configs ({', '.join(f'{k} {v}' for k, v in counts.items() if v)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
