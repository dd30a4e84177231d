"""The shapes benchmarks/triton_sm90.py launches each Triton op with (on ``meta`` tensors).

Each op is one entry of ``OPS``: a ``run(module, dtype, **shape)`` that calls the op's launchers
(``lora_kernels/triton/<op>.py``: ``forward`` then ``backward``) the way ``ops/<op>.py`` does,
and a table of shapes, each tagged with the lowest level that runs it: ``quick`` (CI), ``default``
or ``full`` (the committed table). A shape only matters through what the compiled code and the
autotuner's pruning see: the constexprs the launcher derives (tile widths, flags), the autotune key
(row buckets), the dtype, and how runtime ints specialise (== 1, divisible by 16). So the tables
pick one shape per such class, from the widest the launchers meet (LoRA rank up to 256, adapter
bottleneck up to 1024, LayerNorm width up to 131072, InfoNCE batch up to 262144).

Adding an op (say triton/group_norm.py): write ``def group_norm(mod, dt, M, N): ...`` calling
``mod.forward`` and ``mod.backward`` on ``t(...)`` tensors, and add
``"group_norm": (group_norm, [("quick", dict(M=16384, N=4096)), ("full", dict(M=16384, N=131072))])``
to OPS. If the launcher sizes grids by the SM count through a module-level function, name it
like one of ``SM_HOOKS`` (or add its name there) so the gate can give it an H100's 132 SMs.
"""
import torch

H100_SMS = 132
LEVELS = ("quick", "default", "full")

# Module-level functions through which launchers learn the SM count (they fall back to a few
# "programs" off CUDA); the gate replaces each one a launcher module defines.
SM_HOOKS = {
    "_target_programs": lambda device: 2 * H100_SMS,            # lora, lora_multi
    "_num_sms": lambda device: H100_SMS,                        # adapter, infonce
    "_max_programs": lambda device, per_sm: H100_SMS * per_sm,  # layer_norm, rms_norm
}
# (dora's scale pass sizes its row chunks from _common.sm_count directly: only runtime ints, each
# chunk a multiple of its 32-row tile either way, so the compiles are the same.)


