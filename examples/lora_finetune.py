"""LoRA fine-tuning of a small GPT-2, whose adapter then serves from PEFT.

Follows the LoRA slides (seeds 000/001): "Problem statement - conditional language modeling
objective" (maximise Σ log P(y_t | x, y_<t): the loss counts only the answer tokens), and "4.
Low-rank Adaptation": W0 frozen, ΔW = BA with A Gaussian and B zero at the start, scaled by α/r,
applied to the attention projections; no added inference latency once BA is merged into W0.

1. "Pretrain" a tiny HF GPT-2 (built from a config) on a copy task: "abcd>" -> "abcd".
2. Freeze it and fine-tune LoRA (``lk.apply_lora``, or ``--surgery peft``: PEFT's
   ``get_peft_model`` then ``lk.from_peft``) on a new task: each letter shifted by one,
   "abcd>" -> "bcde" (``--task reverse``: "dcba").
   Greedy-decoding exact match on held-out prompts is measured along the way.
3. ``lk.save_adapter`` writes PEFT's format; ``peft.PeftModel.from_pretrained`` loads it on a
   fresh copy of the base model and must generate the same tokens.
4. Batch-1 forward latency: base model, LoRA unmerged, LoRA merged (``LoRALinear.merge``).
A PNG of the curves and a markdown summary go to examples/results/.

    python examples/lora_finetune.py                  # CPU, small sizes, a few minutes at most
    python examples/lora_finetune.py --device cuda    # a larger model and longer runs on a GPU
"""
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import example_utils as eu  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)

import torch  # noqa: E402
import transformers  # noqa: E402

import lora_kernels as lk  # noqa: E402

NAME = "lora_finetune"
PRESETS = {
    "small": dict(width=64, layers=2, batch=64, pretrain_steps=600, tune_steps=300, eval_every=50),
    "large": dict(width=512, layers=8, batch=256, pretrain_steps=3000, tune_steps=1000, eval_every=100),
}
LETTERS = "abcdefghijkl"
PAD, BOS, SEP, EOS = range(4)  # then the letters
VOCAB = 4 + len(LETTERS)
LENGTHS = range(3, 7)


def parse_args(argv=None):
    p = eu.parser(__doc__, NAME)
    p.add_argument("--width", type=int, help="GPT-2 n_embd (small 64, large 512)")
    p.add_argument("--layers", type=int, help="GPT-2 n_layer (small 2, large 8)")
    p.add_argument("--batch", type=int, help="sequences per step (small 64, large 256)")
    p.add_argument("--pretrain-steps", type=int, help="full training steps on the copy task (small 600)")
    p.add_argument("--tune-steps", type=int, help="LoRA steps on the new task (small 300)")
    p.add_argument("--eval-every", type=int, help="measure exact match every N LoRA steps")
    p.add_argument("--rank", type=int, default=8, help="LoRA r (default 8)")
    p.add_argument("--alpha", type=float, default=16, help="LoRA α (default 16: scaling α/r = 2)")
    p.add_argument("--targets", default="c_attn,c_proj",
                   help="comma-separated module names to adapt (default: c_attn,c_proj: GPT-2's fused q/k/v "
                        "projection and the attention and MLP output projections)")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="copy-task learning rate (all weights)")
    p.add_argument("--task", choices=("shift", "reverse"), default="shift",
                   help="fine-tuning task: shift (abcd -> bcde, default) or reverse (abcd -> dcba: a new attention "
                        "pattern, slower to learn at small sizes)")
    p.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate (AdamW, cosine)")
    p.add_argument("--surgery", choices=("lk", "peft"), default="lk",
                   help="lk: lk.apply_lora; peft: peft.get_peft_model, then lk.from_peft swaps in the fused layers")
    p.add_argument("--latency-reps", type=int, default=200, help="timed forwards per latency row")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- task

def sequences(task: str, n: int, length: int, generator) -> tuple:
    """(prompts [n, length + 2], answers [n, length + 1]): "<bos> x >" and "y <eos>"."""
    x = torch.randint(len(LETTERS), (n, length), generator=generator) + 4
    if task == "copy":
        y = x
    elif task == "shift":  # each letter by the next one, cyclically: the copy skill with a new output map
        y = (x - 4 + 1) % len(LETTERS) + 4
    else:
        y = x.flip(1)
    prompts = torch.cat([torch.full((n, 1), BOS), x, torch.full((n, 1), SEP)], 1)
    return prompts, torch.cat([y, torch.full((n, 1), EOS)], 1)


