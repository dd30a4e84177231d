"""Summarise the micro-benchmarks: pytest-benchmark JSON -> markdown table (+ PNG plots).

    python -m pytest benchmarks --benchmark-json results.json
    python benchmarks/summarize.py results.json [--out DIR] [--short]

Writes ``DIR/<stem>.md`` (default: next to the JSON): the device, the torch / triton / CUDA
versions, the date and git commit, the measured copy bandwidth and matmul rate, then one table
per op — shape, dtype, mode, provider, median time (q20–q80), throughput (GB/s for
memory-bound rows, TFLOP/s for compute-bound ones), % of the floor and speedup over the eager
baseline measured in the same run (eager time / this time: > 1 is faster). When matplotlib
imports, also ``DIR/<stem>.png``: per op, the speedup over eager and the % of floor of each
provider for each shape and mode. ``--short`` prints a digest: per shape and mode, our fastest
kernel against eager (and torch.compile, where it ran).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

OPS = ("lora", "dora", "lora_multi", "adapter", "layer_norm", "rms_norm", "infonce")
MODE_ORDER = {"fwd": 0, "bwd-params": 1, "bwd": 2, "fwd+bwd": 3}


def load(paths) -> tuple[dict, list]:
    """(metadata of the first file, every row's extra_info with its test name)."""
    meta, rows = {}, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not meta:
            bench = data.get("machine_info", {}).get("lora_kernels_bench", {})
            meta = {"bench": bench, "commit": data.get("commit_info", {}), "datetime": data.get("datetime"),
                    "machine": data.get("machine_info", {})}
        for b in data.get("benchmarks", []):
            info = dict(b.get("extra_info") or {})
            if "op" not in info:
                continue
            info["test"] = b.get("name")
            rows.append(info)
    return meta, rows


def _num(v, fmt):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def throughput(row: dict) -> str:
    """GB/s for memory-bound rows, TFLOP/s (GFLOP/s below 1) for compute-bound ones."""
    if "time_ms" not in row:
        return "—"
    if row.get("bound") == "compute" and row.get("tflops"):
        t = row["tflops"]
        return f"{t:,.1f} TFLOP/s" if t >= 1 else f"{t * 1e3:.3g} GFLOP/s"
    g = row.get("gbps", 0.0)
    return f"{g:,.0f} GB/s" if g >= 100 else f"{g:.3g} GB/s"


def time_cell(row: dict) -> str:
    if "time_ms" not in row:
        return row.get("status", "—")
    t = row["time_ms"]
    fmt = ".4f" if t < 1 else ".3f" if t < 100 else ".1f"
    spread = f" ({row['q20_ms']:{fmt}}–{row['q80_ms']:{fmt}})" if "q20_ms" in row else ""
    return f"{t:{fmt}}{spread}"


def speedup_cell(row: dict) -> str:
    if "speedup_vs_eager" in row:
        return f"{row['speedup_vs_eager']:.2f}×"
    if "eager_status" in row:
        return f"eager {row['eager_status'].split(':')[0]}"
    return "—"


def grouped(rows: list) -> "OrderedDict":
    """op -> [(shape, dtype, mode) -> [rows]]: ops in a fixed order, shapes in run order, modes
    fwd → bwd → fwd+bwd, providers in run order (eager first)."""
    first: dict = {}
    for i, row in enumerate(rows):
        first.setdefault((row["op"], row["shape"], row["dtype"]), i)

    def sort_key(item):
        i, row = item
        return (OPS.index(row["op"]) if row["op"] in OPS else 99, row["op"],
                first[(row["op"], row["shape"], row["dtype"])], MODE_ORDER.get(row.get("mode"), 9), i)

    out: OrderedDict = OrderedDict()
    for _, row in sorted(enumerate(rows), key=sort_key):
        out.setdefault(row["op"], OrderedDict()).setdefault(
            (row["shape"], row["dtype"], row["mode"]), []).append(row)
    return out


def header(meta: dict) -> list:
    bench, commit = meta.get("bench", {}), meta.get("commit", {})
    versions = bench.get("versions", {})
    vtext = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    if bench.get("commit"):  # given by the runner (e.g. a copy of the tree without .git)
        cid = bench["commit"]
    else:
        cid = (commit.get("id") or "unknown")[:12] + (" (dirty)" if commit.get("dirty") else "")
    rates = "; ".join(f"{dt}: copy {r['gbps']:,.0f} GB/s, matmul {r['tflops']:,.1f} TFLOP/s"
                      for dt, r in bench.get("rates", {}).items())
    return [f"# lora_kernels micro-benchmarks — {bench.get('device', '?')}, {bench.get('date', meta.get('datetime'))}",
            "",
            f"- Device: {bench.get('device', '?')} ({bench.get('device_type', '?')}); versions: {vtext}",
            f"- Git commit: {cid}; run at {meta.get('datetime')}",
            f"- Shapes: {bench.get('shapes')}; torch.compile rows: {bench.get('compile')}; "
            f"timer: {bench.get('timer')}; do_bench warm-up {bench.get('warmup_ms')} ms, rep {bench.get('rep_ms')} ms",
            f"- Measured rates (the floors use them): {rates or '—'}",
            "- time = median ms (q20–q80); % floor = floor time / time, floor = max(bytes / bandwidth, "
            "FLOPs / matmul rate) with the compulsory bytes and FLOPs of benchmarks/floors.py; "
            "× eager = eager time / this time, both measured in this run (> 1: faster than eager)",
            ""]


def markdown(meta: dict, rows: list) -> str:
    lines = header(meta)
    for op, groups in grouped(rows).items():
        lines += [f"## {op}", "",
                  "| shape | dtype | mode | provider | time ms | throughput | % floor | × eager | peak extra MiB | status |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
        for (shape, dtype, mode), group in groups.items():
            for row in group:
                lines.append(
                    f"| {shape} | {dtype} | {mode} | {row['provider']} | {time_cell(row)} | {throughput(row)} | "
                    f"{_num(row.get('pct_floor'), '.1f')} | {speedup_cell(row)} | "
                    f"{_num(row.get('peak_extra_mib'), ',.1f')} | {row.get('status', '?')[:80]} |")
        lines.append("")
    bad = [r for r in rows if r.get("status") not in ("ok",)]
    if bad:
        counts: dict = {}
        for r in bad:
            key = r.get("status", "?").split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        lines += ["Rows not measured or flagged: " + ", ".join(f"{k} {v}" for k, v in counts.items()), ""]
    return "\n".join(lines) + "\n"


def ours(group: list):
    """Our fastest measured kernel of a group (lk-torch only when no kernel backend ran)."""
    cands = [r for r in group if r["provider"].startswith("lk-") and "time_ms" in r]
    kernels = [r for r in cands if r["provider"] != "lk-torch"]
    pool = kernels or cands
    return min(pool, key=lambda r: r["time_ms"]) if pool else None


def digest(rows: list) -> str:
    """Short table: per (op, shape, dtype, mode), our best kernel vs eager and compile."""
    out = ["| op | shape | dtype | mode | ours | ms | % floor | × eager | × compile |",
           "|---|---|---|---|---|---:|---:|---:|---:|"]
    for op, groups in grouped(rows).items():
        for (shape, dtype, mode), group in groups.items():
            best = ours(group)
            comp = next((r for r in group if r["provider"] == "compile" and "time_ms" in r), None)
            if best is None:
                statuses = ", ".join(sorted({r.get('status', '?').split(':')[0] for r in group
                                             if r['provider'].startswith('lk-')})) or "no lk row"
                out.append(f"| {op} | {shape} | {dtype} | {mode} | {statuses} | — | — | — | — |")
                continue
            vs_comp = f"{comp['time_ms'] / best['time_ms']:.2f}×" if comp else "—"
            out.append(f"| {op} | {shape} | {dtype} | {mode} | {best['provider']} | {best['time_ms']:.4g} | "
                       f"{_num(best.get('pct_floor'), '.1f')} | {speedup_cell(best)} | {vs_comp} |")
    return "\n".join(out)


def plot(rows: list, path: Path) -> bool:
    """One PNG: per op (row of panels), speedup over eager and % of floor per provider."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = grouped(rows)
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 2, figsize=(22, 4.8 * len(groups)), squeeze=False)
    for ax_row, (op, by_key) in zip(axes, groups.items()):
        keys = list(by_key)
        provs = sorted({r["provider"] for g in by_key.values() for r in g},
                       key=lambda p: (p != "eager", not p.startswith("lk-"), p))
        width = 0.8 / max(len(provs), 1)
        labels = [f"{s}\n{dt} {m}" for s, dt, m in keys]
        for ax, metric, title in ((ax_row[0], "speedup_vs_eager", "speedup over eager (×)"),
                                  (ax_row[1], "pct_floor", "% of floor")):
            for i, prov in enumerate(provs):
                vals = []
                for key in keys:
                    row = next((r for r in by_key[key] if r["provider"] == prov), None)
                    vals.append(row.get(metric, 0.0) if row else 0.0)
                xs = [j + (i - (len(provs) - 1) / 2) * width for j in range(len(keys))]
                ax.bar(xs, vals, width, label=prov)
            if metric == "speedup_vs_eager":
                ax.axhline(1.0, color="black", linewidth=0.8)
                positive = [r[metric] for g in by_key.values() for r in g if r.get(metric, 0) > 0]
                if positive and max(positive) / min(positive) > 20:
                    ax.set_yscale("log")
            else:
                ax.axhline(100.0, color="black", linewidth=0.8)
            ax.set_title(f"{op}: {title}")
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7, ncol=min(len(provs), 6))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output(s)")
    p.add_argument("--out", default=None, help="output folder (default: the first JSON's folder)")
    p.add_argument("--stem", default=None, help="file name stem (default: the first JSON's stem)")
    p.add_argument("--short", action="store_true", help="print the digest table to stdout")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    meta, rows = load(args.json)
    if not rows:
        print(f"no lora_kernels benchmark rows in {args.json}", file=sys.stderr)
        return 1
    first = Path(args.json[0])
    out = Path(args.out) if args.out else first.parent
    stem = args.stem or first.stem
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{stem}.md"
    md.write_text(markdown(meta, rows) + "\n## digest: our fastest kernel per row\n\n" + digest(rows) + "\n")
    written = [str(md)]
    if not args.no_plot:
        png = out / f"{stem}.png"
        if plot(rows, png):
            written.append(str(png))
        else:
            print("matplotlib not importable: no plot", file=sys.stderr)
    bench = meta.get("bench", {})
    if args.short:
        print(digest(rows))
    bad = sum(r.get("status") != "ok" for r in rows)
    print(f"{len(rows)} rows ({bad} not ok) on {bench.get('device', '?')}; wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
