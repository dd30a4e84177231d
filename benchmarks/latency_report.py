"""make bench's report: the environment (device, versions, commit, backends) and the markdown,
JSON and PNG outputs."""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from latency_config import BASE, PAPER_SETTINGS, PAPER_TABLE1, REPO_ROOT, VARIANTS, Config, setting_label
import lora_kernels as lk
from lora_kernels import backend as lk_backend


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def backends_used(cfg: Config) -> dict:
    """The backend choice (lk.get_backend()) and the backend it resolves to for each op here."""
    x = torch.empty(1, cfg.n_embd, device=cfg.device, dtype=cfg.torch_dtype)
    used = {"requested": lk.get_backend()}
    for op, module in (("lora_linear", "lora_kernels.ops.lora"), ("adapter", "lora_kernels.ops.adapter"),
                       ("layer_norm", "lora_kernels.ops.layer_norm")):
        try:
            used[op] = lk_backend.selected_name(op, importlib.import_module(module).IMPLS, x)
        except Exception as err:  # report, do not hide: the run itself would raise the same error
            used[op] = f"unavailable: {err}"
    return used


def load_average() -> float | None:
    """1-minute load average of the machine (None where the OS does not report it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def warn_if_busy(cfg: Config) -> None:
    load, cores = load_average(), os.cpu_count() or 1
    if torch.device(cfg.device).type == "cpu" and load is not None and load > 0.5 * cores:
        print(f"warning: the machine is busy (load average {load} on {cores} cores): CPU times will be "
              f"slow and noisy; compare the overheads, which pair variants measured side by side", flush=True)


def environment(cfg: Config) -> dict:
    import transformers

    device = torch.device(cfg.device)
    env = {"date": _dt.date.today().isoformat(),
           "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "device": {"type": device.type, "name": device_name(device)},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "lora_kernels": lk.__version__},
           "backend": backends_used(cfg), "git": git_commit(),
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "load_average_end": load_average(), "platform": platform.platform()}
    if device.type == "cuda":
        env["versions"]["cuda"] = torch.version.cuda
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    try:
        env["versions"]["triton"] = importlib.import_module("triton").__version__
    except ImportError:
        pass
    return env


def format_cell(stats: dict) -> str:
    if "capture_failed" in stats:
        return "capture failed"
    return f"{stats['mean_ms']:.1f} ± {stats['std_ms']:.1f} ms ({stats['overhead_pct']:+.1f}%)"


def format_count(n: int) -> str:
    if n == 0:
        return "0"
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def markdown_table(results: dict, params: dict) -> str:
    labels = list(results)
    lines = ["| Variant | \\|Θ\\| | " + " | ".join(f"{label.replace('x', '×')}" for label in labels) + " |",
             "|---|---:|" + "---:|" * len(labels)]
    for name in VARIANTS:
        cells = [format_cell(results[label][name]) for label in labels]
        lines.append(f"| {name} | {format_count(params[name])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_overhead_table(results: dict) -> str:
    """Overheads as the median of per-round ratios (robust to load spikes on a shared machine)."""
    labels = list(results)
    lines = ["| Variant | " + " | ".join(label.replace("x", "×") for label in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name in VARIANTS[1:]:
        cells = [f"{results[label][name]['overhead_paired_median_pct']:+.1f}%"
                 if "n" in results[label][name] else "capture failed" for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def graphs_report(cfg: Config, graphs: dict | None, error: str | None, params: dict) -> dict:
    """The CUDA-graph part of the report: its rows, tables and any failure, or why it was not run."""
    if not cfg.cuda_graphs:
        return {"timed": False, "why": "not requested" if torch.device(cfg.device).type == "cuda" else "CPU run"}
    if graphs is None:
        return {"timed": False, "error": error}
    failed = {name: s["capture_failed"] for per in graphs.values() for name, s in per.items() if "capture_failed" in s}
    return {"timed": True, "results": rows_for_json(graphs), "table": markdown_table(graphs, params),
            "paired_table": paired_overhead_table(graphs), "capture_failed": failed}


def graphs_section(part: dict) -> list:
    """Markdown lines for the CUDA-graph tables (or why there are none)."""
    if not part.get("timed"):
        reason = part.get("error") or part.get("why")
        return [f"CUDA graphs: not timed ({reason}).", ""]
    failed = [f"- {name}: capture failed: {why}" for name, why in part["capture_failed"].items()]
    return ["## Replayed as CUDA graphs", "",
            "Each variant's forward captured once per setting, after the eager warm-up, then replayed "
            "and timed the same way: the GPU time alone, without Python, dispatch and launch costs "
            "(what a server replaying graphs, or torch.compile(mode=\"reduce-overhead\"), would see). "
            "transformers 5.x builds an explicit causal mask while a graph is captured (it skips the mask "
            "only when not tracing), so attention may run another SDPA kernel than in the eager table: "
            "compare rows within a table, not across the two.",
            "", part["table"], "", "Overhead, median of per-round ratios:", "", part["paired_table"], "",
            *failed, *([""] if failed else [])]


def paper_table() -> str:
    labels = [setting_label(s) for s in PAPER_SETTINGS]
    base = PAPER_TABLE1["Fine-Tune/LoRA"]
    lines = ["| Variant (paper) | " + " | ".join(label.replace("x", "×") for label in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name, row in PAPER_TABLE1.items():
        cells = [f"{row[l][0]:.1f} ± {row[l][1]:.1f} ms ({(row[l][0] / base[l][0] - 1) * 100:+.1f}%)"
                 for l in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_description(cfg: Config) -> str:
    return (f"GPT2Model, random weights, {cfg.layers} layers, d={cfg.n_embd}, {cfg.n_head} heads, "
            f"vocab {cfg.vocab_size}, {cfg.dtype}, eval + inference_mode; LoRA r={cfg.rank} "
            f"alpha={cfg.alpha:g} on attn.c_attn (q,k,v); adapter bottleneck {cfg.bottleneck}, gelu")


def markdown_report(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    git = env["git"]
    commit = (git["commit"][:12] + (" (dirty)" if git["dirty"] else "")) if git["commit"] else "unknown"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    backend = ", ".join(f"{k}: {v}" for k, v in env["backend"].items())
    rounds = ", ".join(f"{r['setting']} {r['n']}" for r in report["results"] if r["variant"] == BASE)
    return "\n".join([
        f"# Inference latency of adapted GPT-2 (LoRA paper, Table 1) — {env['device']['name']}, {env['date']}",
        "",
        f"- Device: {env['device']['name']} ({env['device']['type']}, {env['torch_threads']} torch threads, "
        f"{env['cpu_count']} CPUs, load average {env['load_average_start']} at start, "
        f"{env['load_average_end']} at end)",
        f"- Versions: {versions}; git {commit}",
        f"- lora_kernels backend: {backend}",
        f"- Model: {report['model']}",
        f"- Timing: up to {cfg['warmup']} warm-up rounds, then up to {cfg['repeats']} interleaved rounds (one forward "
        f"per variant each, rotating order; time budget {cfg['time_budget'] or 'none'}); N per setting: "
        f"{rounds}; cell = mean ± std ms over N, overhead of the means vs \"No adaptation\" in this run",
        f"- Shrunk / changed vs the paper: {'; '.join(cfg['shrunk']) or 'nothing'}",
        f"- Correctness (relative difference of last hidden states): merged vs unmerged "
        f"{report['correctness']['merged_vs_unmerged']:.2e} (tolerance {report['correctness']['tolerance']:.0e})",
        f"- Total run time: {report['total_seconds']:.1f} s",
        "",
        report["table"],
        "",
        "\"LoRA merged\" runs exactly the base model's work, so its overhead shows this run's noise.",
        "Overhead as the median over rounds of (variant / base in the same round), less sensitive to "
        "other load on the machine:",
        "",
        report["paired_table"],
        "",
        *graphs_section(report["cuda_graphs"]),
        "Paper (Hu et al. 2021, Table 1; GPT-2 medium, Quadro RTX8000, 100 trials; Adapter^L = Lin et al., "
        "one adapter per block):",
        "",
        paper_table(),
        "",
    ])


def write_results(report: dict, out_dir: str) -> dict:
    env = report["environment"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"latency-{slug(env['device']['name'])}-{env['date']}"
    paths = {"json": str(stem.with_suffix(".json")), "markdown": str(stem.with_suffix(".md"))}
    png = stem.with_suffix(".png")
    if plot_overheads(report, png):
        paths["plot"] = str(png)
    Path(paths["json"]).write_text(json.dumps(report, indent=2) + "\n")
    Path(paths["markdown"]).write_text(markdown_report(report))
    return paths


def plot_overheads(report: dict, path: Path) -> bool:
    """Bar chart of each variant's latency overhead over "No adaptation", per setting (PNG).
    Returns False, saying why, when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return False
    settings = report["config"]["settings"]
    panels = [("eager", report["results"])]
    if report.get("cuda_graphs", {}).get("timed"):
        panels.append(("CUDA graphs", report["cuda_graphs"]["results"]))
    names = [v for v in VARIANTS if v != BASE]
    fig, axes = plt.subplots(len(panels), 1, figsize=(1.6 + 1.1 * len(names), 4.2 * len(panels)), squeeze=False)
    width = 0.8 / len(settings)
    env = report["environment"]
    for ax, (mode, rows) in zip(axes[:, 0], panels):
        cell = {(r["variant"], r["setting"]): r.get("overhead_paired_median_pct", math.nan) for r in rows}
        for i, setting in enumerate(settings):
            xs = [j + (i - (len(settings) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, [cell[(v, setting)] for v in names], width, label=setting.replace("x", "×"))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
        ax.set_ylabel("latency over no adaptation (%)")
        ax.set_title(f"GPT-2 forward ({mode}), {report['config']['dtype']}, {env['device']['name']} "
                     f"({env['date']})", fontsize=9)
        ax.legend(title="batch × seq", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def rows_for_json(results: dict) -> list:
    rows = []
    for label, per_variant in results.items():
        batch, seq = (int(v) for v in label.split("x"))
        for name, stats in per_variant.items():
            rows.append({"variant": name, "setting": label, "batch": batch, "seq": seq, **stats})
    return rows
