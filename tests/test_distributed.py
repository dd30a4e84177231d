"""InfoNCELoss(gather_distributed=True) over two gloo processes on CPU, against the
single-process loss on the whole batch.

Convention checked (the module's docstring, as open_clip's ClipLoss with gather_with_grad):
every rank computes the loss of the global batch, so
  * the loss value on each rank equals the single-process loss on the whole batch;
  * each rank's local image/text shard receives world_size × its slice of the single-process
    gradient (the gather's backward sums every rank's gradient), which DDP's averaging turns
    into exactly the full-batch gradient of the parameters producing the features;
  * logit_scale is not gathered: each rank's copy receives dL/dc of the full loss, i.e. 1 ×
    the single-process gradient, so DDP's averaging again gives the full-batch gradient.
The workers write their results to files; every assertion runs in the parent process.
"""
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_kernels as lk
from lora_kernels.reference import infonce as ref

from lora_kernels import backend as backends
from lora_kernels.ops.infonce import ROWS_IMPLS

from conftest import backends_for, rel_err

pytestmark = pytest.mark.slow

WORLD = 2
N_PER_RANK, DIM = 7, 11
CONFIGS = [(normalize, lambda_) for normalize in (False, True) for lambda_ in (0.5, 0.2)]
# The workers inherit the environment, so they see the same backends (triton: TRITON_INTERPRET=1).
BACKENDS = backends_for(ROWS_IMPLS)
TOL = 1e-10
JOIN_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ worker side (children)

def _device_for(backend: str) -> torch.device:
    """Where a backend's shards live: the GPU for the compiled backends (gloo gathers and
    reduces CUDA tensors too), the CPU for the reference and for Triton's interpreter."""
    on_gpu = backend != "torch" and torch.cuda.is_available() and not backends.interpreting()
    return torch.device("cuda" if on_gpu else "cpu")


def _gather_scenario(rank, world, workdir: Path):
    data = torch.load(workdir / "data.pt")
    results = {}
    for (normalize, lambda_), backend in ((c, b) for c in CONFIGS for b in BACKENDS):
        image_full, text_full, log_scale_value = data[(normalize, lambda_)]
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        device = _device_for(backend)
        image = image_full[rows].to(device, copy=True).requires_grad_(True)
        text = text_full[rows].to(device, copy=True).requires_grad_(True)
        log_scale = torch.nn.Parameter(torch.tensor(log_scale_value, dtype=torch.float64, device=device))
        loss_fn = lk.InfoNCELoss(lambda_=lambda_, normalize=normalize, gather_distributed=True)
        with lk.use_backend(backend):
            loss = loss_fn(image, text, log_scale.exp())
            loss.backward()
        results[(normalize, lambda_, backend)] = {
            "loss": loss.detach().cpu(), "d_image": image.grad.cpu(), "d_text": text.grad.cpu(),
            "d_log_scale": log_scale.grad.cpu(),
        }
    return results


def _unequal_scenario(rank, world, workdir: Path):
    n = N_PER_RANK - 1 + rank  # 6 rows on rank 0, 7 on rank 1
    image = torch.randn(n, DIM, dtype=torch.float64, requires_grad=True)
    text = torch.randn(n, DIM, dtype=torch.float64, requires_grad=True)
    try:
        lk.InfoNCELoss(gather_distributed=True)(image, text, torch.tensor(2.0, dtype=torch.float64))
    except ValueError as err:
        return {"raised": "ValueError", "message": str(err)}
    except Exception as err:  # noqa: BLE001  reported to the parent, which fails the test
        return {"raised": type(err).__name__, "message": str(err)}
    return {"raised": None, "message": ""}