def t(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


# ------------------------------------------------------------------------------------ lora
def lora(mod, dt, M, K, N, r, bias=False, p=0.0):
    x, w = t(M, K, dtype=dt), t(N, K, dtype=dt)
    a, b = t(r, K, dtype=dt), t(N, r, dtype=dt)
    y, u = mod.forward(x, w, t(N, dtype=dt) if bias else None, a, b, 2.0, p, 1234)
    mod.backward(t(M, N, dtype=dt), x, w, a, b, u, 2.0, p, 1234, need_dx=True, need_dW=False, need_db=False)


# M = 128 (K = N = 4096) takes the fused forward for r <= 64, M = 16384 the split one (BLOCK_R 16,
# 32, 64; r = 128 and 256 loop over rank chunks of 64); r*N <= 25600 keeps a tall M fused (N = 1024,
# r <= 16). r = 8 and 48 lose the divisible-by-16 specialisation. M = 1 / 16 / 32 / 64 are the
# decode row buckets (thin tiles). Dropout regenerates Philox masks; M*K >= 2^33 makes its
# counters 64-bit (WIDE).
_LLAMA = dict(K=4096, N=4096)
LORA_SHAPES = [
    ("quick", dict(M=128, r=64, **_LLAMA)),
    ("quick", dict(M=16384, r=8, **_LLAMA)),
    ("quick", dict(M=16384, r=64, **_LLAMA)),
    ("quick", dict(M=16384, r=16, p=0.1, **_LLAMA)),
    ("quick", dict(M=1, r=16, **_LLAMA)),
    ("default", dict(M=128, r=16, **_LLAMA)),
    ("default", dict(M=128, r=8, K=1024, N=1024, bias=True)),
    ("default", dict(M=16384, r=16, K=1024, N=1024, bias=True)),
    ("default", dict(M=16384, r=32, **_LLAMA)),
    ("default", dict(M=16384, r=256, **_LLAMA)),
    ("default", dict(M=16384, r=64, p=0.1, **_LLAMA)),
    ("default", dict(M=16, r=64, **_LLAMA)),
    ("default", dict(M=64, r=16, **_LLAMA)),
    ("full", dict(M=128, r=32, **_LLAMA)),
    ("full", dict(M=128, r=16, p=0.1, **_LLAMA)),
    ("full", dict(M=16384, r=48, K=1000, N=1000)),
    ("full", dict(M=16384, r=128, p=0.1, **_LLAMA)),
    ("full", dict(M=16384, r=8, p=0.1, K=1024, N=1024, bias=True)),
    ("full", dict(M=65536, r=64, p=0.1, K=131072, N=1024)),
    ("full", dict(M=32, r=256, **_LLAMA)),
    ("full", dict(M=1, r=8, p=0.1, K=1024, N=1024, bias=True)),
]


# --------------------------------------------------------------------------------- adapter
def adapter(mod, dt, M, d, r, act="gelu"):
    x = t(M, d, dtype=dt)
    wd, bd, wu, bu = t(r, d, dtype=dt), t(r, dtype=dt), t(d, r, dtype=dt), t(d, dtype=dt)
    y, h = mod.forward(x, wd, bd, wu, bu, act, 1.0)
    mod.backward(t(M, d, dtype=dt), x, wd, wu, h, act, 1.0, need_dx=True, need_dbd=True, need_dbu=True)


# BLOCK_R = next_pow2(r) up to 256 (16-bit) / 128 (fp32); wider bottlenecks loop over tiles
# (ONE_R_TILE off). The activation is a constexpr too: gelu (erf) and gelu_tanh are the heaviest.
ADAPTER_SHAPES = [
    ("quick", dict(M=16384, d=1024, r=64)),
    ("quick", dict(M=16384, d=1024, r=256)),
    ("quick", dict(M=16384, d=4096, r=1024)),
    ("default", dict(M=16384, d=768, r=16, act="relu")),
    ("default", dict(M=16384, d=1024, r=128, act="gelu_tanh")),
    ("default", dict(M=16384, d=4096, r=512, act="silu")),
    ("default", dict(M=128, d=1024, r=64)),
    ("full", dict(M=16384, d=1024, r=32)),
    ("full", dict(M=16384, d=1000, r=100)),
    ("full", dict(M=1, d=4096, r=1024, act="gelu_tanh")),
]


# ------------------------------------------------------------------------------ layer_norm
def layer_norm(mod, dt, M, N, stats=True, need_dx=True):
    x, w, b = t(M, N, dtype=dt), t(N, dtype=dt), t(N, dtype=dt)
    y, mean, rstd = mod.forward(x, w, b, 1e-5, stats=stats)
    if stats:
        mod.backward(t(M, N, dtype=dt), x, w, mean, rstd, need_dx=need_dx, need_dw=True, need_db=True)


LAYER_NORM_SHAPES = [("quick", dict(M=16384, N=n)) for n in (768, 4096, 8192, 32768)] + [
    ("default", dict(M=16384, N=1024)),
    ("default", dict(M=16384, N=4096, stats=False)),
    ("default", dict(M=16384, N=4096, need_dx=False)),
    ("default", dict(M=16384, N=131072)),
    ("full", dict(M=16384, N=32768, need_dx=False)),
    ("full", dict(M=16384, N=1000)),
    ("full", dict(M=1, N=4096)),
]


# --------------------------------------------------------------------------------- infonce
def infonce(mod, dt, N, d, normalize=False, ranks=1):
    c = t((), dtype=dt)
    if ranks == 1:
        img, txt = t(N, d, dtype=dt), t(N, d, dtype=dt)
        loss, lse_row, lse_col = mod.forward(img, txt, c, 0.5, normalize)
        mod.backward(t((), dtype=loss.dtype), img, txt, c, lse_row, lse_col, 0.5, normalize,
                     need_dimage=True, need_dtext=True, need_dscale=True)
    else:  # one direction of a rectangular block: the distributed loss
        q, keys = t(N // ranks, d, dtype=dt), t(N, d, dtype=dt)
        part, lse = mod.rows_forward(q, keys, c, N // ranks, normalize)
        mod.rows_backward(t((), dtype=part.dtype), q, keys, c, lse, N // ranks, normalize,
                          need_dqueries=True, need_dkeys=True, need_dscale=True)


# N only moves runtime ints (stripes of 1024 rows); accumulate = 0 / 1 specialises both ways.
INFONCE_SHAPES = [
    ("quick", dict(N=32768, d=1024, normalize=True)),
    ("default", dict(N=32768, d=512)),
    ("default", dict(N=4096, d=768)),
    ("default", dict(N=262144, d=1024)),
    ("default", dict(N=32768, d=512, normalize=True, ranks=8)),
    ("full", dict(N=300, d=100)),
    ("full", dict(N=262144, d=256, normalize=True)),
    ("full", dict(N=32768, d=1024, ranks=8)),
]


# -------------------------------------------------------------------------------- rms_norm
def rms_norm(mod, dt, M, N, weight=True, stats=True, need_dx=True):
    x, w = t(M, N, dtype=dt), t(N, dtype=dt) if weight else None
    y, rstd = mod.forward(x, w, 1e-6, 0.0, stats=stats)
    if stats:
        mod.backward(t(M, N, dtype=dt), x, w, rstd, 0.0, need_dx=need_dx, need_dw=True)


# Whole rows up to a next_pow2 width of 16384 forward / 8192 backward (BLOCK_N = next_pow2(N),
# BLOCK_M = 4096 // BLOCK_N, 1..64), beyond that 4096-wide chunks forward and 4x1024 tiles plus the
# row-stats kernel backward (N = 16384: forward fused, backward chunked). The row count only moves
# the grid, the dγ partials' reduce tile and the == 1 specialisation; no weight: dγ is not needed.
RMS_NORM_SHAPES = [
    ("quick", dict(M=16384, N=4096)),
    ("quick", dict(M=16384, N=16384)),
    ("quick", dict(M=16384, N=131072)),
    ("default", dict(M=16384, N=768)),
    ("default", dict(M=16384, N=8192)),
    ("default", dict(M=16384, N=4096, need_dx=False)),
    ("default", dict(M=16384, N=4096, stats=False)),
    ("default", dict(M=65536, N=131072, need_dx=False)),
    ("full", dict(M=16384, N=4096, weight=False)),
    ("full", dict(M=16384, N=1000)),
    ("full", dict(M=37, N=129)),
    ("full", dict(M=1, N=1)),
    ("full", dict(M=1, N=32768, weight=False)),
    ("full", dict(M=65536, N=16384, need_dx=False)),
]


# ------------------------------------------------------------------------------------ dora
def dora(mod, dt, M, K, N, r, bias=False, p=0.0):
    x, w = t(M, K, dtype=dt), t(N, K, dtype=dt)
    a, b, m = t(r, K, dtype=dt), t(N, r, dtype=dt), t(N, dtype=dt)
    save_z = bias or p > 0.0  # what ops/dora.py asks for when the magnitude trains
    # The dropout keep-mask comes from a torch.Generator, which the meta device has none of; its
    # values never reach a kernel's compile, only its shape does.
    mask_fn = mod.dropout_mask
    mod.dropout_mask = lambda shape, p, seed, device: t(*shape, dtype=torch.bool) if p > 0.0 else None
    try:
        y, u, c, rnorm, z = mod.forward(x, w, t(N, dtype=dt) if bias else None, a, b, m, None, 2.0, p, 1234, save_z)
        mod.backward(t(M, N, dtype=dt), x, w, a, b, u, c, rnorm, z, 2.0, p, 1234, need_dx=True, need_dW=False,
                     need_db=False, need_dm=True, z_is_y=not save_z)
    finally:
        mod.dropout_mask = mask_fn


# BLOCK_R = next_pow2(r) >= 16 up to the Triton limit 128; u is accumulated in the GEMM (FUSED) for
# r <= 64 when M·N is small, else it comes from cuBLAS. Dropout (DUAL) keeps a second accumulator;
# the backward without dropout is LoRA's (its rows dedupe into lora's). M = 1 / 16 are decode buckets.
DORA_SHAPES = [
    ("quick", dict(M=16384, r=16, **_LLAMA)),
    ("quick", dict(M=16384, r=128, p=0.1, **_LLAMA)),
    ("quick", dict(M=16, r=64, **_LLAMA)),
    ("default", dict(M=128, r=64, p=0.1, **_LLAMA)),
    ("default", dict(M=16384, r=64, bias=True, **_LLAMA)),
    ("default", dict(M=1, r=16, **_LLAMA)),
    ("default", dict(M=16384, r=8, p=0.1, K=1024, N=1024, bias=True)),
    ("full", dict(M=128, r=128, **_LLAMA)),
    ("full", dict(M=16384, r=48, p=0.1, K=1000, N=1000)),
    ("full", dict(M=37, r=8, K=1000, N=1000, bias=True)),
    ("full", dict(M=16384, r=32, p=0.1, **_LLAMA)),
    ("full", dict(M=64, r=128, p=0.1, **_LLAMA)),
]


# ------------------------------------------------------------------------------ lora_multi
def lora_multi(mod, dt, M, n, r, K=4096, N=4096, bias=False, p=0.0):
    x, w = t(M, K, dtype=dt), t(N, K, dtype=dt)
    a, b = t(n, r, K, dtype=dt), t(n, N, r, dtype=dt)
    s = t(n, dtype=torch.float64 if dt == torch.float64 else torch.float32)
    ids = t(M, dtype=torch.int64)
    y, u = mod.forward(x, w, t(N, dtype=dt) if bias else None, a, b, s, ids, p, 1234)
    mod.backward(t(M, N, dtype=dt), x, w, a, b, u, s, ids, p, 1234, need_dx=True, need_dW=False, need_db=False)


# M <= 16 takes the per-row down kernel (decode), more rows the sorted-segment one (prefill);
# BLOCK_R = next_pow2(r) >= 16 up to 64, r = 128 / 256 loop over chunks of 64. n only moves runtime
# ints (n == 1 specialises); the gb kernel's BLOCK_N is 128 (16-bit, r <= 32), 64 (16-bit r > 32,
# fp32). Dropout keeps a second accumulator in dx and regenerates masks in da.
LORA_MULTI_SHAPES = [
    ("quick", dict(M=1, n=16, r=16)),
    ("quick", dict(M=8192, n=4, r=16, p=0.1)),
    ("quick", dict(M=8192, n=16, r=128)),
    ("default", dict(M=16, n=64, r=64)),
    ("default", dict(M=64, n=16, r=16)),
    ("default", dict(M=8192, n=1, r=8)),
    ("default", dict(M=8192, n=4, r=256, p=0.1)),
    ("default", dict(M=8192, n=64, r=32, bias=True)),
    ("full", dict(M=1, n=1, r=256, p=0.1)),
    ("full", dict(M=8192, n=4, r=48, K=1000, N=1000)),
    ("full", dict(M=37, n=4, r=8, K=1000, N=1000, bias=True, p=0.1)),
    ("full", dict(M=65536, n=16, r=64, p=0.1)),
    ("full", dict(M=128, n=8, r=128)),
]

# GEMM-like kernels: one large block per SM can keep the tensor cores busy, so the gate does not
# ask them for a second block's worth of shared memory (every other kernel is memory-bound).
COMPUTE_BOUND = {"lora_fwd", "lora_bwd_dx", "infonce_fwd", "infonce_bwd_tile", "infonce_gemm", "dora_fwd",
                 "multi_fwd", "multi_bwd_dx"}

OPS = {
    "lora": (lora, LORA_SHAPES),
    "adapter": (adapter, ADAPTER_SHAPES),
    "layer_norm": (layer_norm, LAYER_NORM_SHAPES),
    "infonce": (infonce, INFONCE_SHAPES),
    "rms_norm": (rms_norm, RMS_NORM_SHAPES),
    "dora": (dora, DORA_SHAPES),
    "lora_multi": (lora_multi, LORA_MULTI_SHAPES),
}


def label(shape: dict) -> str:
    return " ".join(f"{k}={v}" if not isinstance(v, bool) else (k if v else f"no-{k}") for k, v in shape.items())
