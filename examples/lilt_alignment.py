"""LiLT-style alignment of two frozen unimodal towers into a CLIP-like model.

Follows "Contrastive Alignment of Vision to Language Through Parameter-Efficient Transfer
Learning" (LiLT, seed 002): §2 "Methods" (start from pretrained unimodal towers, lock them,
selectively unlock parameters, insert small trainable modules), §2.1's symmetric contrastive loss
(here ``lk.InfoNCELoss`` with a weight λ between the two directions, λ = ½ is eq. 1), §2.2's
layerwise (Houlsby) adapters in every layer (``lk.add_adapters``), §2.3's unlocked LayerNorms
(``lk.ln_tuning``), and §3.1 / Table 1's ablation at toy scale: frozen (a), LN only (b), projection
only = linear-probe alignment (c), LiLT_LN (d), adapters without LN (h) and LiLT_LwA (i).

1. Pretrain each tower on its own modality: a tiny HF ViT classifies scikit-learn's 8×8 digits
   (supervised, as DeiT is), a tiny HF BERT learns unsupervised SimCSE on the captions
   ("a photo of the digit seven", ...), as LiLT's SimCSE-initialised text towers. Neither ever sees the other modality.
2. Lock both; for each method of the ablation, train only its parameters on image-caption pairs
   of held-out digits, with the same steps and seed, from the same projection initialisation.
3. Report recall@1 both ways and zero-shot accuracy on a test split, with trainable-parameter
   counts, a PNG of the curves and a markdown summary in examples/results/.

    python examples/lilt_alignment.py                  # CPU, small sizes, a few minutes at most
    python examples/lilt_alignment.py --device cuda    # larger towers and longer runs on a GPU
"""
import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import example_utils as eu  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import lora_kernels as lk  # noqa: E402

NAME = "lilt_alignment"
PRESETS = {
    "small": dict(width=64, layers=2, bottleneck=16, groups=6, image_steps=400, text_steps=400, align_steps=200,
                  eval_every=50),
    "large": dict(width=256, layers=6, bottleneck=64, groups=24, image_steps=2000, text_steps=2000,
                  align_steps=800, eval_every=100),
}
# Table 1's rows at toy scale: (name, train projections, unlock LayerNorms, layerwise adapters).
METHODS = (("frozen (a)", False, False, False), ("LN only (b)", False, True, False),
           ("projection only (c)", True, False, False), ("LiLT_LN (d)", True, True, False),
           ("adapters w/o LN (h)", True, False, True), ("LiLT_LwA (i)", True, True, True))


def parse_args(argv=None):
    p = eu.parser(__doc__, NAME)
    p.add_argument("--width", type=int, help="hidden size of both towers (small 64, large 256)")
    p.add_argument("--layers", type=int, help="transformer layers per tower (small 2, large 6)")
    p.add_argument("--bottleneck", type=int, help="adapter bottleneck (small 16, large 64)")
    p.add_argument("--groups", type=int, help="contrastive groups per step, each one image of every digit "
                   "with its caption (small 6, large 24)")
    p.add_argument("--image-steps", type=int, help="ViT pretraining steps (digit classification)")
    p.add_argument("--text-steps", type=int, help="BERT pretraining steps (unsupervised SimCSE on the captions)")
    p.add_argument("--text-lr", type=float, default=1e-3, help="SimCSE learning rate of the text tower")
    p.add_argument("--align-steps", type=int, help="alignment steps of each method")
    p.add_argument("--eval-every", type=int, help="evaluate the test split every N alignment steps")
    p.add_argument("--lr", type=float, default=3e-3, help="alignment learning rate (AdamW, weight decay 0.02 "
                   "as in LiLT §2.4, cosine schedule)")
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.5,
                   help="weight of the image→text direction of InfoNCE (0.5: LiLT's eq. 1)")
    p.add_argument("--methods", default="a,b,c,d,h,i",
                   help="Table 1 rows to run, by letter (default: all of a,b,c,d,h,i; i is saved)")
    p.add_argument("--embed-dim", type=int, default=None, help="shared embedding size (default: width / 2)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data and towers

def make_data():
    images, labels = eu.load_digits_tensors()
    pre, align, test = eu.split_indices(len(labels), (0.5, 0.25, 0.25), seed=4321)
    tokenizer = eu.WordTokenizer([c for c, _ in eu.all_captions()])
    return {"pretrain": (images[pre], labels[pre]), "align": (images[align], labels[align]),
            "test": (images[test], labels[test]), "tokenizer": tokenizer}


def build_towers(args, tokenizer):
    w, heads = args.width, max(1, args.width // 32)
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=w, intermediate_size=4 * w,
        num_hidden_layers=args.layers, num_attention_heads=heads), add_pooling_layer=False)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=w, intermediate_size=4 * w, num_hidden_layers=args.layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.max_length, pad_token_id=tokenizer.pad_id),
        add_pooling_layer=False)
    return vit, bert


