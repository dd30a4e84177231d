"""What the three examples share: the digits data and their captions, a word tokenizer built from
the captions, retrieval metrics, the device/backend report, the machine description, plots and
the markdown summary. Plain PyTorch; nothing here knows about lora_kernels' internals except the
backend report, which asks the dispatcher which backend ``auto`` resolves to."""
import argparse
import datetime as _dt
import importlib
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built from a config: never download

import numpy as np
import torch

# Run against the checkout the examples live in (an editable install elsewhere, or none at all,
# would otherwise decide which lora_kernels is imported).
if (Path(__file__).resolve().parents[1] / "lora_kernels" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora_kernels as lk  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent
RESULTS_DIR = EXAMPLES_DIR / "results"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Several phrasings per digit, so that retrieval has many captions per class and the text tower
# has to find the one informative word among varying context.
TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {} written by hand",
             "a small picture of a {}", "a scan of the digit {}", "a blurry {}",
             "an image showing a {}", "a drawing of the number {}")


# ----------------------------------------------------------------------------- data

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_digits_tensors():
    """scikit-learn's 8×8 digits (1797 images, shipped inside the package): images [N, 1, 8, 8]
    scaled to [0, 1] and labels [N]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


def split_indices(n: int, fractions, seed: int) -> list:
    """A seeded random partition of range(n) into len(fractions) parts (the last takes the rest)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for i, f in enumerate(fractions):
        stop = n if i == len(fractions) - 1 else start + int(round(f * n))
        parts.append(perm[start:stop])
        start = stop
    return parts


def digit_groups(labels: torch.Tensor, groups: int, generator: torch.Generator) -> torch.Tensor:
    """Indices [groups, 10]: each row one random image of each digit, in random order.

    A contrastive batch of 8×8 digits drawn at random holds several images of the same digit,
    and InfoNCE would push each away from captions that describe it just as well (false
    negatives). One image per digit per group removes them: the image→text half of the loss is
    then the cross-entropy over the ten class captions."""
    rows = []
    for _ in range(groups):
        row = []
        for d in torch.randperm(10, generator=generator).tolist():
            pool = (labels == d).nonzero().flatten()
            row.append(pool[torch.randint(len(pool), (1,), generator=generator)])
        rows.append(torch.cat(row))
    return torch.stack(rows)


def caption(label: int, template: int) -> str:
    return TEMPLATES[template].format(DIGIT_WORDS[label])


def all_captions():
    """Every (caption, label) pair: len(TEMPLATES) phrasings of each of the ten digits."""
    return [(caption(d, t), d) for d in range(10) for t in range(len(TEMPLATES))]


def random_captions(labels: torch.Tensor, generator: torch.Generator) -> list:
    templates = torch.randint(len(TEMPLATES), (len(labels),), generator=generator)
    return [caption(int(d), int(t)) for d, t in zip(labels, templates)]


class WordTokenizer:
    """Word-level tokenizer whose vocabulary is the words of the captions.

    Ids: 0 pad, 1 bos (BERT's [CLS]), 2 mask, 3 eos (BERT's [SEP]), 4 unk, then the words. The
    eos id is not 2 on purpose: HF CLIP treats eos_token_id == 2 as a legacy config and pools
    at the largest token id instead of at the eos token.
    """
    SPECIALS = ("[PAD]", "[BOS]", "[MASK]", "[EOS]", "[UNK]")
    pad_id, bos_id, mask_id, eos_id, unk_id = range(5)

    def __init__(self, texts):
        words = sorted({w for t in texts for w in t.lower().split()})
        self.vocab = {w: i for i, w in enumerate(self.SPECIALS + tuple(words))}
        self.max_words = max(len(t.split()) for t in texts)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def max_length(self) -> int:
        return self.max_words + 2

    def __call__(self, texts, device="cpu"):
        """(input_ids, attention_mask), both [len(texts), max_length], right-padded."""
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.vocab.get(w, self.unk_id) for w in text.lower().split()][: self.max_words]
            tokens = [self.bos_id] + tokens + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids.to(device), (ids != self.pad_id).long().to(device)


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def retrieval(image_emb, text_emb, image_labels, text_labels) -> dict:
    """Recall@1 both ways on L2-normalised embeddings. Captions repeat (one digit has many
    images and several phrasings), so a hit is a retrieved item of the query's digit, as in
    COCO retrieval where each image has several correct captions."""
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    sim = image_emb @ text_emb.T
    i2t = (text_labels[sim.argmax(1)] == image_labels).float().mean().item()
    t2i = (image_labels[sim.argmax(0)] == text_labels).float().mean().item()
    return {"i2t_r1": i2t, "t2i_r1": t2i}


