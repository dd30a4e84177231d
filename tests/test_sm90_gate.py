"""benchmarks/triton_sm90.py (the sm_90 compile gate CI runs under Triton 3.6) still drives every
launcher with the installed Triton: its --dry-run captures each op's launches on meta tensors and
runs the autotuners' pruners, without compiling anything (a few seconds)."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gate_dry_run_covers_every_launcher():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/triton_sm90.py", "--quick", "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = dict(re.findall(r"^(\w+): (\d+) distinct compiles", proc.stdout, re.M))
    assert set(counts) >= {"lora", "adapter", "layer_norm", "infonce", "rms_norm", "dora", "lora_multi"}, proc.stdout
    assert "not gated" not in proc.stderr, proc.stderr
    assert all(int(n) > 0 for n in counts.values()), counts
