"""What benchmarks/triton_sm90.py makes of each compile: occupancy, flags, and the tables.

Columns: variant = the launcher's constexprs (False ones omitted; [...] names runtime ints whose
specialisation tells otherwise equal rows apart); config = the autotune config ("*": the one
LORA_KERNELS_AUTOTUNE=0 runs; "(fixed)": the launcher's own num_warps); dtype = the input dtypes
that reach this compile; spill st/ld = ptxas spill store/load bytes per thread; warps/SM =
estimated resident warps per SM (limiter in brackets); tc = how the tl.dots were lowered; uses =
the first shape that launches it (+ how many more).

Occupancy is an estimate for H100 SXM: 64 warps, 32 blocks, 65536 registers (allocated per warp
in units of 256) and 228 KB shared memory per SM (1 KB reserved per block); the launch limit is
227 KB of shared memory per block. Grid size (waves) is not considered.

Flags (any one fails the gate): SPILL (ptxas spill stores or loads), SMEM>227K (cannot launch),
NO-TC (an fp16/bf16 tl.dot, or fp32 with --tf32, lowered to CUDA-core FMAs), 1BLK-SMEM (a
memory-bound kernel, i.e. not in sm90_shapes.COMPUTE_BOUND, whose shared memory leaves room for
one block per SM: latency hiding then rests on one block's warps), compile-error, no-ptxas-log.
"""
import collections

REGS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 64, 32
SMEM_PER_SM, SMEM_PER_BLOCK, SMEM_RESERVED = 228 << 10, 227 << 10, 1 << 10
FAILING = ("SPILL", "SMEM>227K", "NO-TC", "1BLK-SMEM", "compile-error", "no-ptxas-log")