def image_cls(vit, images):
    """The [CLS] state after the final LayerNorm: the image representation (LiLT §2.1)."""
    return vit(pixel_values=(images - 0.3) / 0.4).last_hidden_state[:, 0]


def text_cls(bert, texts, tokenizer, device):
    ids, mask = tokenizer(texts, device)
    return bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]


def pretrain_image(vit, data, args, device) -> list:
    head = nn.Linear(args.width, 10).to(device)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.02)
    sched = eu.cosine_lr(opt, args.image_steps, warmup=args.image_steps // 10)
    images, labels = data["pretrain"]
    g, losses = torch.Generator().manual_seed(args.seed + 1), []
    vit.train()
    bar = eu.progress(range(args.image_steps), args, "pretrain ViT (classify digits)")
    for _ in bar:
        idx = torch.randint(len(labels), (64,), generator=g)
        loss = nn.functional.cross_entropy(head(image_cls(vit, images[idx].to(device))), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    vit.eval()
    return losses


def pretrain_text(bert, tokenizer, args, device) -> list:
    """Unsupervised SimCSE on the captions alone, as LiLT's text towers were (§2.4): two dropout
    views of the same caption are the positive pair, the batch's other captions the negatives,
    trained with the same fused InfoNCE (temperature 0.05). The [CLS] state learns to tell the
    captions apart, digit word included, without ever being told which digit a caption names."""
    captions = [c for c, _ in eu.all_captions()]
    loss_fn = lk.InfoNCELoss(normalize=True)
    opt = torch.optim.AdamW(bert.parameters(), lr=args.text_lr, weight_decay=0.02)
    sched = eu.cosine_lr(opt, args.text_steps, warmup=args.text_steps // 10)
    g, losses = torch.Generator().manual_seed(args.seed + 2), []
    bert.train()  # dropout on: it makes the two views
    bar = eu.progress(range(args.text_steps), args, "pretrain BERT (SimCSE on captions)")
    for _ in bar:
        batch = [captions[i] for i in torch.randperm(len(captions), generator=g)[:64]]  # distinct captions
        loss = loss_fn(text_cls(bert, batch, tokenizer, device), text_cls(bert, batch, tokenizer, device), 20.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bert.eval()
    return losses


# ----------------------------------------------------------------------------- alignment

class TwoTower(nn.Module):
    """Frozen-able towers, a trainable linear projection θ on each [CLS] (LiLT §2.1), a temperature."""

    def __init__(self, vit, bert, width, embed_dim, seed):
        super().__init__()
        self.vit, self.bert = vit, bert
        torch.manual_seed(seed)  # every method starts from the same projections
        self.image_proj = nn.Linear(width, embed_dim, bias=False)
        self.text_proj = nn.Linear(width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images):
        return self.image_proj(image_cls(self.vit, images))

    def encode_text(self, texts, tokenizer, device):
        return self.text_proj(text_cls(self.bert, texts, tokenizer, device))


def prepare(model: TwoTower, projections: bool, layer_norms: bool, adapters: bool, bottleneck: int) -> TwoTower:
    """Lock everything, then unlock / insert the method's parameters with lora_kernels' surgery
    (``freeze_others=False``: each method leaves the other's parameters trainable)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for tower in (model.vit, model.bert):
        if adapters:
            lk.add_adapters(tower, placement="houlsby", bottleneck=bottleneck, freeze_others=False)
        if layer_norms:
            lk.ln_tuning(tower, freeze_others=False)
    if projections:
        for p in (*model.image_proj.parameters(), *model.text_proj.parameters(), model.logit_scale):
            p.requires_grad_(True)
    return model


@torch.no_grad()
def evaluate(model, split, tokenizer, device) -> dict:
    model.eval()
    images, labels = split
    img = torch.cat([model.encode_image(images[i:i + 512].to(device)) for i in range(0, len(images), 512)])
    texts = eu.random_captions(labels, torch.Generator().manual_seed(7))
    txt = model.encode_text(texts, tokenizer, device)
    classes = model.encode_text([c for c, _ in eu.all_captions()], tokenizer, device).view(10, len(eu.TEMPLATES), -1)
    labels = labels.to(device)
    return {"zero_shot": eu.zero_shot_accuracy(img, classes, labels), **eu.retrieval(img, txt, labels, labels)}


def align(model, data, args, device, desc):
    tokenizer = data["tokenizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    evals = [(0, evaluate(model, data["test"], tokenizer, device))]
    if not params:
        return [], evals
    loss_fn = lk.InfoNCELoss(lambda_=args.lambda_, normalize=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.02)
    sched = eu.cosine_lr(opt, args.align_steps, warmup=args.align_steps // 10)
    images, labels = data["align"]
    g, losses = torch.Generator().manual_seed(args.seed + 3), []
    bar = eu.progress(range(args.align_steps), args, desc)
    for step in bar:
        model.train()
        idx = eu.digit_groups(labels, args.groups, g).flatten()
        img = model.encode_image(images[idx].to(device)).view(args.groups, 10, -1)
        txt = model.encode_text(eu.random_captions(labels[idx], g), tokenizer, device).view(args.groups, 10, -1)
        scale = model.logit_scale.exp()
        loss = sum(loss_fn(i, t, scale) for i, t in zip(img, txt)) / args.groups
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.align_steps:
            evals.append((step + 1, evaluate(model, data["test"], tokenizer, device)))
    model.eval()
    return losses, evals


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_aligned(checkpoint: Path, args, tokenizer):
    """Rebuild the LiLT_LwA model from the saved pretrained towers and its saved trainable weights."""
    from safetensors.torch import load_file

    vit = transformers.ViTModel.from_pretrained(checkpoint / "vit", add_pooling_layer=False)
    bert = transformers.BertModel.from_pretrained(checkpoint / "bert", add_pooling_layer=False)
    model = prepare(TwoTower(vit, bert, args.width, args.embed_dim, args.seed), True, True, True, args.bottleneck)
    _, unexpected = model.load_state_dict(load_file(str(checkpoint / "lilt_lwa.safetensors")), strict=False)
    if unexpected:
        raise ValueError(f"unexpected keys: {unexpected}")
    return model.eval()


def main(argv=None) -> dict:
    args = parse_args(argv)
    eu.fill_defaults(args, PRESETS)
    args.embed_dim = args.embed_dim or args.width // 2
    device = eu.setup(args)
    used = eu.print_backends(device, ("layer_norm", "adapter", "infonce"))
    with eu.Timer() as timer:
        data = make_data()
        tok = data["tokenizer"]
        vit, bert = build_towers(args, tok)
        vit, bert = vit.to(device), bert.to(device)
        image_losses = pretrain_image(vit, data, args, device)
        text_losses = pretrain_text(bert, tok, args, device)
        checkpoint = args.out_dir / f"{NAME}_weights"
        vit.save_pretrained(checkpoint / "vit")
        bert.save_pretrained(checkpoint / "bert")
        runs = {}
        chosen = {m.strip() for m in args.methods.split(",")}
        for name, projections, layer_norms, adapters in METHODS:
            if name[-2] not in chosen:
                continue
            model = TwoTower(copy.deepcopy(vit), copy.deepcopy(bert), args.width, args.embed_dim, args.seed).to(device)
            prepare(model, projections, layer_norms, adapters, args.bottleneck)
            trainable, total = eu.count_parameters(model)
            losses, evals = align(model, data, args, device, name)
            runs[name] = {"model": model, "trainable": trainable, "total": total, "losses": losses, "evals": evals}
            last = evals[-1][1]
            print(f"{name}: image→text R@1 {eu.pct(last['i2t_r1'])}, text→image R@1 {eu.pct(last['t2i_r1'])}, "
                  f"zero-shot {eu.pct(last['zero_shot'])} ({trainable:,} of {total:,} parameters trained)", flush=True)
        from safetensors.torch import save_file

        if "LiLT_LwA (i)" in runs:
            save_file(trainable_state(runs["LiLT_LwA (i)"]["model"]), str(checkpoint / "lilt_lwa.safetensors"))
    result = report(args, device, used, timer.seconds, image_losses, text_losses, runs)
    result.update(checkpoint=checkpoint, data=data, models={k: v["model"] for k, v in runs.items()}, args=args)
    return result


def report(args, device, used, seconds, image_losses, text_losses, runs) -> dict:
    lines = [f"Two towers pretrained apart (ViT: {args.image_steps} steps of digit classification; BERT: "
             f"{args.text_steps} steps of unsupervised SimCSE on the captions), locked, then aligned for "
             f"{args.align_steps} steps with the fused symmetric InfoNCE (λ = {args.lambda_}) on held-out digits; "
             "metrics on a test split "
             "(recall@1: a hit is an item of the query's digit). LiLT (seed 002) §2, Table 1's rows in parentheses.",
             "", "| method | trainable params | image→text R@1 | text→image R@1 | zero-shot acc |",
             "|---|---|---|---|---|"]
    for name, r in runs.items():
        m = r["evals"][-1][1]
        share = 100 * r["trainable"] / r["total"]
        lines.append(f"| {name} | {r['trainable']:,} ({share:.2f}%) | {eu.pct(m['i2t_r1'])} | "
                     f"{eu.pct(m['t2i_r1'])} | {eu.pct(m['zero_shot'])} |")
    lines += ["", f"![curves]({NAME}.png)", ""] + eu.environment_lines(args, device, used, seconds)
    eu.write_summary(args.out_dir / f"{NAME}.md", "LiLT-style alignment of two frozen towers", lines)
    trained = {n: r for n, r in runs.items() if r["losses"]}

    def metric(key):
        return {n: ([s for s, _ in r["evals"]], [e[key] for _, e in r["evals"]]) for n, r in trained.items()}
    first = next(iter(runs.values()))["evals"][0][1]  # every method starts from the same towers and projections
    eu.plot_panels(args.out_dir / f"{NAME}.png", "LiLT-style alignment of frozen towers (toy scale)", [
        ("unimodal pretraining loss", "loss (10-step mean)",
         {"ViT: digit classes": (list(range(1, len(image_losses) + 1)), eu.smooth(image_losses)),
          "BERT: SimCSE InfoNCE": (list(range(1, len(text_losses) + 1)), eu.smooth(text_losses))}, None),
        ("alignment loss", "InfoNCE (10-step mean)",
         {n: (list(range(1, len(r["losses"]) + 1)), eu.smooth(r["losses"])) for n, r in trained.items()}, None),
        ("image→text recall@1, test split", "recall@1", metric("i2t_r1"), {"frozen (a)": first["i2t_r1"]}),
        ("text→image recall@1, test split", "recall@1", metric("t2i_r1"), {"frozen (a)": first["t2i_r1"]}),
    ])
    print("\n".join(lines[2:2 + len(runs) + 2]))
    print(f"wrote {args.out_dir / (NAME + '.md')} and {NAME}.png", flush=True)
    return {n: {"trainable": r["trainable"], "total": r["total"], "before": r["evals"][0][1],
                "after": r["evals"][-1][1], "losses": r["losses"]} for n, r in runs.items()}


if __name__ == "__main__":
    main()
