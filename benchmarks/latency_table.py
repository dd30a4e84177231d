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

import argparse
import copy
import functools
import datetime as _dt
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("lora_kernels") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import lora_kernels as lk  # noqa: E402
from lora_kernels import backend as lk_backend  # noqa: E402

BASE, MERGED = "No adaptation", "LoRA merged"
UNMERGED_EAGER, UNMERGED = "LoRA unmerged, eager", "LoRA unmerged, fused"
HOULSBY_EAGER, HOULSBY = "Adapter^H, eager", "Adapter^H, fused"
ADAPTER_L_EAGER, ADAPTER_L = "Adapter^L, eager", "Adapter^L, fused"
LN_TUNING = "LN-tuning, fused"
VARIANTS = (BASE, MERGED, UNMERGED_EAGER, UNMERGED, HOULSBY_EAGER, HOULSBY, ADAPTER_L_EAGER, ADAPTER_L, LN_TUNING)
# eager row -> the fused row whose weights it runs through plain PyTorch (eager_twin)
EAGER_OF = {UNMERGED_EAGER: UNMERGED, HOULSBY_EAGER: HOULSBY, ADAPTER_L_EAGER: ADAPTER_L}

# GPT-2 medium, as in the paper (huggingface.co/gpt2-medium config.json), embedded: no download.
GPT2_MEDIUM = dict(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
                   activation_function="gelu_new", layer_norm_epsilon=1e-5)
PAPER_SETTINGS = ((32, 512), (16, 256), (1, 128))
PAPER_TABLE1 = {  # ms, mean ± std over 100 trials, NVIDIA Quadro RTX8000
    "Fine-Tune/LoRA": {"32x512": (1449.4, 0.8), "16x256": (338.0, 0.6), "1x128": (19.8, 2.7)},
    "Adapter^L": {"32x512": (1482.0, 1.0), "16x256": (354.8, 0.5), "1x128": (23.9, 2.1)},
    "Adapter^H": {"32x512": (1492.2, 1.0), "16x256": (366.3, 0.5), "1x128": (25.8, 2.2)},
}
CPU_DEFAULTS = dict(dtype="float32", layers=4, settings="4x128,2x64,1x32", repeats=25, warmup=3,
                    time_budget=180.0)
GPU_DEFAULTS = dict(dtype="float16", layers=24, settings="32x512,16x256,1x128", repeats=100, warmup=10,
                    time_budget=0.0)
QUICK = dict(dtype="float32", layers=2, n_embd=64, n_head=4, vocab_size=512, settings="2x16,1x8",
             repeats=3, warmup=1, bottleneck=8, rank=2, time_budget=0.0)
MIN_ROUNDS = 3  # timed rounds per setting that --time-budget never cuts
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
INIT_STD = 0.02  # std of LoRA B and adapter up-projections (GPT-2's own init std)


# ----------------------------------------------------------------------------- configuration

@dataclass
class Config:
    device: str
    dtype: str
    layers: int
    n_embd: int
    n_head: int
    vocab_size: int
    settings: list
    repeats: int
    warmup: int
    bottleneck: int
    rank: int
    alpha: float
    seed: int
    time_budget: float
    out_dir: str
    quick: bool = False
    cuda_graphs: bool = False
    shrunk: list = field(default_factory=list)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def parse_settings(text: str) -> list:
    """"32x512,16x256" -> [(32, 512), (16, 256)]."""
    settings = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*(\d+)\s*", item)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise argparse.ArgumentTypeError(f"settings must look like '32x512,1x128', got {item!r}")
        settings.append((int(match[1]), int(match[2])))
    return settings


