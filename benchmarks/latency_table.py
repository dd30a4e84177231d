"""Inference latency of adapted GPT-2: a reproduction of Table 1 of the LoRA paper.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), Table 1, times one
forward pass of GPT-2 medium (24 layers, d=1024, 16 heads) at batch × sequence length
32×512, 16×256 and 1×128, averaged over 100 trials on an NVIDIA Quadro RTX8000:

    Fine-Tune/LoRA   1449.4±0.8          338.0±0.6          19.8±2.7
    Adapter^L        1482.0±1.0 (+2.2%)  354.8±0.5 (+5.0%)  23.9±2.1 (+20.7%)
    Adapter^H        1492.2±1.0 (+3.0%)  366.3±0.5 (+8.4%)  25.8±2.2 (+30.3%)

Adapters sit in series with the layers they follow, so they add latency that matters most
at small batch (online inference). Merged LoRA adds none: B·A is folded into W.

This script measures the same rows with the lora_kernels modules, built by hand (not by
surgery) on a randomly initialised ``GPT2Model`` (no download, no LM head):

  No adaptation          the base model
  LoRA merged            lk.LoRALinear on every ``attn.c_attn`` (q, k and v together), merged
  LoRA unmerged          the same, not merged: the low-rank path runs at every call
  Adapter^H              lk.BottleneckAdapter after ``attn.c_proj`` and after ``mlp.c_proj``
  Adapter^L              one LayerNorm + lk.BottleneckAdapter after ``mlp.c_proj`` (Lin et al.)
  LN-tuning              every LayerNorm replaced by lk.FusedLayerNorm (lk.ln_tuning)

"fused" rows run the backend ``auto`` picks (Triton on a GPU; on a CPU that is the PyTorch
reference, in fp32 like the model there); "eager" rows run the same parameters through the
plain PyTorch ops PEFT-style code runs, in the model's dtype: F.linear for LoRA's A and B,
F.linear + F.gelu for adapters, F.layer_norm.

LoRA B and the adapters' up-projections get small random values (not their zero init), so
the extra work is real, merged weights include the update, and a correctness check (merged
output == unmerged output, adapters change the output) runs before any timing.

How to read the table: each cell is "mean ± std ms" of N timed forward passes and the
overhead "+x.x%" against "No adaptation" measured in the same run. Variants are timed
interleaved (one pass of each variant per round, rotating order) after warm-up, so slow
drifts of the machine hit every variant alike: trust the ratios more than absolute times.

On a GPU the defaults are the paper's sizes in fp16 (timed with CUDA events), and every variant
is timed a second time replayed as a captured CUDA graph (``--no-cuda-graphs``: not): at small
batch the eager forward is bound by the CPU (Python, dispatch, launches), the graph replay
is the GPU time alone. On a CPU they
are shrunk so the run takes a few minutes: GPT-2 medium width (d=1024, 16 heads) but 4 of
the 24 layers, settings 4×128, 2×64, 1×32, fp32; the output says what was shrunk.

Usage:  python benchmarks/latency_table.py [--device cuda] [--settings 32x512,16x256,1x128] ...
Writes benchmarks/results/latency-<device>-<date>.md and .json.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

# The pieces live beside this script, one concern each: latency_config (names, sizes, command
# line), latency_models (variants, eager twins, correctness), latency_timing, latency_report.
# Their names are re-exported here, where tests and benchmarks/conftest.py look for them.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_kernels as lk  # noqa: E402,F401
from latency_config import (  # noqa: E402,F401
    ADAPTER_L, ADAPTER_L_EAGER, BASE, EAGER_OF, GPT2_MEDIUM, HOULSBY, HOULSBY_EAGER, LN_TUNING, MERGED,
    PAPER_SETTINGS, PAPER_TABLE1, UNMERGED, UNMERGED_EAGER, VARIANTS, Config, resolve_config, setting_label)
from latency_config import build_parser as _build_parser  # noqa: E402
from latency_models import (  # noqa: E402,F401
    EAGER_MODULES, EagerAdapter, EagerLayerNorm, EagerLoRA, EagerTwin, adaptation_params, build_variants,
    check_variants, eager_twin, last_hidden_states, relative_difference)
from latency_report import (  # noqa: E402,F401
    device_name, environment, graphs_report, graphs_section, load_average, markdown_report, markdown_table,
    model_description, paired_overhead_table, plot_overheads, rows_for_json, warn_if_busy, write_results)
from latency_timing import (  # noqa: E402,F401
    EAGER_SHARE, capture_all, measure_all, measure_graphs, measure_setting, summarize)


def build_parser():
    return _build_parser(__doc__)


def main(argv=None) -> dict:
    """Run the benchmark; returns the report (also written as .json and .md under --out-dir)."""
    t0 = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args)
    print(f"LoRA paper Table 1 on {device_name(torch.device(cfg.device))}: {model_description(cfg)}", flush=True)
    print(f"shrunk / changed vs the paper: {'; '.join(cfg.shrunk)}", flush=True)
    load_start = load_average()
    warn_if_busy(cfg)
    variants = build_variants(cfg)
    params = {name: adaptation_params(model) for name, model in variants.items()}
    correctness = check_variants(variants, cfg)
    print(f"correctness: merged vs unmerged LoRA relative difference {correctness['merged_vs_unmerged']:.2e} "
          f"(<= {correctness['tolerance']:.0e}); adapted variants differ from the base", flush=True)
    t_measure = time.perf_counter()
    results = measure_all(variants, cfg, budget=cfg.time_budget * (EAGER_SHARE if cfg.cuda_graphs else 1.0))
    graphs = graph_error = None
    if cfg.cuda_graphs:
        left = max(cfg.time_budget - (time.perf_counter() - t_measure), 1.0) if cfg.time_budget else 0.0
        graphs, graph_error = measure_graphs(variants, cfg, left)
    table = markdown_table(results, params)
    report = {"benchmark": "LoRA paper Table 1: GPT-2 forward latency with adapters / LoRA",
              "config": {**asdict(cfg), "settings": [setting_label(s) for s in cfg.settings]},
              "model": model_description(cfg), "environment": {**environment(cfg), "load_average_start": load_start},
              "params": params, "correctness": correctness, "results": rows_for_json(results),
              "table": table, "paired_table": paired_overhead_table(results), "paper_table1_ms": PAPER_TABLE1,
              "cuda_graphs": graphs_report(cfg, graphs, graph_error, params),
              "total_seconds": time.perf_counter() - t0}
    report["paths"] = write_results(report, cfg.out_dir)
    print("\n" + table + "\n", flush=True)
    print("overhead, median of per-round ratios:\n" + report["paired_table"] + "\n", flush=True)
    if report["cuda_graphs"].get("table"):
        print("replayed as CUDA graphs (GPU time only):\n" + report["cuda_graphs"]["table"] + "\n", flush=True)
    elif report["cuda_graphs"].get("error"):
        print(f"CUDA graphs: {report['cuda_graphs']['error']}\n", flush=True)
    print(f"wrote {report['paths']['markdown']} and {report['paths']['json']} "
          f"({report['total_seconds']:.1f} s)", flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