@torch.no_grad()
def zero_shot_accuracy(image_emb, class_text_emb, image_labels) -> float:
    """CLIP's zero-shot classifier: the class whose (template-averaged) text embedding is nearest.
    class_text_emb: [10, len(TEMPLATES), D] or [10, D]."""
    t = torch.nn.functional.normalize(class_text_emb.float(), dim=-1)
    if t.dim() == 3:  # prompt ensembling as in CLIP: average the normalised templates per class
        t = torch.nn.functional.normalize(t.mean(1), dim=-1)
    i = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    return ((i @ t.T).argmax(1) == image_labels).float().mean().item()


def count_parameters(*modules) -> tuple:
    """(trainable, total) parameter counts over the given modules (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for m in modules:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def cosine_lr(optimizer, steps: int, warmup: int = 0):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- run setup and report

def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The script's parser: its docstring's first paragraph as the description, the rest as the
    epilog, and the options every example shares."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog="\n\n".join(doc.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p, name)
    return p


def common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu). On a GPU the "
                        "defaults grow (see --size)")
    parser.add_argument("--size", choices=("auto", "small", "large"), default="auto",
                        help="model and run sizes: small (CPU, <= 3 min), large (GPU); auto: by --device")
    parser.add_argument("--backend", default=None, help="lora_kernels backend: auto | triton | cuda | torch "
                        "(default: LORA_KERNELS_BACKEND or auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help=f"where {name}.png, {name}.md and the saved weights go (default: examples/results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default on CPU: 1; the tiny matrices gain nothing from more)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def resolve_size(args) -> str:
    if args.size != "auto":
        return args.size
    return "large" if torch.device(args.device).type == "cuda" else "small"


def fill_defaults(args, presets: dict) -> None:
    """Arguments left at None take the preset of the chosen size."""
    size = resolve_size(args)
    for key, value in presets[size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.size = size


def setup(args) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is visible to PyTorch")
    if args.backend is not None:
        lk.set_backend(args.backend)
    if args.threads is not None or device.type == "cpu":
        # At width 64 a step is dispatch-bound: on the 2-core test machine one thread ran a CLIP
        # step in ~25 ms and two threads in ~90 ms when other jobs shared the cores.
        torch.set_num_threads(args.threads or 1)
    set_seed(args.seed)
    return device


def backends_used(device: torch.device, ops=("layer_norm", "adapter", "lora_linear", "infonce")) -> dict:
    """The backend choice and what it resolves to for an fp32 tensor on ``device``, per op."""
    from lora_kernels import backend

    modules = {"lora_linear": "lora", "adapter": "adapter", "layer_norm": "layer_norm", "infonce": "infonce"}
    x = torch.empty(2, 8, device=device)
    used = {"requested": lk.get_backend()}
    for op in ops:
        try:
            impls = importlib.import_module(f"lora_kernels.ops.{modules[op]}").IMPLS
            used[op] = backend.selected_name(op, impls, x)
        except Exception as err:  # report it: the run itself raises the same error when it calls the op
            used[op] = f"unavailable ({err})"
    return used


def print_backends(device, ops) -> dict:
    used = backends_used(device, ops)
    print(f"lora_kernels backend: {used['requested']} -> "
          + ", ".join(f"{op}: {used[op]}" for op in ops), flush=True)
    return used


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (host: {cpu_name()}, {os.cpu_count()} cores)"
    return f"{cpu_name()}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> str:
    try:
        def git(*a):
            return subprocess.run(["git", *a], cwd=EXAMPLES_DIR, capture_output=True, text=True, timeout=10)
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        # The results a run rewrites are tracked too: they do not make the code dirty.
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                    ":(top,exclude)examples/results").stdout.strip()
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def progress(iterable, args, desc: str, total=None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=args.no_progress, leave=False, dynamic_ncols=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def environment_lines(args, device, used: dict, seconds: float) -> list:
    import transformers

    load = load_average()
    script = sys.argv[0]
    command = f"python {' '.join([Path(script).name] + sys.argv[1:])}" if script.endswith(".py") else "(in-process)"
    return [
        f"- machine: {machine()}; device `{device}`"
        + (f"; 1-min load average at the end {load}" if load is not None else ""),
        f"- lora_kernels backend: {used['requested']} -> "
        + ", ".join(f"{k}: {v}" for k, v in used.items() if k != "requested"),
        f"- commit {git_commit()}, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- command: `{command}`"
        f" ({args.size} sizes, seed {args.seed}); wall time {seconds:.0f} s",
    ]


def write_summary(path: Path, title: str, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + "\n".join(lines).rstrip() + "\n")


def plot_panels(path: Path, title: str, panels) -> None:
    """panels: [(axis title, y label, {curve label: (xs, ys)} , {hline label: y})]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 if len(panels) == 4 else len(panels)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows))
    axes = np.atleast_1d(axes).flatten()
    for ax, (name, ylabel, curves, hlines) in zip(axes, panels):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 12 else None, markersize=3)
        for i, (label, y) in enumerate((hlines or {}).items()):
            ax.axhline(y, linestyle="--", color=f"C{len(curves) + i}", label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smooth(values, window: int = 10) -> list:
    """Trailing mean, so that noisy per-step losses read as curves."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"