def lm_loss(model, prompts, answers, device) -> torch.Tensor:
    """The conditional LM objective: cross-entropy on the answer tokens only (prompt labels -100)."""
    ids = torch.cat([prompts, answers], 1).to(device)
    labels = ids.clone()
    labels[:, : prompts.shape[1]] = -100
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss


@torch.no_grad()
def generate(model, prompts, device, length) -> torch.Tensor:
    out = model.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                         max_new_tokens=length + 1, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    return out[:, prompts.shape[1]:].cpu()


def test_prompts(task: str, per_length: int = 64):
    g = torch.Generator().manual_seed(99)  # the same held-out prompts for every model and run
    return {n: sequences(task, per_length, n, g) for n in LENGTHS}


@torch.no_grad()
def exact_match(model, tests, device) -> float:
    model.eval()
    hits = total = 0
    for n, (prompts, answers) in tests.items():
        out = generate(model, prompts, device, n)
        hits += (out[:, : answers.shape[1]] == answers).all(1).sum().item()
        total += len(answers)
    return hits / total


def train(model, task, args, device, steps, lr, desc, tests=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = eu.cosine_lr(opt, steps, warmup=steps // 10)
    g, losses, evals = torch.Generator().manual_seed(args.seed + 5), [], []
    if tests is not None:
        evals.append((0, exact_match(model, tests, device)))
    bar = eu.progress(range(steps), args, desc)
    for step in bar:
        model.train()
        length = LENGTHS[int(torch.randint(len(LENGTHS), (1,), generator=g))]
        loss = lm_loss(model, *sequences(task, args.batch, length, g), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if tests is not None and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
            evals.append((step + 1, exact_match(model, tests, device)))
    model.eval()
    return losses, evals


# ----------------------------------------------------------------------------- LoRA, PEFT, latency

def add_lora(model, args):
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.surgery == "lk":
        return lk.apply_lora(model, targets, r=args.rank, alpha=args.alpha)
    import peft

    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets, fan_in_fan_out=True,
                             lora_dropout=0.0)
    return lk.from_peft(peft.get_peft_model(model, config))


def reload_with_peft(base_dir: Path, adapter_dir: Path, device):
    """What a user of the adapter does: PEFT alone, on a fresh copy of the base model."""
    import peft

    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir).to(device)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@torch.no_grad()
def latency_ms(model, ids, reps: int) -> tuple:
    """Median and interquartile range of a batch-1 forward, after warm-up (quartiles, not the
    standard deviation: on a shared CPU a few preempted calls would dominate it)."""
    times, mask = [], torch.ones_like(ids)
    for i in range(reps + 10):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        if ids.is_cuda:
            torch.cuda.synchronize()
        if i >= 10:
            times.append(1e3 * (time.perf_counter() - start))
    q1, med, q3 = statistics.quantiles(times, n=4)
    return med, q1, q3


def latency_table(base, tuned, args, device) -> dict:
    ids = sequences("reverse", 1, max(LENGTHS), torch.Generator().manual_seed(3))[0].to(device)
    layers = [m for m in tuned.modules() if isinstance(m, lk.LoRALinear)]
    rows = {"base model (no LoRA)": latency_ms(base, ids, args.latency_reps),
            "LoRA unmerged": latency_ms(tuned, ids, args.latency_reps)}
    for m in layers:
        m.merge()
    rows["LoRA merged (W0 + s·BA)"] = latency_ms(tuned, ids, args.latency_reps)
    for m in layers:
        m.unmerge()
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    eu.fill_defaults(args, PRESETS)
    device = eu.setup(args)
    used = eu.print_backends(device, ("lora_linear",))
    with eu.Timer() as timer:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=2 * max(LENGTHS) + 4, n_embd=args.width,
                                         n_layer=args.layers, n_head=max(1, args.width // 32), bos_token_id=BOS,
                                         eos_token_id=EOS, pad_token_id=PAD,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # exact copying: no dropout
        base = transformers.GPT2LMHeadModel(config).to(device)
        pre_losses, _ = train(base, "copy", args, device, args.pretrain_steps, args.pretrain_lr,
                                  "pretrain GPT-2 (copy)")
        task_tests = test_prompts(args.task)
        copy_acc = exact_match(base, test_prompts("copy"), device)
        print(f"GPT-2: width {args.width}, {args.layers} layers, {sum(p.numel() for p in base.parameters()):,} "
              f"parameters; copy exact match after pretraining {eu.pct(copy_acc)}", flush=True)
        weights = args.out_dir / f"{NAME}_weights"
        base.save_pretrained(weights / "base")

        tuned = add_lora(copy.deepcopy(base), args)
        trainable, total = eu.count_parameters(tuned)
        losses, evals = train(tuned, args.task, args, device, args.tune_steps, args.lr,
                              f"LoRA r={args.rank} ({args.task})",
                              tests=task_tests)
        print(f"LoRA: {args.task} exact match {eu.pct(evals[0][1])} -> {eu.pct(evals[-1][1])} "
              f"({trainable:,} of {total:,} parameters trained)", flush=True)

        adapter_dir = args.out_dir / f"{NAME}_adapter"
        lk.save_adapter(tuned, adapter_dir)
        reloaded = reload_with_peft(weights / "base", adapter_dir, device)
        same = all(torch.equal(generate(tuned, p, device, n), generate(reloaded, p, device, n))
                   for n, (p, _) in task_tests.items())
        peft_acc = exact_match(reloaded, task_tests, device)
        print(f"peft.PeftModel.from_pretrained on the saved adapter: same generated tokens: {same}; "
              f"exact match {eu.pct(peft_acc)}", flush=True)
        latency = latency_table(base, tuned, args, device)
        for row, (med, q1, q3) in latency.items():
            print(f"  {row}: median {med:.3f} ms (quartiles {q1:.3f}-{q3:.3f})", flush=True)
    result = {"pretrain_losses": pre_losses, "copy_exact_match": copy_acc, "losses": losses, "evals": evals,
              "before": evals[0][1], "after": evals[-1][1], "trainable": trainable, "total": total,
              "peft_same_tokens": same, "peft_exact_match": peft_acc, "latency_ms": latency,
              "adapter_dir": adapter_dir, "base_dir": weights / "base", "model": tuned, "tests": task_tests}
    report(args, device, used, timer.seconds, result)
    return result


def report(args, device, used, seconds, r) -> None:
    lines = [f"Tiny GPT-2 pretrained on copying ({args.pretrain_steps} steps: exact match "
             f"{eu.pct(r['copy_exact_match'])}), "
             f"then LoRA (r = {args.rank}, α = {args.alpha}, targets `{args.targets}`, surgery `{args.surgery}`) on "
             f"the `{args.task}` task for {args.tune_steps} steps; loss on the answer tokens only "
             "(the conditional LM objective). "
             f"Exact match of greedy decoding on {sum(len(a) for _, a in r['tests'].values())} held-out prompts.", "",
             f"| model | trainable params | {args.task} exact match |", "|---|---|---|",
             f"| pretrained base (frozen) | 0 | {eu.pct(r['before'])} |",
             f"| + LoRA | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | {eu.pct(r['after'])} |",
             "| saved with `lk.save_adapter`, loaded by `peft.PeftModel.from_pretrained` | - | "
             f"{eu.pct(r['peft_exact_match'])} "
             f"(same tokens as the lora_kernels model: {'yes' if r['peft_same_tokens'] else 'NO'}) |", "",
             f"Batch-1 forward latency ({max(LENGTHS) * 2 + 3} tokens; median and quartiles of "
             f"{args.latency_reps} calls, "
             "one process, this machine):", "", "| variant | median (quartiles) |", "|---|---|"]
    lines += [f"| {row} | {med:.3f} ms ({q1:.3f}–{q3:.3f}) |" for row, (med, q1, q3) in r["latency_ms"].items()]
    if device.type == "cpu":
        lines += ["", "On a CPU the fused LoRA op runs lora_kernels' PyTorch reference, and at this size a forward "
                  "is Python-bound: the rows show that merging removes the LoRA path, not kernel speed."]
    lines += ["", f"![curves]({NAME}.png)", ""] + eu.environment_lines(args, device, used, seconds)
    eu.write_summary(args.out_dir / f"{NAME}.md", "LoRA fine-tuning of GPT-2, adapter served by PEFT", lines)
    steps = [s for s, _ in r["evals"]]
    eu.plot_panels(args.out_dir / f"{NAME}.png", f"LoRA (r={args.rank}) on a tiny GPT-2: copy -> {args.task}", [
        ("pretraining loss (copy, all weights)", "answer-token CE (10-step mean)",
         {"pretrain": (list(range(1, len(r["pretrain_losses"]) + 1)), eu.smooth(r["pretrain_losses"]))}, None),
        (f"LoRA loss ({args.task}, base frozen)", "answer-token CE (10-step mean)",
         {"LoRA": (list(range(1, len(r["losses"]) + 1)), eu.smooth(r["losses"]))}, None),
        (f"{args.task} exact match, held-out prompts", "exact match", {"LoRA": (steps, [e for _, e in r["evals"]])},
         {"PEFT reload": r["peft_exact_match"]}),
    ])
    print(f"wrote {args.out_dir / (NAME + '.md')} and {NAME}.png", flush=True)


if __name__ == "__main__":
    main()