def _as_settings(value) -> list:
    return parse_settings(value) if isinstance(value, str) else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default float16 on GPU, float32 on CPU")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (paper: 24; CPU default 4)")
    p.add_argument("--n-embd", type=int, default=None, help="model width (default 1024, GPT-2 medium)")
    p.add_argument("--n-head", type=int, default=None, help="attention heads (default 16)")
    p.add_argument("--settings", type=parse_settings, default=None,
                   help="batch x seq list, e.g. 32x512,16x256,1x128 (the paper's; CPU default 4x128,2x64,1x32)")
    p.add_argument("--repeats", type=int, default=None, help="timed forward passes per cell (GPU 100, CPU 25)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per setting (GPU 10, CPU 3)")
    p.add_argument("--bottleneck", type=int, default=None, help="adapter bottleneck width (default 64)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank r (default 4, the paper's GPT-2 rank)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2·rank)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for warm-up + timing; past its share each setting stops after >= 3 rounds, "
                        "so a loaded machine still finishes (CPU default 180, GPU 0 = none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny model and settings (smoke test, seconds)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also time each variant replayed as a captured CUDA graph: its GPU time without "
                        "Python and launch costs (default: on for CUDA devices; CUDA only)")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """Fill unset flags with the defaults of the device (GPU: the paper's sizes) or --quick."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    defaults = dict(GPU_DEFAULTS if torch.device(device).type == "cuda" else CPU_DEFAULTS)
    defaults.update(n_embd=GPT2_MEDIUM["n_embd"], n_head=GPT2_MEDIUM["n_head"],
                    vocab_size=GPT2_MEDIUM["vocab_size"], bottleneck=64, rank=4)
    if args.quick:
        defaults.update(QUICK)

    def pick(name):
        value = getattr(args, name, None)
        return defaults[name] if value is None else value

    rank = pick("rank")
    cfg = Config(device=device, dtype=pick("dtype"), layers=pick("layers"), n_embd=pick("n_embd"),
                 n_head=pick("n_head"), vocab_size=defaults["vocab_size"],
                 settings=_as_settings(pick("settings")), repeats=pick("repeats"), warmup=pick("warmup"),
                 bottleneck=pick("bottleneck"), rank=rank,
                 alpha=float(args.alpha if args.alpha is not None else 2 * rank),
                 seed=args.seed, time_budget=float(pick("time_budget")), out_dir=args.out_dir,
                 quick=args.quick,
                 cuda_graphs=(torch.device(device).type == "cuda") if args.cuda_graphs is None else args.cuda_graphs)
    validate_config(cfg)
    cfg.shrunk = differences_from_paper(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    for name in ("layers", "n_embd", "n_head", "repeats", "bottleneck", "rank"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.time_budget < 0:
        raise SystemExit(f"--time-budget must be >= 0 (0 = none), got {cfg.time_budget}")
    if cfg.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {cfg.warmup}")
    if cfg.cuda_graphs and torch.device(cfg.device).type != "cuda":
        raise SystemExit(f"--cuda-graphs needs a CUDA device, got --device {cfg.device}")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    longest = max(seq for _, seq in cfg.settings)
    if longest > GPT2_MEDIUM["n_positions"]:
        raise SystemExit(f"sequence length {longest} exceeds GPT-2's {GPT2_MEDIUM['n_positions']} positions")


def differences_from_paper(cfg: Config) -> list:
    """Human-readable list of what this run changes with respect to the paper's Table 1."""
    diffs = []
    for name, key in (("layers", "n_layer"), ("n_embd", "n_embd"), ("n_head", "n_head"),
                      ("vocab_size", "vocab_size")):
        if getattr(cfg, name) != GPT2_MEDIUM[key]:
            diffs.append(f"{name} {getattr(cfg, name)} (paper {GPT2_MEDIUM[key]})")
    if [tuple(s) for s in cfg.settings] != list(PAPER_SETTINGS):
        diffs.append(f"batch×seq {setting_labels(cfg.settings)} (paper {setting_labels(PAPER_SETTINGS)})")
    if cfg.repeats != 100:
        diffs.append(f"{cfg.repeats} timed passes per cell (paper 100)")
    diffs.append(f"{cfg.dtype} on {cfg.device} (paper: NVIDIA Quadro RTX8000, precision not stated)")
    return diffs


def setting_label(setting) -> str:
    return f"{setting[0]}x{setting[1]}"


def setting_labels(settings) -> str:
    return ", ".join(setting_label(s) for s in settings)


# ----------------------------------------------------------------------------- the variants

class AdaptedOutput(nn.Module):
    """``adapter(module(x))``: a bottleneck adapter in series after an existing layer."""

    def __init__(self, module: nn.Module, adapter: nn.Module):
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.module(*args, **kwargs))


