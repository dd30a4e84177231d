"""LayerNorm-tuning of a small CLIP under a distribution shift, against full fine-tuning and the
frozen model.

Follows "How to Adapt Your Large-Scale Vision-and-Language Model" (seed 003): §3.1 "LayerNorm
Tuning" (train only γ/β of every LayerNorm in both encoders, everything else frozen), compared as
in §4.1 with zero-shot CLIP (here: the frozen model) and full fine-tuning, on a shifted domain as
in §4.4, with the appendix's optimiser (AdamW, weight decay 0.02, cosine schedule). Two
differences, both from the toy scale: the CLIP is not downloaded but pretrained here, and the
tuning loss is CLIP's own symmetric contrastive loss on image-caption pairs (``lk.InfoNCELoss``)
where the paper uses cross-entropy over the class prompts; the image→text half of the loss is
that cross-entropy with the batch's captions as the classes.

1. Pretrain a tiny HF ``CLIPModel`` (built from a config) contrastively on one split of
   scikit-learn's 8×8 digits, with captions such as "a photo of the digit seven".
2. Shift the remaining digits (default: heavy Gaussian pixel noise); split them into a
   tuning set and a test set.
3. From the same pretrained weights: frozen; ``lk.ln_tuning``; full fine-tuning. Report zero-shot
   accuracy and image↔text recall@1 on the shifted test set before and after, with trainable
   parameter counts, a PNG of the curves and a markdown summary in examples/results/.

    python examples/clip_ln_tuning.py                  # CPU, small sizes, a few minutes at most
    python examples/clip_ln_tuning.py --device cuda    # larger model and longer runs on a GPU
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import example_utils as eu  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)

import torch  # noqa: E402
import transformers  # noqa: E402

import lora_kernels as lk  # noqa: E402

NAME = "clip_ln_tuning"
PRESETS = {
    "small": dict(width=64, layers=2, groups=6, pretrain_steps=800, tune_steps=200, eval_every=50),
    "large": dict(width=256, layers=6, groups=24, pretrain_steps=3000, tune_steps=600, eval_every=50),
}


def parse_args(argv=None):
    p = eu.parser(__doc__, NAME)
    p.add_argument("--width", type=int, help="hidden size of both towers (small 64, large 256)")
    p.add_argument("--layers", type=int, help="transformer layers per tower (small 2, large 6)")
    p.add_argument("--groups", type=int, help="contrastive groups per step, each one image of every digit "
                   "with its caption (small 6, large 24)")
    p.add_argument("--pretrain-steps", type=int, help="contrastive pretraining steps (small 800)")
    p.add_argument("--tune-steps", type=int, help="steps of each tuning method (small 200)")
    p.add_argument("--eval-every", type=int, help="evaluate the shifted test set every N steps")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--ln-lr", type=float, default=1e-2, help="LN-tuning learning rate (few parameters: a larger step)")
    p.add_argument("--full-lr", type=float, default=5e-4, help="full fine-tuning learning rate (the paper's 5e-4)")
    p.add_argument("--shift", choices=("rotate", "invert", "noise"), default="noise",
                   help="the shift of the tuning/test images. noise (default): Gaussian pixel noise, σ = 0.375 "
                        "of the pixel range; rotate: 90° plus σ = 0.15 noise; invert: 1 − x plus σ = 0.15 noise")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def shifted(images: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = 0.15 * torch.randn(images.shape, generator=g)
    if kind == "rotate":
        images = torch.rot90(images, 1, dims=(2, 3))
    elif kind == "invert":
        images = 1.0 - images
    elif kind == "noise":
        noise = noise * 2.5
    return (images + noise).clamp(0.0, 1.0)


def make_data(args):
    images, labels = eu.load_digits_tensors()
    pre, tune, test = eu.split_indices(len(labels), (0.5, 0.25, 0.25), seed=1234)
    captions = eu.all_captions()
    tokenizer = eu.WordTokenizer([c for c, _ in captions])
    return {
        "pretrain": (images[pre], labels[pre]),
        "tune": (shifted(images[tune], args.shift, seed=1), labels[tune]),
        "test": (shifted(images[test], args.shift, seed=2), labels[test]),
        "test_clean": (images[test], labels[test]),
        "tokenizer": tokenizer,
    }


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.3) / 0.4  # roughly the digits' mean and std: inputs near zero mean, unit scale


# ----------------------------------------------------------------------------- model

def build_clip(args, tokenizer) -> transformers.CLIPModel:
    w, layers = args.width, args.layers
    heads = max(1, w // 32)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=w, intermediate_size=4 * w, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=tokenizer.max_length,
                         pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id),
        vision_config=dict(image_size=8, patch_size=2, num_channels=1, hidden_size=w, intermediate_size=4 * w,
                           num_hidden_layers=layers, num_attention_heads=heads),
        projection_dim=w // 2)
    return transformers.CLIPModel(config)


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers < 5 returned tensors


def image_features(model, images):
    return _tensor(model.get_image_features(pixel_values=normalize_pixels(images)))


def text_features(model, texts, tokenizer, device):
    ids, mask = tokenizer(texts, device)
    return _tensor(model.get_text_features(input_ids=ids, attention_mask=mask))


@torch.no_grad()
def evaluate(model, split, tokenizer, device) -> dict:
    """Zero-shot accuracy (template-averaged class prompts) and recall@1 both ways, where the
    texts are one seeded caption per test image."""
    was_training = model.training
    model.eval()
    images, labels = split
    img = torch.cat([image_features(model, images[i:i + 512].to(device)) for i in range(0, len(images), 512)])
    captions = eu.all_captions()
    classes = text_features(model, [c for c, _ in captions], tokenizer, device).view(10, len(eu.TEMPLATES), -1)
    texts = eu.random_captions(labels, torch.Generator().manual_seed(7))
    txt = text_features(model, texts, tokenizer, device)
    labels = labels.to(device)
    model.train(was_training)
    return {"zero_shot": eu.zero_shot_accuracy(img, classes, labels), **eu.retrieval(img, txt, labels, labels)}


# ----------------------------------------------------------------------------- training

def train(model, params, split, tokenizer, device, args, steps, lr, desc, eval_split=None):
    """Contrastive training with the fused symmetric InfoNCE; returns the loss curve and the
    (step, metrics) evaluations of ``eval_split`` along the way."""
    loss_fn = lk.InfoNCELoss(normalize=True)  # CLIP's cosine similarity: the L2 norm is fused into the loss
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.02)
    sched = eu.cosine_lr(opt, steps, warmup=min(50, steps // 10))
    images, labels = split
    g = torch.Generator().manual_seed(args.seed + 17)
    losses, evals = [], []
    if eval_split is not None:
        evals.append((0, evaluate(model, eval_split, tokenizer, device)))
    model.train()
    bar = eu.progress(range(steps), args, desc)
    for step in bar:
        groups = eu.digit_groups(labels, args.groups, g)
        idx = groups.flatten()
        img = image_features(model, images[idx].to(device)).view(args.groups, 10, -1)
        txt = text_features(model, eu.random_captions(labels[idx], g), tokenizer, device).view(args.groups, 10, -1)
        scale = model.logit_scale.exp()
        loss = sum(loss_fn(i, t, scale) for i, t in zip(img, txt)) / args.groups
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, 4.6052)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if eval_split is not None and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
            evals.append((step + 1, evaluate(model, eval_split, tokenizer, device)))
    model.eval()
    return losses, evals


def save_ln(model, path: Path) -> None:
    """The LN-tuned parameters alone (what a user would ship): a few KB next to the frozen model."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))


