"""make bench's settings: the variants' names, the paper's sizes, the device defaults and the
command line (``latency_table.py`` is the entry point)."""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("lora_kernels") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

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


def build_parser(doc: str = "") -> argparse.ArgumentParser:
    """The command line; ``doc`` (the script's docstring) gives the description and the epilog."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
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