def base_model(cfg: Config):
    """A randomly initialised GPT2Model (no LM head) in eval mode, on cfg's device and dtype."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(cfg.seed)
    special = min(50256, cfg.vocab_size - 1)  # GPT-2's <|endoftext|>, kept inside a shrunk vocabulary
    gpt2 = GPT2Config(**{**GPT2_MEDIUM, "n_layer": cfg.layers, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                         "vocab_size": cfg.vocab_size, "bos_token_id": special, "eos_token_id": special})
    model = GPT2Model(gpt2)
    return model.to(device=cfg.device, dtype=cfg.torch_dtype).eval()


def _lora_variant(base: nn.Module, cfg: Config, merge: bool) -> nn.Module:
    model = copy.deepcopy(base)
    for block in model.h:
        lora = lk.LoRALinear.from_linear(block.attn.c_attn, r=cfg.rank, alpha=cfg.alpha)
        with torch.no_grad():
            lora.lora_B.normal_(0.0, INIT_STD)  # non-zero update: the low-rank path does real work
        block.attn.c_attn = lora
        if merge:
            lora.merge()
    return model.eval()


def _adapter(cfg: Config, like: torch.Tensor) -> lk.BottleneckAdapter:
    adapter = lk.BottleneckAdapter(cfg.n_embd, bottleneck=cfg.bottleneck, activation="gelu",
                                   device=like.device, dtype=like.dtype)
    with torch.no_grad():
        adapter.up.weight.normal_(0.0, INIT_STD)  # not the identity: the adapter's output matters
        adapter.up.bias.normal_(0.0, INIT_STD)
    return adapter


def _adapter_variant(base: nn.Module, cfg: Config, placement: str) -> nn.Module:
    model = copy.deepcopy(base)
    for block in model.h:
        like = block.mlp.c_proj.weight
        if placement == "houlsby":
            block.attn.c_proj = AdaptedOutput(block.attn.c_proj, _adapter(cfg, like))
            block.mlp.c_proj = AdaptedOutput(block.mlp.c_proj, _adapter(cfg, like))
        else:  # Lin et al.: one adapter after the MLP, with its own LayerNorm in front
            norm = lk.FusedLayerNorm(cfg.n_embd, device=like.device, dtype=like.dtype)
            block.mlp.c_proj = AdaptedOutput(block.mlp.c_proj, nn.Sequential(norm, _adapter(cfg, like)))
    return model.eval()


# The eager rows: the same parameters through the plain PyTorch ops that PEFT-style code runs,
# in the model's dtype. (Not lora_kernels' torch backend: that is the correctness reference,
# which computes in fp32 and spells GELU out, so it would flatter the fused rows on a GPU.)

class EagerTwin(nn.Module):
    """Holds one lora_kernels module; the subclass's forward runs its parameters eagerly."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused = fused


class EagerLoRA(EagerTwin):
    """PEFT's LoRA forward: base(x) + B(A(x))·scaling (dropout is off in eval)."""

    def forward(self, x):
        m = self.fused
        return F.linear(x, m.base_weight(), m.bias) + F.linear(F.linear(x, m.lora_A), m.lora_B) * m.scaling


