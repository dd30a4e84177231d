"""Compulsory work of each op and the floor time it implies on this machine.

DESIGN.md, "Performance conventions": count the floor first. For a shape and a mode an op
must move at least ``bytes`` (each input read once, each output written once) and do at least
``flops``; on a machine that copies at ``gbps`` GB/s and multiplies at ``tflops`` TFLOP/s its
time cannot go below ``max(bytes / bandwidth, flops / matmul rate)``. A kernel's "% of floor"
is ``floor / measured time``: 100% is the roofline, memory-bound ops should get close to it.

The counts (elements × the dtype's size; "weights" are the op's parameters):

  lora_linear  fwd   FLOPs 2MNK + 2Mr(K+N)      bytes x + W + A + B + y (+ bias)
               bwd   FLOPs 2MNK + 4Mr(K+N)      bytes g + x + W + A + B + dx + dA + dB
                     (dx = gW + s(gB)A, dA = vᵀx, dB = s gᵀu; W frozen, x needs its gradient)
  lora_multi   as lora_linear, with A and B (and dA, dB) counted once per adapter the rows use
  dora_linear  fwd   lora_linear's + 2NKr (W Aᵀ for the row norms)  bytes lora's + m
               bwd   lora_linear's                          bytes lora's + m + d m
  adapter      fwd   FLOPs 4MKr                 bytes x + y + weights
               bwd   FLOPs 8MKr                 bytes g + x + dx + weights + their gradients
  layer_norm   fwd   (no matmul)                bytes x + y + γ + β
               bwd-params (dγ, dβ only)         bytes x + g + γ + dγ + dβ
               bwd   (dx too)                   bytes x + g + dx + γ + dγ + dβ
  rms_norm     fwd   (no matmul)                bytes x + y + γ
               bwd-params (dγ only)             bytes x + g + dγ
               bwd   (dx too)                   bytes x + g + dx + γ + dγ
  infonce      fwd   FLOPs 2N²d                 bytes image + text
               bwd   FLOPs 6N²d (S again, dI, dT)  bytes image + text + dI + dT
  "fwd+bwd" is the sum of the two (x is too big to stay on chip between them).

The rates are measured, not taken from a data sheet: a large device-to-device copy (read +
write) for the bandwidth and a large matmul in the benchmark's dtype for the matrix rate (on
a GPU with ``triton.testing.do_bench``; on a CPU with small sizes and a wall clock). Set
``LK_PEAK_GBPS`` / ``LK_PEAK_TFLOPS`` to pin them (e.g. to compare two runs).

``python benchmarks/floors.py`` prints the measured rates and the floors of a few shapes.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
LN_MODES = ("fwd", "bwd-params", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Cost:
    """Compulsory work of one call: floating-point operations and bytes moved."""
    flops: float
    bytes: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def floor_ms(self, rates: "Rates") -> float:
        return max(self.memory_ms(rates), self.compute_ms(rates))

    def memory_ms(self, rates: "Rates") -> float:
        return self.bytes / (rates.gbps * 1e9) * 1e3

    def compute_ms(self, rates: "Rates") -> float:
        return self.flops / (rates.tflops * 1e12) * 1e3 if self.flops else 0.0

    def bound(self, rates: "Rates") -> str:
        """"memory" or "compute": which of the two limits sets the floor."""
        return "compute" if self.compute_ms(rates) > self.memory_ms(rates) else "memory"


@dataclass(frozen=True)
class Rates:
    """Measured copy bandwidth (GB/s, counting read + write) and matmul rate (TFLOP/s)."""
    gbps: float
    tflops: float
    dtype: str
    device: str


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_mode(mode: str, modes=MODES) -> None:
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")


# ----------------------------------------------------------------------------- the counts

def lora(M: int, K: int, N: int, r: int, mode: str = "fwd", dtype=torch.bfloat16, bias: bool = False) -> Cost:
    """y = x Wᵀ (+ b) + s (x Aᵀ) Bᵀ with x [M, K], W [N, K], A [r, K], B [N, r]."""
    _check_mode(mode)
    e = _size(dtype)
    weights = N * K + r * K + N * r
    if mode == "fwd+bwd":
        return lora(M, K, N, r, "fwd", dtype, bias) + lora(M, K, N, r, "bwd", dtype, bias)
    if mode == "fwd":
        return Cost(2 * M * N * K + 2 * M * r * (K + N), e * (M * K + weights + M * N + (N if bias else 0)))
    # g, x, W, A, B read; dx, dA, dB written (W and the bias frozen)
    return Cost(2 * M * N * K + 4 * M * r * (K + N), e * (M * N + M * K + weights + M * K + r * K + N * r))



def lora_multi(M: int, K: int, N: int, r: int, adapters: int, mode: str = "fwd", dtype=torch.bfloat16) -> Cost:
    """lora_linear with ``adapters`` distinct adapters among the M rows: the FLOPs of one adapter
    on all rows, and each used adapter's A [r, K] and B [N, r] read once (their gradients written
    once in the backward)."""
    _check_mode(mode)
    one = lora(M, K, N, r, mode, dtype)
    extra = (adapters - 1) * (r * K + N * r) * _size(dtype) * (1 if mode == "fwd" else 2 if mode == "bwd" else 3)
    return Cost(one.flops, one.bytes + extra)
def dora(M: int, K: int, N: int, r: int, mode: str = "fwd", dtype=torch.bfloat16, bias: bool = False) -> Cost:
    """DoRA: lora_linear's work, the row norms ‖W + s·BA‖ (W Aᵀ: 2NKr FLOPs, W read once in all:
    the compulsory count, a fused kernel reads it twice) and the magnitude m [N] (and d m)."""
    _check_mode(mode)
    if mode == "fwd+bwd":
        return dora(M, K, N, r, "fwd", dtype, bias) + dora(M, K, N, r, "bwd", dtype, bias)
    base, e = lora(M, K, N, r, mode, dtype, bias), _size(dtype)
    if mode == "fwd":
        return base + Cost(2 * N * K * r, e * N)
    return base + Cost(0, 2 * e * N)


def adapter(M: int, d: int, r: int, mode: str = "fwd", dtype=torch.bfloat16) -> Cost:
    """y = x + s (act(x W_dᵀ + b_d) W_uᵀ + b_u) with x [M, d], W_d [r, d], W_u [d, r]."""
    _check_mode(mode)
    e = _size(dtype)
    weights = 2 * d * r + r + d
    if mode == "fwd+bwd":
        return adapter(M, d, r, "fwd", dtype) + adapter(M, d, r, "bwd", dtype)
    if mode == "fwd":
        return Cost(4 * M * d * r, e * (2 * M * d + weights))
    return Cost(8 * M * d * r, e * (3 * M * d + 2 * weights))


def layer_norm(M: int, d: int, mode: str = "fwd", dtype=torch.bfloat16, affine: bool = True) -> Cost:
    """y = γ (x − μ) rstd + β over rows of x [M, d]; memory-bound, FLOPs not counted."""
    _check_mode(mode, LN_MODES)
    e = _size(dtype)
    params = d if affine else 0
    if mode == "fwd+bwd":
        return layer_norm(M, d, "fwd", dtype, affine) + layer_norm(M, d, "bwd", dtype, affine)
    if mode == "fwd":
        return Cost(0, e * (2 * M * d + 2 * params))
    if mode == "bwd-params":
        return Cost(0, e * (2 * M * d + 3 * params))
    return Cost(0, e * (3 * M * d + 3 * params))


def rms_norm(M: int, d: int, mode: str = "fwd", dtype=torch.bfloat16, affine: bool = True) -> Cost:
    """y = x rstd (offset + γ) over rows of x [M, d]; memory-bound, FLOPs not counted. The dγ-only
    backward needs no γ: dγ = Σ g ⊙ x rstd."""
    _check_mode(mode, LN_MODES)
    e = _size(dtype)
    params = d if affine else 0
    if mode == "fwd+bwd":
        return rms_norm(M, d, "fwd", dtype, affine) + rms_norm(M, d, "bwd", dtype, affine)
    if mode == "fwd":
        return Cost(0, e * (2 * M * d + params))
    if mode == "bwd-params":
        return Cost(0, e * (2 * M * d + params))
    return Cost(0, e * (3 * M * d + 2 * params))


def infonce(N: int, d: int, mode: str = "fwd", dtype=torch.bfloat16) -> Cost:
    """Symmetric InfoNCE of image, text [N, d]: the N×N logits are computed, never stored."""
    _check_mode(mode)
    e = _size(dtype)
    if mode == "fwd+bwd":
        return infonce(N, d, "fwd", dtype) + infonce(N, d, "bwd", dtype)
    if mode == "fwd":
        return Cost(2 * N * N * d, e * 2 * N * d)
    return Cost(6 * N * N * d, e * 4 * N * d)


COSTS = {"lora": lora, "dora": dora, "lora_multi": lora_multi, "adapter": adapter, "layer_norm": layer_norm,
         "rms_norm": rms_norm, "infonce": infonce}


# ----------------------------------------------------------------------------- the rates

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            quantiles=(0.5, 0.2, 0.8), min_reps: int = 3, max_reps: int = 1000) -> tuple:
    """(median, q20, q80) milliseconds of ``fn()``.

    GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, so inputs
    come from HBM as they would inside a model). CPU: a wall clock around each call, after
    one warm-up call, until ``rep_ms`` is spent (at least ``min_reps`` calls).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        out = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(quantiles))
        return tuple(float(v) for v in out)
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and (time.perf_counter() - start) * 1e3 < rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), qs[1], qs[7]


