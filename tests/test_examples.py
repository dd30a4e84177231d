"""Smoke tests of the three examples (examples/*.py): each runs in-process at tiny sizes for a few
steps, must move its metric the right way with a margin, and its saved weights must reload.

No downloads: every model is built from a config (HF_HUB_OFFLINE=1 anyway). The names avoid the
word the interpreter pass selects with ``-k``: these run once, in the plain pass.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("sklearn", reason="the examples need the 'examples' extra (scikit-learn)")
pytest.importorskip("tqdm", reason="the examples need the 'examples' extra (tqdm)")
pytest.importorskip("transformers", reason="the examples need the 'hf' extra")
pytest.importorskip("matplotlib", reason="the examples need the 'bench' extra (matplotlib)")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _restore_threads():
    """The examples pin torch to one CPU thread; give the rest of the suite its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _outputs_written(out: Path, name: str) -> None:
    assert (out / f"{name}.png").stat().st_size > 10_000
    summary = (out / f"{name}.md").read_text()
    assert "lora_kernels backend: auto -> " in summary and "machine:" in summary


def test_clip_ln_tuning_example(tmp_path):
    import clip_ln_tuning as ex
    import transformers

    r = ex.main(["--no-progress", "--out-dir", str(tmp_path), "--width", "64", "--layers", "1", "--groups", "4",
                 "--pretrain-steps", "250", "--tune-steps", "80", "--eval-every", "80"])
    _outputs_written(tmp_path, ex.NAME)
    assert r["clean"]["zero_shot"] > 0.4, "contrastive pretraining should classify clean digits well above chance (10%)"
    # Seeds 0, 1, 2 on this CPU: shifted zero-shot 0.47/0.44/0.48 -> LN-tuning 0.53/0.52/0.55, full
    # fine-tuning 0.60/0.53/0.60 (on 450 test images); the margins are about half the smallest gain.
    ln, full = r["LN-tuning"], r["full fine-tuning"]
    assert ln["after"]["zero_shot"] > ln["before"]["zero_shot"] + 0.03
    assert full["after"]["zero_shot"] > full["before"]["zero_shot"] + 0.05
    assert ln["before"] == r["frozen"] == full["before"], "every method starts from the same pretrained model"
    assert sum(ln["losses"][-10:]) < sum(ln["losses"][:10])
    norms = sum(m.weight.numel() + m.bias.numel() for m in r["base"].modules() if isinstance(m, torch.nn.LayerNorm))
    assert ln["trainable"] == norms and full["trainable"] == full["total"]

    # The saved LN parameters, put into the saved pretrained model, give the tuned model back.
    reloaded = ex.load_ln(transformers.CLIPModel.from_pretrained(r["checkpoint"] / "pretrained"),
                          r["checkpoint"] / "ln_params.safetensors").eval()
    images = r["data"]["test"][0][:32]
    with torch.no_grad():
        expected = ex.image_features(r["models"]["LN-tuning"], images)
        torch.testing.assert_close(ex.image_features(reloaded, images), expected, rtol=1e-5, atol=1e-6)
    assert ex.evaluate(reloaded, r["data"]["test"], r["data"]["tokenizer"], "cpu") == ln["after"]


def test_lilt_alignment_example(tmp_path):
    import lilt_alignment as ex

    r = ex.main(["--no-progress", "--out-dir", str(tmp_path), "--width", "64", "--layers", "1", "--bottleneck", "16",
                 "--groups", "4", "--image-steps", "150", "--text-steps", "200", "--text-lr", "3e-3",
                 "--align-steps", "80", "--eval-every", "80", "--methods", "a,c,i"])
    _outputs_written(tmp_path, ex.NAME)
    frozen, probe, lilt = r["frozen (a)"], r["projection only (c)"], r["LiLT_LwA (i)"]
    assert frozen["trainable"] == 0 and 0 < probe["trainable"] < lilt["trainable"] < 0.3 * lilt["total"]
    # Adapters start as the identity and LayerNorms unchanged: every method starts where the frozen model is.
    assert probe["before"] == lilt["before"] == frozen["after"]
    # Seeds 0, 1, 2 on this CPU: recall@1 image→text 0.08/0.03/0.13 frozen -> 0.44/0.59/0.49 LiLT_LwA,
    # text→image 0.11/0.10/0.17 -> 0.52/0.52/0.58 (on 450 test pairs).
    for key in ("i2t_r1", "t2i_r1"):
        assert lilt["after"][key] > frozen["after"][key] + 0.25, key

    # The saved trainable weights on the saved towers rebuild the aligned model exactly.
    reloaded = ex.load_aligned(r["checkpoint"], r["args"], r["data"]["tokenizer"])
    assert ex.evaluate(reloaded, r["data"]["test"], r["data"]["tokenizer"], "cpu") == lilt["after"]


@pytest.mark.parametrize("surgery", ["lk", "peft"])  # lk.apply_lora, or get_peft_model + lk.from_peft
def test_lora_finetune_example(tmp_path, surgery):
    import lora_finetune as ex
    import peft
    import transformers

    r = ex.main(["--no-progress", "--out-dir", str(tmp_path), "--pretrain-steps", "300", "--tune-steps", "80",
                 "--eval-every", "80", "--latency-reps", "5", "--surgery", surgery])
    _outputs_written(tmp_path, ex.NAME)
    assert r["copy_exact_match"] > 0.5
    # Seeds 0, 1, 2 on this CPU: shift exact match 0.0 -> 0.63/0.67/0.63 (lk), 0.67/0.66/0.60 (peft),
    # on 256 held-out prompts.
    assert r["after"] > r["before"] + 0.25
    assert 0 < r["trainable"] < 0.2 * r["total"]
    assert r["peft_same_tokens"] and r["peft_exact_match"] == r["after"]
    assert set(r["latency_ms"]) == {"base model (no LoRA)", "LoRA unmerged", "LoRA merged (W0 + s·BA)"}

    # Independently of the script: PEFT alone loads the adapter directory and generates the same tokens.
    base = transformers.GPT2LMHeadModel.from_pretrained(r["base_dir"])
    served = peft.PeftModel.from_pretrained(base, r["adapter_dir"]).eval()
    for n, (prompts, _) in r["tests"].items():
        assert torch.equal(ex.generate(served, prompts, "cpu", n), ex.generate(r["model"], prompts, "cpu", n)), n
