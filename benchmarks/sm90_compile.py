"""Compiling the gate's jobs for sm_90 and reading what ptxas made of them (registers, spills,
shared memory, how each tl.dot was lowered), with a per-Triton-version result cache and a pool
of forked compilers. Imported by triton_sm90.py after it has set Triton's environment (the
TRITON_* variables must be in place before triton is first imported).
"""
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def classify_dots(ttgir):
    """How each tl.dot was lowered: wgmma (ttng.warp_group_dot), mma (mma.sync, nvidia_mma v2),
    fma (blocked layout: CUDA cores)."""
    kinds = []
    for line in ttgir.splitlines():
        s = line.strip()
        if "ttng.warp_group_dot " in s and "_wait" not in s:
            kinds.append("wgmma")
        elif re.search(r"= tt\.dot ", s):
            result = s.rsplit("->", 1)[-1]
            if "#mma" in result or "nvidia_mma" in result:
                kinds.append("mma")
            else:
                kinds.append("fma")
    return kinds


def compile_job(job):
    signature, constexprs, attrs, options = job["src"]
    out, start = io.StringIO(), time.time()
    try:
        with contextlib.redirect_stdout(out):
            ck = triton.compile(ASTSource(job["fn"], signature, constexprs, attrs), target=TARGET,
                                options=options.__dict__)
    except Exception as err:  # a failed compile is a result too
        msg = str(err).strip().splitlines()
        return dict(error=(msg[0] if msg else type(err).__name__)[:300], secs=time.time() - start)
    log = out.getvalue()
    regs, spill = _REGS.search(log), _SPILL.search(log)
    ttgir, ptx = ck.asm.get("ttgir", ""), ck.asm.get("ptx", "")
    return dict(
        regs=int(regs.group(1)) if regs else None,
        stack=int(spill.group(1)) if spill else None,
        spill_st=int(spill.group(2)) if spill else None,
        spill_ld=int(spill.group(3)) if spill else None,
        shared=int(ck.metadata.shared), num_warps=int(ck.metadata.num_warps),
        dots=classify_dots(ttgir),
        ptx_wgmma="wgmma.mma_async" in ptx, ptx_mma="mma.sync" in ptx,
        secs=time.time() - start,
    )


_POOL_JOBS = []


def _pool_compile(i):
    return i, compile_job(_POOL_JOBS[i])


def run_jobs(jobs, n_workers, cache_dir):
    results = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        path = cache_dir and os.path.join(cache_dir, job["key"] + ".json")
        if path and os.path.exists(path):
            with open(path) as f:
                results[i] = json.load(f)
        else:
            todo.append(i)
    print(f"{len(jobs)} distinct compiles, {len(jobs) - len(todo)} cached, compiling {len(todo)} "
          f"on {n_workers} process(es) ...", file=sys.stderr, flush=True)
    todo.sort(key=lambda i: -jobs[i]["cost"])  # biggest first: better balance
    start, done = time.time(), 0

    def store(i, res):
        nonlocal done
        results[i] = res
        done += 1
        if cache_dir and "error" not in res:
            with open(os.path.join(cache_dir, jobs[i]["key"] + ".json"), "w") as f:
                json.dump(res, f)
        if done % 25 == 0 or done == len(todo):
            print(f"  {done}/{len(todo)} compiled, {time.time() - start:.0f} s", file=sys.stderr, flush=True)

    if n_workers > 1 and len(todo) > 1:
        _POOL_JOBS[:] = jobs  # forked workers inherit the jobs (kernels are not picklable)
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
            futures = {pool.submit(_pool_compile, i): i for i in todo}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    store(*fut.result())
            except concurrent.futures.process.BrokenProcessPool:
                for fut, i in futures.items():
                    if results[i] is None:
                        store(i, dict(error="a compiler process died (LLVM/MLIR crash?)", secs=0.0))
    else:
        for i in todo:
            store(i, compile_job(jobs[i]))
    return results, len(todo)
