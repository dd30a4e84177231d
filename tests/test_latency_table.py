"""Smoke test of benchmarks/latency_table.py (the LoRA paper's Table 1): a --quick run in-process."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "latency_table.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("latency_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lt = _load_benchmark()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("latency")
    report = lt.main(["--quick", "--device", "cpu", "--out-dir", str(out_dir)])
    return report, out_dir


def test_table_has_every_row_and_column(quick_run):
    report, _ = quick_run
    settings = report["config"]["settings"]
    lines = report["table"].splitlines()
    header = lines[0]
    for label in settings:
        assert label.replace("x", "×") in header
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert list(rows) == list(lt.VARIANTS)
    for line in rows.values():
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 2 + len(settings)
        for cell in cells[2:]:
            assert " ± " in cell and cell.endswith("%)")


def test_results_cover_every_cell_and_baseline_overhead_is_zero(quick_run):
    report, _ = quick_run
    cells = {(r["variant"], r["setting"]): r for r in report["results"]}
    assert set(cells) == {(v, s) for v in lt.VARIANTS for s in report["config"]["settings"]}
    for (variant, _), row in cells.items():
        assert row["n"] == report["config"]["repeats"] == len(row["samples_ms"])
        assert row["mean_ms"] > 0 and row["std_ms"] >= 0
        if variant == lt.BASE:
            assert row["overhead_pct"] == 0.0
    assert report["params"][lt.BASE] == 0
    params = report["params"]
    assert params[lt.HOULSBY] > params[lt.ADAPTER_L] > 0 and params[lt.LN_TUNING] > 0
    assert params[lt.MERGED] == params[lt.UNMERGED] > 0
    for eager, fused in lt.EAGER_OF.items():
        assert params[eager] == params[fused]


def test_result_files_exist_and_parse(quick_run):
    report, out_dir = quick_run
    json_path, md_path = Path(report["paths"]["json"]), Path(report["paths"]["markdown"])
    assert json_path.parent == out_dir and md_path.parent == out_dir
    assert json_path.name.startswith("latency-") and md_path.suffix == ".md"
    saved = json.loads(json_path.read_text())
    assert saved["results"] == report["results"]
    env = saved["environment"]
    for key in ("torch", "transformers", "lora_kernels"):
        assert env["versions"][key]
    assert env["device"]["name"] and env["date"] and "requested" in env["backend"]
    assert env["backend"]["lora_linear"] in ("torch", "triton", "cuda")
    markdown = md_path.read_text()
    assert report["table"] in markdown
    assert "Shrunk / changed vs the paper" in markdown


def test_lora_merged_equals_unmerged_and_adaptations_are_not_noops():
    cfg = lt.resolve_config(lt.build_parser().parse_args(["--quick", "--device", "cpu"]))
    variants = lt.build_variants(cfg)
    merged = variants[lt.MERGED].h[0].attn.c_attn
    assert isinstance(merged, lt.lk.LoRALinear) and merged.merged
    assert not variants[lt.UNMERGED].h[0].attn.c_attn.merged
    assert torch.equal(variants[lt.MERGED].h[0].attn.c_attn.lora_B, variants[lt.UNMERGED].h[0].attn.c_attn.lora_B)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = lt.last_hidden_states(variants, ids)
    torch.testing.assert_close(out[lt.MERGED], out[lt.UNMERGED], rtol=1e-4, atol=1e-5)
    for name in (lt.MERGED, lt.HOULSBY, lt.ADAPTER_L):
        assert not torch.allclose(out[name], out[lt.BASE], rtol=1e-3, atol=1e-4), f"{name} is a no-op"
    # the base model keeps its own weights: merging must not leak into it through shared tensors
    base_w = variants[lt.BASE].h[0].attn.c_attn.weight
    assert not torch.equal(base_w, merged.weight)
    diffs = lt.check_variants(variants, cfg)
    assert diffs["merged_vs_unmerged"] <= diffs["tolerance"]


def test_cuda_graphs_part_of_a_cpu_run(quick_run):
    report, _ = quick_run
    assert report["config"]["cuda_graphs"] is False
    assert report["cuda_graphs"] == {"timed": False, "why": "CPU run"}
    assert "CUDA graphs: not timed (CPU run)." in Path(report["paths"]["markdown"]).read_text()


def test_cuda_graphs_on_cpu_is_refused():
    with pytest.raises(SystemExit, match="--cuda-graphs needs a CUDA device"):
        lt.resolve_config(lt.build_parser().parse_args(["--quick", "--device", "cpu", "--cuda-graphs"]))


def test_failed_capture_is_reported_not_timed(tmp_path):
    """A variant whose graph capture fails shows "capture failed" with the reason, in the
    tables, the markdown and the plot, and is never timed under the graphs heading."""
    cfg = lt.resolve_config(lt.build_parser().parse_args(["--quick", "--device", "cpu"]))
    variants = lt.build_variants(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    replays, failed = lt.capture_all({lt.HOULSBY: variants[lt.HOULSBY]}, ids)  # no CUDA here: capture fails
    assert replays == {} and failed[lt.HOULSBY]
    stats = {name: lt.summarize([1.0, 1.1, 1.2]) for name in lt.VARIANTS}
    for s in stats.values():
        s.update(overhead_pct=0.0, overhead_paired_median_pct=0.0)
    stats[lt.HOULSBY] = {"capture_failed": failed[lt.HOULSBY]}
    cfg.cuda_graphs = True
    params = {name: 0 for name in lt.VARIANTS}
    part = lt.graphs_report(cfg, {"1x4": stats}, None, params)
    assert part["capture_failed"] == {lt.HOULSBY: failed[lt.HOULSBY]}
    row = next(line for line in part["table"].splitlines() if line.startswith(f"| {lt.HOULSBY} |"))
    assert row.endswith("| capture failed |")
    assert f"- {lt.HOULSBY}: capture failed: {failed[lt.HOULSBY]}" in lt.graphs_section(part)
    report = {"config": {"settings": ["1x4"], "dtype": "float32"}, "results": part["results"], "cuda_graphs": part,
              "environment": {"device": {"name": "cpu"}, "date": "today"}}
    if lt.plot_overheads(report, tmp_path / "plot.png"):
        assert (tmp_path / "plot.png").stat().st_size > 0


def test_eager_rows_share_the_fused_weights_and_run_plain_pytorch():
    """Each eager row holds its fused row's very parameters, and every lora_kernels module in it
    sits inside an eager wrapper (so the plain ops run, not a lora_kernels op)."""
    cfg = lt.resolve_config(lt.build_parser().parse_args(["--quick", "--device", "cpu"]))
    variants = lt.build_variants(cfg)
    for eager, fused in lt.EAGER_OF.items():
        fused_params = {id(p) for p in variants[fused].parameters()}
        assert {id(p) for p in variants[eager].parameters()} == fused_params, eager
        wrapped, lk_modules = set(), set()
        for module in variants[eager].modules():
            if isinstance(module, lt.EagerTwin):
                wrapped.update(id(m) for m in module.children())
            if type(module) in lt.EAGER_MODULES:
                lk_modules.add(id(module))
        assert lk_modules and lk_modules <= wrapped, eager
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = lt.last_hidden_states(variants, ids)
    for eager, fused in lt.EAGER_OF.items():
        torch.testing.assert_close(out[eager], out[fused], rtol=1e-4, atol=1e-5)