def load_ln(model, path: Path):
    """Put saved LN parameters into a copy of the pretrained model, after ln_tuning (same keys)."""
    from safetensors.torch import load_file

    lk.ln_tuning(model)
    _, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected:
        raise ValueError(f"unexpected keys in {path}: {unexpected}")
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    eu.fill_defaults(args, PRESETS)
    device = eu.setup(args)
    used = eu.print_backends(device, ("layer_norm", "infonce"))
    with eu.Timer() as timer:
        data = make_data(args)
        tok = data["tokenizer"]
        base = build_clip(args, tok).to(device)
        print(f"CLIP: width {args.width}, {args.layers} layers per tower, "
              f"{sum(p.numel() for p in base.parameters()):,} parameters; shift: {args.shift}", flush=True)
        pre_losses, _ = train(base, list(base.parameters()), data["pretrain"], tok, device, args,
                              args.pretrain_steps, args.pretrain_lr, "pretrain (full, clean digits)")
        ckpt = args.out_dir / f"{NAME}_weights"
        base.save_pretrained(ckpt / "pretrained")
        clean = evaluate(base, data["test_clean"], tok, device)
        frozen = evaluate(base, data["test"], tok, device)
        print(f"pretrained: zero-shot {eu.pct(clean['zero_shot'])} on clean test digits, "
              f"{eu.pct(frozen['zero_shot'])} on shifted ones", flush=True)

        runs = {}
        for method, lr in (("LN-tuning", args.ln_lr), ("full fine-tuning", args.full_lr)):
            model = copy.deepcopy(base)
            if method == "LN-tuning":
                lk.ln_tuning(model)
            else:
                for p in model.parameters():
                    p.requires_grad_(True)
            trainable, total = eu.count_parameters(model)
            losses, evals = train(model, [p for p in model.parameters() if p.requires_grad], data["tune"], tok,
                                  device, args, args.tune_steps, lr, method, eval_split=data["test"])
            runs[method] = {"model": model, "trainable": trainable, "total": total, "losses": losses, "evals": evals,
                            "clean": evaluate(model, data["test_clean"], tok, device)}
            print(f"{method}: zero-shot {eu.pct(evals[0][1]['zero_shot'])} -> {eu.pct(evals[-1][1]['zero_shot'])} "
                  f"({trainable:,} of {total:,} parameters trained)", flush=True)
        save_ln(runs["LN-tuning"]["model"], ckpt / "ln_params.safetensors")
    trainable_frozen = 0, sum(p.numel() for p in base.parameters())
    result = report(args, device, used, timer.seconds, pre_losses, frozen, clean, runs, trainable_frozen)
    result.update(checkpoint=ckpt, data=data, models={k: v["model"] for k, v in runs.items()}, base=base)
    return result