def occupancy(regs, shared, warps):
    """(warps per SM, limiter) on an H100 SXM."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = {
        "warps": WARPS_PER_SM // warps,
        "blocks": BLOCKS_PER_SM,
        "regs": (REGS_PER_SM // per_warp) // warps,
        "smem": SMEM_PER_SM // (-(-(shared + SMEM_RESERVED) // 128) * 128),
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter] * warps, limiter


def expects_tensor_cores(job):
    return job["dtype"] in ("fp16", "bf16") or (job["dtype"] == "fp32" and "tf32" in job["precision"])


def analyse(job, res, compute_bound):
    row = dict(op=job["op"], kernel=job["kernel"], variant=job["variant"], config=job["config"],
               dtype="/".join(job["dtypes"]), uses=job["uses"], tuned=job["tuned"], default=job["default"])
    if "error" in res:
        row.update(error=res["error"], flags=["compile-error"])
        return row
    warps_sm, limiter = occupancy(res["regs"] or 0, res["shared"], res["num_warps"])
    dots = res["dots"]
    if not dots and (res["ptx_wgmma"] or res["ptx_mma"]):  # TTGIR spelled differently: trust the PTX
        dots = (["wgmma"] if res["ptx_wgmma"] else []) + (["mma"] if res["ptx_mma"] else [])
        res = dict(res, dots=dots)
    tc = "+".join(k for k in ("wgmma", "mma", "fma") if k in dots) or "-"
    flags = []
    if (res["spill_st"] or 0) > 0 or (res["spill_ld"] or 0) > 0:
        flags.append("SPILL")
    if res["shared"] > SMEM_PER_BLOCK:
        flags.append("SMEM>227K")
    if res["regs"] is None:
        flags.append("no-ptxas-log")
    no_tc = bool(dots) and "fma" in dots and expects_tensor_cores(job)
    if no_tc:
        flags.append("NO-TC")
    if limiter == "smem" and warps_sm == res["num_warps"] and job["kernel"] not in compute_bound:
        flags.append("1BLK-SMEM")
    row.update(res, warps_sm=warps_sm, limiter=limiter, tc=tc, no_tc=no_tc, flags=flags)
    return row


def _cells(r, verbose):
    uses = "; ".join(r["uses"]) if verbose else (
        r["uses"][0] + (f" (+{len(r['uses']) - 1})" if len(r["uses"]) > 1 else ""))
    config = r["config"] + (" *" if r.get("default") else "")
    if "error" in r:
        return [r["op"], r["kernel"], r["variant"], config, r["dtype"], "-", "-", "-", "-", "-",
                "COMPILE-ERROR: " + r["error"], uses]
    return [r["op"], r["kernel"], r["variant"], config, r["dtype"], str(r["regs"]),
            f"{r['spill_st']}/{r['spill_ld']}", str(r["shared"]), f"{r['warps_sm']} ({r['limiter']})",
            r["tc"], ",".join(r["flags"]) or "ok", uses]


HEAD = ["op", "kernel", "variant", "config", "dtype", "regs", "spill st/ld", "smem B", "warps/SM", "tc",
        "flags", "uses"]


def print_table(rows, verbose, only_flagged):
    lines = [_cells(r, verbose) for r in rows if r["flags"] or not only_flagged]
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(HEAD)]
    widths[-1] = len(HEAD[-1])  # last column unpadded
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    print(fmt(HEAD))
    print(fmt(["-" * w for w in widths]))
    for line in lines:
        print(fmt(line))


def kernel_summary(rows):
    """Per (op, kernel): configs, registers min-max, worst spill, warps/SM min-max, dot lowering."""
    by = collections.OrderedDict()
    for r in rows:
        by.setdefault((r["op"], r["kernel"]), []).append(r)
    out = []
    for (op, kernel), rs in by.items():
        ok = [r for r in rs if "error" not in r]
        regs = [r["regs"] or 0 for r in ok]
        warps = [r["warps_sm"] for r in ok]
        out.append(dict(
            op=op, kernel=kernel, configs=len(rs), spilling=sum("SPILL" in r["flags"] for r in rs),
            flagged=sum(any(f in FAILING for f in r["flags"]) for r in rs),
            regs=f"{min(regs)}-{max(regs)}" if regs else "-",
            max_spill=max(((r["spill_st"] or 0) + (r["spill_ld"] or 0) for r in ok), default=0),
            warps_sm=f"{min(warps)}-{max(warps)}" if warps else "-",
            tc="/".join(sorted({r["tc"] for r in ok})) or "-"))
    return out


def first_call_summary(first_call):
    """Per op and dtype: configs the first call on a new shape compiles and times (min-max over
    the shapes), and the tuned launches (autotuner keys) that adds up from."""
    by = collections.OrderedDict()
    for f in first_call:
        by.setdefault((f["op"], f["dtype"]), []).append(f)
    out = []
    for (op, dtype), fs in by.items():
        cfg, keys = [f["configs"] for f in fs], [f["tunings"] for f in fs]
        worst = max(fs, key=lambda f: f["configs"])
        out.append(dict(op=op, dtype=dtype, shapes=len(fs), configs=f"{min(cfg)}-{max(cfg)}",
                        tunings=f"{min(keys)}-{max(keys)}", worst=worst["shape"]))
    return out


def _md_table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(rows, first_call, header_lines, totals_line):
    ks = kernel_summary(rows)
    fc = first_call_summary(first_call)
    parts = ["# Triton kernels compiled for sm_90 (H100), offline", "", *header_lines, "", totals_line, "",
             "## Per kernel", "",
             _md_table(["op", "kernel", "configs", "flagged", "spilling", "registers", "max spill B (st+ld)",
                        "warps/SM", "dots"],
                       [[k["op"], k["kernel"], k["configs"], k["flagged"], k["spilling"], k["regs"], k["max_spill"],
                         k["warps_sm"], k["tc"]] for k in ks]),
             "", "## Configs the first call on a new shape compiles and times (forward + backward)", "",
             _md_table(["op", "dtype", "shapes", "configs", "tuned launches", "most configs at"],
                       [[f["op"], f["dtype"], f["shapes"], f["configs"], f["tunings"], f["worst"]] for f in fc]),
             "", "## Every compile", "",
             _md_table(HEAD, [_cells(r, False) for r in rows]), ""]
    return "\n".join(parts)
