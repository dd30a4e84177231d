"""Bytes the Triton rms_norm kernels move, counted by ../shared/tools/traffic.py under the CPU
interpreter, against the compulsory bytes (x read once, y/dx written once, γ and dγ once):

    TRITON_INTERPRET=1 python benchmarks/traffic_rms_norm.py [M d] [path/to/traffic.py's folder]

Defaults: M=512, d=4096, bf16 (about 30 s on one CPU core).
"""
import os
import sys

import torch

M, D = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (512, 4096)
sys.path.insert(0, sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.path.dirname(__file__), "../../shared/tools"))
from traffic import measure  # noqa: E402

import lora_kernels as lk  # noqa: E402


def main(m, d, dtype=torch.bfloat16):
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (the meter counts the interpreter's loads and stores)")
    x = torch.randn(m, d).to(dtype)
    w = (torch.randn(d) * 0.1 + 1).to(dtype)
    g = torch.randn(m, d).to(dtype)
    e = x.element_size()
    with lk.use_backend("triton"):
        with torch.no_grad():
            t = measure(lambda: lk.rms_norm(x, w))
        print(f"M={m} d={d} fwd:         {t.total():>12,} B, compulsory {e * (2 * m * d + d):>12,} B: "
              f"{t.total() / (e * (2 * m * d + d)):.3f}x")
        for name, x_grad, compulsory in (("bwd dγ only", False, e * (2 * m * d + d)),
                                         ("bwd dγ + dx", True, e * (3 * m * d + 2 * d))):
            xx, ww = x.clone().requires_grad_(x_grad), w.clone().requires_grad_(True)
            y = lk.rms_norm(xx, ww)
            t = measure(lambda: torch.autograd.grad(y, [xx, ww] if x_grad else [ww], g, retain_graph=True))
            print(f"M={m} d={d} {name}: {t.total():>12,} B, compulsory {compulsory:>12,} B: "
                  f"{t.total() / compulsory:.3f}x ({', '.join(t.launches)})")


if __name__ == "__main__":
    main(M, D)