class EagerAdapter(EagerTwin):
    """x + up(act(down(x))), times the adapter's scale when it is not 1."""

    ACT = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "silu": F.silu}

    def forward(self, x):
        a = self.fused
        z = F.linear(self.ACT[a.activation](F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        return x + z if a.scale == 1.0 else x + a.scale * z


class EagerLayerNorm(EagerTwin):
    def forward(self, x):
        n = self.fused
        return F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)


EAGER_MODULES = {lk.LoRALinear: EagerLoRA, lk.BottleneckAdapter: EagerAdapter, lk.FusedLayerNorm: EagerLayerNorm}


def eager_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharing its parameters, with every lora_kernels module run eagerly."""
    twin = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) in EAGER_MODULES:
                setattr(parent, name, EAGER_MODULES[type(child)](child))
            else:
                swap(child)
    swap(twin)
    return twin.eval()


def _ln_tuning_variant(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    lk.ln_tuning(model)
    return model.eval()


def build_variants(cfg: Config) -> dict:
    """The models of the table, keyed by row name (in VARIANTS order), all with the same base
    weights; each eager row shares its fused row's model.

    Both LoRA variants draw A and B from the same seed, so they hold the same update.
    """
    base = base_model(cfg)
    variants = {BASE: base}
    for name, merge in ((MERGED, True), (UNMERGED, False)):
        torch.manual_seed(cfg.seed + 1)
        variants[name] = _lora_variant(base, cfg, merge=merge)
    torch.manual_seed(cfg.seed + 2)
    variants[HOULSBY] = _adapter_variant(base, cfg, "houlsby")
    variants[ADAPTER_L] = _adapter_variant(base, cfg, "lin")
    variants[LN_TUNING] = _ln_tuning_variant(base)
    for eager, fused in EAGER_OF.items():
        variants[eager] = eager_twin(variants[fused])
    return {name: variants[name] for name in VARIANTS}


def adaptation_params(model: nn.Module) -> int:
    """Number of parameters the adaptation adds (the paper's |Θ|)."""
    count = 0
    for module in model.modules():
        if isinstance(module, lk.LoRALinear):
            count += module.lora_A.numel() + module.lora_B.numel()
        elif isinstance(module, (lk.BottleneckAdapter, lk.FusedLayerNorm)):
            count += sum(p.numel() for p in module.parameters())
    return count


# ----------------------------------------------------------------------------- correctness

def equivalence_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Allowed relative difference between merged and unmerged LoRA through the whole model."""
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        return 1e-2 if tf32 else 1e-4
    return {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-10)


def relative_difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def last_hidden_states(variants: dict, input_ids: torch.Tensor) -> dict:
    with torch.inference_mode():
        return {name: model(input_ids, use_cache=False).last_hidden_state for name, model in variants.items()}


def check_variants(variants: dict, cfg: Config) -> dict:
    """Merged LoRA must equal unmerged LoRA; every adapted variant must differ from the base.

    Returns the relative differences; raises AssertionError when a check fails.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    ids = torch.randint(0, cfg.vocab_size, (2, min(32, max(s for _, s in cfg.settings))), generator=gen)
    out = last_hidden_states(variants, ids.to(cfg.device))
    for name, h in out.items():
        assert torch.isfinite(h).all(), f"{name}: non-finite hidden states"
    tol = equivalence_tolerance(cfg.torch_dtype, torch.device(cfg.device))
    diffs = {"tolerance": tol, "merged_vs_unmerged": relative_difference(out[MERGED], out[UNMERGED])}
    for name in (UNMERGED_EAGER, HOULSBY_EAGER, ADAPTER_L_EAGER, LN_TUNING):
        reference = EAGER_OF.get(name, BASE)  # LN-tuning (γ=1, β=0 untouched) equals the base
        diffs[f"{name} vs {reference}"] = relative_difference(out[name], out[reference])
        assert diffs[f"{name} vs {reference}"] <= tol, (
            f"{name} differs from {reference}: {diffs[f'{name} vs {reference}']:.2e} > {tol:.0e}")
    for name in (MERGED, HOULSBY, ADAPTER_L):
        diffs[f"{name} vs base"] = relative_difference(out[name], out[BASE])
    assert diffs["merged_vs_unmerged"] <= tol, (
        f"LoRA merged and unmerged outputs differ: relative difference "
        f"{diffs['merged_vs_unmerged']:.2e} > {tol:.0e}")
    for name in (MERGED, HOULSBY, ADAPTER_L):
        # an adaptation must change the output by more than the noise allowed between equivalents
        assert diffs[f"{name} vs base"] > tol, f"{name} output equals the base model's: adaptation is a no-op"
    return diffs


# ----------------------------------------------------------------------------- timing

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(forward, device: torch.device) -> float:
    """Milliseconds of one call of ``forward()`` (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    forward()
    return (time.perf_counter() - t0) * 1e3


def eager_forwards(variants: dict, input_ids: torch.Tensor) -> dict:
    """name -> a zero-argument call of that variant's forward on ``input_ids``."""
    return {name: functools.partial(model, input_ids, use_cache=False) for name, model in variants.items()}


def run_rounds(forwards: dict, device: torch.device, rounds: int, samples: dict | None,
               deadline: float = math.inf, min_rounds: int = 0) -> int:
    """``rounds`` rounds of one call of each of ``forwards`` (name -> zero-argument callable),
    rotating the order each round.

    With ``samples`` (name -> list), the times are appended to it; without, it is warm-up.
    Past ``deadline`` (a perf_counter value) it stops early, after at least ``min_rounds``.
    Returns the number of rounds run.
    """
    names = list(forwards)
    with torch.inference_mode():
        _synchronize(device)
        done = 0
        for i in range(rounds):
            if i >= min_rounds and time.perf_counter() > deadline:
                break
            for name in names[i % len(names):] + names[:i % len(names)]:
                ms = time_forward(forwards[name], device)
                if samples is not None:
                    samples[name].append(ms)
            done += 1
    return done


def capture_forward(model: nn.Module, input_ids: torch.Tensor):
    """``model(input_ids)`` captured as a CUDA graph. A replay reruns the same kernels on the
    same buffers with no Python, dispatch or launch cost: its time is the forward's GPU time.
    Autotuning must be done before (the warm-up rounds do it): a capture cannot benchmark."""
    device = input_ids.device
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # lazy set-up (cuBLAS handles, workspaces) outside the capture
        model(input_ids, use_cache=False)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(input_ids, use_cache=False)
    return graph


def capture_all(variants: dict, input_ids: torch.Tensor) -> tuple:
    """(name -> graph replay, name -> why its capture failed): a variant that cannot be
    captured is reported, never timed some other way under the graphs heading."""
    replays, failed = {}, {}
    with torch.inference_mode():
        for name, model in variants.items():
            try:
                replays[name] = capture_forward(model, input_ids).replay
            except Exception as err:  # noqa: BLE001  (any failure: report it and go on)
                failed[name] = (f"{type(err).__name__}: {err}".splitlines() or ["?"])[0][:300]
    return replays, failed


def paired_overhead_pct(times: list, base_times: list) -> float:
    """Median over rounds of (variant time / base time in the same round) − 1, in percent.

    Rounds are interleaved, so both times of a pair saw the same machine load: this is the
    overhead estimate least disturbed by other processes.
    """
    return (statistics.median(t / b for t, b in zip(times, base_times)) - 1.0) * 100.0


def summarize(times: list) -> dict:
    return {"mean_ms": statistics.fmean(times),
            "std_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
            "median_ms": statistics.median(times), "min_ms": min(times), "n": len(times),
            "samples_ms": [round(t, 4) for t in times]}


def measure_setting(variants: dict, cfg: Config, setting, progress=None, seconds: float = math.inf,
                    graphs: bool = False) -> dict:
    """Warm up, then time all variants interleaved at one (batch, seq); returns name -> stats.

    ``seconds`` bounds the whole setting: warm-up gets its pro-rata part of it (at least one
    round), timed rounds stop when it is spent and MIN_ROUNDS are done. With ``graphs``, the
    warm-up runs eagerly, then each variant is captured as a CUDA graph and the replays are
    timed; variants whose capture failed get {"capture_failed": reason} instead of times.
    """
    batch, seq = setting
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * batch + seq)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(cfg.device)
    device = ids.device
    forwards = eager_forwards(variants, ids)
    t0 = time.perf_counter()
    warm_seconds = seconds * cfg.warmup / (cfg.warmup + cfg.repeats) if cfg.warmup else 0.0
    warm = run_rounds(forwards, device, cfg.warmup, None, t0 + warm_seconds, min_rounds=min(1, cfg.warmup))
    if progress is not None:
        progress.warmed_up(time.perf_counter() - t0, warm, cfg)
    failed = {}
    if graphs:
        forwards, failed = capture_all(variants, ids)
        if BASE in failed:
            raise RuntimeError(f"CUDA graph capture of {BASE!r} failed: {failed[BASE]}")
    samples = {name: [] for name in forwards}
    run_rounds(forwards, device, cfg.repeats, samples, t0 + seconds, min_rounds=MIN_ROUNDS)
    del forwards  # the graphs, and the memory pools they hold
    stats = {name: summarize(times) for name, times in samples.items()}
    base = stats[BASE]["mean_ms"]
    for name, s in stats.items():
        s["overhead_pct"] = 0.0 if name == BASE else (s["mean_ms"] / base - 1.0) * 100.0
        s["overhead_paired_median_pct"] = (0.0 if name == BASE else
                                           paired_overhead_pct(samples[name], samples[BASE]))
    stats.update({name: {"capture_failed": reason} for name, reason in failed.items()})
    return {name: stats[name] for name in variants}


class Progress:
    """Prints a line per finished cell, with elapsed time and an ETA.

    The ETA assumes a forward pass costs ~ (64 + batch·seq) units (a fixed part that
    dominates at tiny batches, then linear in tokens), scaled by the time measured so far.
    """

    def __init__(self, cfg: Config, phase: str = "eager"):
        self.start, self.phase = time.perf_counter(), phase
        self.total_cells = len(cfg.settings) * len(VARIANTS)
        self.done_cells = 0
        self.work = [64.0 + b * s for b, s in cfg.settings]
        self.done_work = 0.0

    def setting_started(self, index: int, setting, cfg: Config) -> None:
        print(f"[{self._elapsed()}] {self.phase}: setting {index + 1}/{len(cfg.settings)} {setting_label(setting)}: "
              f"{cfg.warmup} warm-up + {cfg.repeats} timed rounds of {len(VARIANTS)} variants", flush=True)

    def warmed_up(self, seconds: float, rounds: int, cfg: Config) -> None:
        if rounds:
            print(f"[{self._elapsed()}]   warm-up {rounds} round(s) {seconds:.1f}s; {cfg.repeats} timed rounds "
                  f"would take ~{seconds / rounds * cfg.repeats:.0f}s", flush=True)

    def setting_done(self, index: int, setting, stats: dict, cfg: Config) -> None:
        self.done_work += self.work[index]
        n = stats[BASE]["n"]
        if n < cfg.repeats:
            print(f"[{self._elapsed()}]   --time-budget {cfg.time_budget:g}s reached: "
                  f"{n} of {cfg.repeats} timed rounds", flush=True)
        for name, s in stats.items():
            self.done_cells += 1
            cell = f"{format_cell(s)}  (N={s['n']})" if "n" in s else f"capture failed: {s['capture_failed']}"
            print(f"[{self._elapsed()}] cell {self.done_cells:2d}/{self.total_cells} {setting_label(setting):>8} "
                  f"{name:<21} {cell}", flush=True)
        print(f"[{self._elapsed()}] {setting_label(setting)} done{self._eta_text()}", flush=True)

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.start:6.1f}s"

    def _eta_text(self) -> str:
        remaining_work = sum(self.work) - self.done_work
        if self.done_work == 0 or remaining_work <= 0:
            return ""
        rate = (time.perf_counter() - self.start) / self.done_work
        return f", ETA {rate * remaining_work:.0f}s"