DIRECTION = {"i2t_r1": "image→text", "t2i_r1": "text→image"}


def report(args, device, used, seconds, pre_losses, frozen, clean, runs, frozen_counts) -> dict:
    rows = [("frozen (zero-shot)", frozen_counts, frozen, clean)]
    rows += [(m, (r["trainable"], r["total"]), r["evals"][-1][1], r["clean"]) for m, r in runs.items()]
    lines = [f"Tiny CLIP pretrained contrastively on clean 8×8 digits ({args.pretrain_steps} steps), then tuned "
             f"for {args.tune_steps} steps on shifted digits (`--shift {args.shift}`); metrics on the shifted test "
             "set (recall@1: a hit is an item of the query's digit). Seed 003 §3.1, §4.1, §4.4.", "",
             "| method | trainable params | zero-shot acc | image→text R@1 | text→image R@1 "
             "| zero-shot acc, clean digits |",
             "|---|---|---|---|---|---|"]
    for name, (tr, tot), m, c in rows:
        lines.append(f"| {name} | {tr:,} ({100 * tr / tot:.2f}%) | {eu.pct(m['zero_shot'])} | {eu.pct(m['i2t_r1'])} | "
                     f"{eu.pct(m['t2i_r1'])} | {eu.pct(c['zero_shot'])} |")
    lines += ["", f"![curves]({NAME}.png)", ""] + eu.environment_lines(args, device, used, seconds)
    eu.write_summary(args.out_dir / f"{NAME}.md", "CLIP LayerNorm-tuning under a distribution shift", lines)
    curves = {m: ([s for s, _ in r["evals"]], [e["zero_shot"] for _, e in r["evals"]]) for m, r in runs.items()}
    recall = {f"{m}, {DIRECTION[k]}": ([s for s, _ in r["evals"]], [e[k] for _, e in r["evals"]])
              for m, r in runs.items() for k in ("i2t_r1", "t2i_r1")}
    losses = {m: (list(range(1, len(r["losses"]) + 1)), eu.smooth(r["losses"])) for m, r in runs.items()}
    eu.plot_panels(args.out_dir / f"{NAME}.png", f"CLIP LN-tuning vs full fine-tuning, shifted digits ({args.shift})", [
        ("pretraining loss (clean digits)", "InfoNCE (10-step mean)",
         {"pretrain": (list(range(1, len(pre_losses) + 1)), eu.smooth(pre_losses))}, None),
        ("tuning loss (shifted digits)", "InfoNCE (10-step mean)", losses, None),
        ("zero-shot accuracy, shifted test set", "accuracy", curves, {"frozen": frozen["zero_shot"]}),
        ("recall@1, shifted test set", "recall@1", recall, None),
    ])
    print("\n".join(lines[3:3 + len(rows) + 1]))
    print(f"wrote {args.out_dir / (NAME + '.md')} and {NAME}.png", flush=True)
    return {"frozen": frozen, "clean": clean, "pretrain_losses": pre_losses,
            **{m: {"trainable": r["trainable"], "total": r["total"], "before": r["evals"][0][1],
                   "after": r["evals"][-1][1], "losses": r["losses"]} for m, r in runs.items()}}


if __name__ == "__main__":
    main()