def _worker(rank, world, port, workdir):
    workdir = Path(workdir)
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        try:
            assert dist.get_world_size() == world
            result = {"gather": _gather_scenario(rank, world, workdir),
                      "unequal": _unequal_scenario(rank, world, workdir)}
        finally:
            dist.destroy_process_group()
        torch.save(result, workdir / f"result{rank}.pt")
    except BaseException:
        (workdir / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


# ------------------------------------------------------------------ parent side

def _launch(workdir: Path):
    """Run the workers on WORLD gloo processes (one launch: spawning costs seconds);
    return each rank's results or fail the test."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, WORLD, port, str(workdir)), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
    errors = [f"rank {rank}:\n{(workdir / f'error{rank}.txt').read_text()}"
              for rank in range(WORLD) if (workdir / f"error{rank}.txt").exists()]
    assert not errors, "worker failed:\n" + "\n".join(errors)
    assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S} s"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * WORLD, f"worker exit codes {codes}"
    return [torch.load(workdir / f"result{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The full batches, the single-process expectations, and what every rank computed."""
    workdir = tmp_path_factory.mktemp("infonce_gather")
    gen = torch.Generator().manual_seed(20240611)
    data, expected = {}, {}
    for i, (normalize, lambda_) in enumerate(CONFIGS):
        scale = 1.0 if normalize else 0.4
        image = torch.randn(WORLD * N_PER_RANK, DIM, generator=gen, dtype=torch.float64) * scale
        text = torch.randn(WORLD * N_PER_RANK, DIM, generator=gen, dtype=torch.float64) * scale
        log_scale_value = 1.1 + 0.3 * i
        data[(normalize, lambda_)] = (image, text, log_scale_value)

        # Single process, whole batch, plain-autograd spec (not the op under test).
        im, tx = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        log_scale = torch.tensor(log_scale_value, dtype=torch.float64, requires_grad=True)
        loss = ref.infonce(im, tx, log_scale.exp(), lambda_=lambda_, normalize=normalize)
        d_image, d_text, d_log_scale = torch.autograd.grad(loss, (im, tx, log_scale))
        expected[(normalize, lambda_)] = {"loss": loss.detach(), "d_image": d_image, "d_text": d_text,
                                          "d_log_scale": d_log_scale}
    torch.save(data, workdir / "data.pt")
    return data, expected, _launch(workdir)


def _local(full, rank):
    return full[rank * N_PER_RANK:(rank + 1) * N_PER_RANK]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize,lambda_", CONFIGS, ids=[f"normalize={a}-lambda={b}" for a, b in CONFIGS])
@pytest.mark.parametrize("rank", range(WORLD))
def test_gathered_infonce_matches_single_process(launched, normalize, lambda_, rank, backend):
    _, expected, results = launched
    exp, got = expected[(normalize, lambda_)], results[rank]["gather"][(normalize, lambda_, backend)]

    err = rel_err(got["loss"], exp["loss"])
    assert err <= TOL, f"rank {rank}: loss {float(got['loss'])} vs single-process {float(exp['loss'])}"

    assert got["d_image"].shape == got["d_text"].shape == (N_PER_RANK, DIM)

    for name in ("d_image", "d_text"):
        want = WORLD * _local(exp[name], rank)
        err = rel_err(got[name], want)
        assert err <= TOL, f"rank {rank}: {name} is {err:.2e} away from world_size × its single-process slice"

    err = rel_err(got["d_log_scale"], exp["d_log_scale"])
    assert err <= TOL, (f"rank {rank}: d log_scale {float(got['d_log_scale'])} vs single-process "
                        f"{float(exp['d_log_scale'])} (each rank computes the full loss)")


def test_local_loss_differs_from_global(launched):
    """Guards the test itself: a gather that silently did nothing (each rank computing the loss
    of its own shard only) would not match the global loss."""
    data, expected, _ = launched
    for key, (image, text, log_scale_value) in data.items():
        scale = torch.tensor(log_scale_value, dtype=torch.float64).exp()
        normalize, lambda_ = key
        for rank in range(WORLD):
            local = ref.infonce(_local(image, rank), _local(text, rank), scale, lambda_, normalize)
            assert rel_err(local, expected[key]["loss"]) > 1e-3


def test_unequal_batches_raise_value_error(launched):
    """Rank 0 holds 6 rows, rank 1 holds 7: both must get a ValueError (not a hang or a crash)."""
    _, _, results = launched
    for rank, res in enumerate(r["unequal"] for r in results):
        assert res["raised"] == "ValueError", f"rank {rank}: expected ValueError, got {res}"
        assert "6" in res["message"] and "7" in res["message"], f"message should give the sizes: {res['message']}"