def setting_seconds(budget: float, progress: "Progress", index: int, start: float) -> float:
    """Seconds setting ``index`` may take so the whole phase keeps to ``budget`` (0: none).

    What is left of the budget is shared among the remaining settings in proportion to
    their estimated work.
    """
    if not budget:
        return math.inf
    left = budget - (time.perf_counter() - start)
    return max(left, 0.0) * progress.work[index] / sum(progress.work[index:])


# Share of --time-budget the eager phase gets when CUDA graphs are timed too (a replay costs at
# most what the eager forward does, far less at batch 1).
EAGER_SHARE = 0.6


def measure_all(variants: dict, cfg: Config, graphs: bool = False, budget: float | None = None) -> dict:
    """label -> variant name -> stats, for every (batch, seq) setting, with progress lines;
    ``graphs``: the CUDA-graph replays instead of eager forwards."""
    progress = Progress(cfg, "CUDA graphs" if graphs else "eager")
    budget = cfg.time_budget if budget is None else budget
    start = time.perf_counter()
    results = {}
    for index, setting in enumerate(cfg.settings):
        progress.setting_started(index, setting, cfg)
        seconds = setting_seconds(budget, progress, index, start)
        results[setting_label(setting)] = measure_setting(variants, cfg, setting, progress, seconds, graphs)
        progress.setting_done(index, setting, results[setting_label(setting)], cfg)
    return results


def measure_graphs(variants: dict, cfg: Config, budget: float) -> tuple:
    """(results, None) of the CUDA-graph phase, or (None, why) when it could not run: a failure
    there must not cost the eager table already measured."""
    try:
        return measure_all(variants, cfg, graphs=True, budget=budget), None
    except Exception as err:  # noqa: BLE001
        print(f"CUDA graphs phase failed, eager results kept: {type(err).__name__}: {err}", flush=True)
        return None, f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- environment

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


# ----------------------------------------------------------------------------- reporting

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


# ----------------------------------------------------------------------------- main

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