_BANDWIDTH: dict = {}
_MATMUL: dict = {}


def measure_bandwidth(device) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read and written."""
    device = torch.device(device)
    if "LK_PEAK_GBPS" in os.environ:
        return float(os.environ["LK_PEAK_GBPS"])
    key = str(device)
    if key not in _BANDWIDTH:
        n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of float32
        src = torch.rand(n, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device, rep_ms=200 if device.type == "cuda" else 300)[0]
        _BANDWIDTH[key] = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
        del src, dst
    return _BANDWIDTH[key]


def measure_matmul(device, dtype=torch.bfloat16) -> float:
    """TFLOP/s of a large square matmul in ``dtype`` (fp32 without TF32)."""
    device = torch.device(device)
    if "LK_PEAK_TFLOPS" in os.environ:
        return float(os.environ["LK_PEAK_TFLOPS"])
    key = (str(device), dtype)
    if key not in _MATMUL:
        n = 8192 if device.type == "cuda" else (512 if dtype in (torch.float32, torch.float64) else 256)
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            ms = time_ms(lambda: a @ b, device, rep_ms=200 if device.type == "cuda" else 300)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        _MATMUL[key] = 2 * n ** 3 / (ms * 1e-3) / 1e12
        del a, b
    return _MATMUL[key]


def rates(device, dtype=torch.bfloat16) -> Rates:
    device = torch.device(device)
    return Rates(gbps=measure_bandwidth(device), tflops=measure_matmul(device, dtype),
                 dtype=str(dtype).replace("torch.", ""), device=str(device))


def measured() -> dict:
    """Every rate measured so far in this process (for the results' metadata)."""
    return {"bandwidth_gbps": dict(_BANDWIDTH),
            "matmul_tflops": {f"{dev} {str(dt).replace('torch.', '')}": v for (dev, dt), v in _MATMUL.items()}}


# ----------------------------------------------------------------------------- report

def describe(cost: Cost, r: Rates) -> dict:
    return {**asdict(cost), "floor_ms": cost.floor_ms(r), "bound": cost.bound(r)}


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    r = rates(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: copy {r.gbps:,.0f} GB/s, {r.dtype} matmul {r.tflops:,.1f} TFLOP/s")
    cases = [("lora", dict(M=1, K=4096, N=4096, r=16)), ("lora", dict(M=8192, K=4096, N=4096, r=16)),
             ("adapter", dict(M=32768, d=1024, r=64)), ("layer_norm", dict(M=32768, d=1024)),
             ("rms_norm", dict(M=16384, d=4096)),
             ("infonce", dict(N=65536, d=512))]
    for op, shape in cases:
        for mode in MODES:
            c = COSTS[op](**shape, mode=mode, dtype=dtype)
            print(f"{op:<10} {str(shape):<40} {mode:<8} {c.flops / 1e9:12.3f} GFLOP {c.bytes / 1e6:12.3f} MB "
                  f"floor {c.floor_ms(r):10.4f} ms ({c.bound(r)})")


if __name__ == "__main__":
    main()
