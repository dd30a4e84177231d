"""Bytes the Triton DoRA forward moves, counted by the interpreter (no GPU needed):
W0 is read at most twice per forward (row-norm pass + GEMM) and no N×K tensor but W0 exists.

Rerun:  TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/dora_traffic.py [path/to/traffic.py's folder]
(default folder /work/shared/tools). M is one interpreter row tile (32), so the GEMM's own
per-row-tile re-reads of W0 (served by L2 on a GPU) do not blur the count; the torch-side
allocations are checked separately by tests/test_dora_op.py::test_no_out_by_in_temporary.
"""
import sys

import torch

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "/work/shared/tools")
from traffic import measure  # noqa: E402

import lora_kernels as lk  # noqa: E402


def main():
    torch.manual_seed(0)
    M, K, N, r = 32, 256, 192, 16
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(M, K, dtype=dtype)
        w = (torch.randn(N, K) / K**0.5).to(dtype)
        a, bb = (torch.randn(r, K) / K**0.5).to(dtype), torch.randn(N, r, dtype=dtype)
        bias, m = torch.randn(N, dtype=dtype), w.float().norm(dim=1).to(dtype)
        for p in (0.0, 0.1):
            with lk.use_backend("triton"):
                t = measure(lambda: lk.dora_linear(x, w, bias, a, bb, m, 0.5, dropout_p=p))
            w_bytes = w.numel() * w.element_size()
            loaded = sum(v[0] for (kernel, arg), v in t.args.items() if arg == "W")
            big = [f"{k}.{arg}" for (k, arg), v in t.args.items() if v[5] >= w_bytes and arg != "W"]
            print(f"{dtype} p={p}: {t.launches}; W0 loaded {loaded / w_bytes:.2f}x its size; "
                  f"other arguments of W0's size or more: {big or 'none'}")


if __name__ == "__main__":
    main()
