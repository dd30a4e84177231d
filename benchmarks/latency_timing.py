"""make bench's timing: interleaved rounds of every variant, warm-up, CUDA-graph capture, the
time budget and progress lines."""
from __future__ import annotations

import functools
import math
import statistics
import time

import torch
from torch import nn

from latency_config import BASE, MIN_ROUNDS, VARIANTS, Config, setting_label
from latency_report import format_cell


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(forward, device: torch.device) -> float:
    """Milliseconds of one call of ``forward()`` (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    forward()
    return (time.perf_counter() - t0) * 1e3


def eager_forwards(variants: dict, input_ids: torch.Tensor) -> dict:
    """name -> a zero-argument call of that variant's forward on ``input_ids``."""
    return {name: functools.partial(model, input_ids, use_cache=False) for name, model in variants.items()}


def run_rounds(forwards: dict, device: torch.device, rounds: int, samples: dict | None,
               deadline: float = math.inf, min_rounds: int = 0) -> int:
    """``rounds`` rounds of one call of each of ``forwards`` (name -> zero-argument callable),
    rotating the order each round.

    With ``samples`` (name -> list), the times are appended to it; without, it is warm-up.
    Past ``deadline`` (a perf_counter value) it stops early, after at least ``min_rounds``.
    Returns the number of rounds run.
    """
    names = list(forwards)
    with torch.inference_mode():
        _synchronize(device)
        done = 0
        for i in range(rounds):
            if i >= min_rounds and time.perf_counter() > deadline:
                break
            for name in names[i % len(names):] + names[:i % len(names)]:
                ms = time_forward(forwards[name], device)
                if samples is not None:
                    samples[name].append(ms)
            done += 1
    return done


def capture_forward(model: nn.Module, input_ids: torch.Tensor):
    """``model(input_ids)`` captured as a CUDA graph. A replay reruns the same kernels on the
    same buffers with no Python, dispatch or launch cost: its time is the forward's GPU time.
    Autotuning must be done before (the warm-up rounds do it): a capture cannot benchmark."""
    device = input_ids.device
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # lazy set-up (cuBLAS handles, workspaces) outside the capture
        model(input_ids, use_cache=False)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(input_ids, use_cache=False)
    return graph


def capture_all(variants: dict, input_ids: torch.Tensor) -> tuple:
    """(name -> graph replay, name -> why its capture failed): a variant that cannot be
    captured is reported, never timed some other way under the graphs heading."""
    replays, failed = {}, {}
    with torch.inference_mode():
        for name, model in variants.items():
            try:
                replays[name] = capture_forward(model, input_ids).replay
            except Exception as err:  # noqa: BLE001  (any failure: report it and go on)
                failed[name] = (f"{type(err).__name__}: {err}".splitlines() or ["?"])[0][:300]
    return replays, failed


def paired_overhead_pct(times: list, base_times: list) -> float:
    """Median over rounds of (variant time / base time in the same round) − 1, in percent.

    Rounds are interleaved, so both times of a pair saw the same machine load: this is the
    overhead estimate least disturbed by other processes.
    """
    return (statistics.median(t / b for t, b in zip(times, base_times)) - 1.0) * 100.0


def summarize(times: list) -> dict:
    return {"mean_ms": statistics.fmean(times),
            "std_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
            "median_ms": statistics.median(times), "min_ms": min(times), "n": len(times),
            "samples_ms": [round(t, 4) for t in times]}


def measure_setting(variants: dict, cfg: Config, setting, progress=None, seconds: float = math.inf,
                    graphs: bool = False) -> dict:
    """Warm up, then time all variants interleaved at one (batch, seq); returns name -> stats.

    ``seconds`` bounds the whole setting: warm-up gets its pro-rata part of it (at least one
    round), timed rounds stop when it is spent and MIN_ROUNDS are done. With ``graphs``, the
    warm-up runs eagerly, then each variant is captured as a CUDA graph and the replays are
    timed; variants whose capture failed get {"capture_failed": reason} instead of times.
    """
    batch, seq = setting
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * batch + seq)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(cfg.device)
    device = ids.device
    forwards = eager_forwards(variants, ids)
    t0 = time.perf_counter()
    warm_seconds = seconds * cfg.warmup / (cfg.warmup + cfg.repeats) if cfg.warmup else 0.0
    warm = run_rounds(forwards, device, cfg.warmup, None, t0 + warm_seconds, min_rounds=min(1, cfg.warmup))
    if progress is not None:
        progress.warmed_up(time.perf_counter() - t0, warm, cfg)
    failed = {}
    if graphs:
        forwards, failed = capture_all(variants, ids)
        if BASE in failed:
            raise RuntimeError(f"CUDA graph capture of {BASE!r} failed: {failed[BASE]}")
    samples = {name: [] for name in forwards}
    run_rounds(forwards, device, cfg.repeats, samples, t0 + seconds, min_rounds=MIN_ROUNDS)
    del forwards  # the graphs, and the memory pools they hold
    stats = {name: summarize(times) for name, times in samples.items()}
    base = stats[BASE]["mean_ms"]
    for name, s in stats.items():
        s["overhead_pct"] = 0.0 if name == BASE else (s["mean_ms"] / base - 1.0) * 100.0
        s["overhead_paired_median_pct"] = (0.0 if name == BASE else
                                           paired_overhead_pct(samples[name], samples[BASE]))
    stats.update({name: {"capture_failed": reason} for name, reason in failed.items()})
    return {name: stats[name] for name in variants}


class Progress:
    """Prints a line per finished cell, with elapsed time and an ETA.

    The ETA assumes a forward pass costs ~ (64 + batch·seq) units (a fixed part that
    dominates at tiny batches, then linear in tokens), scaled by the time measured so far.
    """

    def __init__(self, cfg: Config, phase: str = "eager"):
        self.start, self.phase = time.perf_counter(), phase
        self.total_cells = len(cfg.settings) * len(VARIANTS)
        self.done_cells = 0
        self.work = [64.0 + b * s for b, s in cfg.settings]
        self.done_work = 0.0

    def setting_started(self, index: int, setting, cfg: Config) -> None:
        print(f"[{self._elapsed()}] {self.phase}: setting {index + 1}/{len(cfg.settings)} {setting_label(setting)}: "
              f"{cfg.warmup} warm-up + {cfg.repeats} timed rounds of {len(VARIANTS)} variants", flush=True)

    def warmed_up(self, seconds: float, rounds: int, cfg: Config) -> None:
        if rounds:
            print(f"[{self._elapsed()}]   warm-up {rounds} round(s) {seconds:.1f}s; {cfg.repeats} timed rounds "
                  f"would take ~{seconds / rounds * cfg.repeats:.0f}s", flush=True)

    def setting_done(self, index: int, setting, stats: dict, cfg: Config) -> None:
        self.done_work += self.work[index]
        n = stats[BASE]["n"]
        if n < cfg.repeats:
            print(f"[{self._elapsed()}]   --time-budget {cfg.time_budget:g}s reached: "
                  f"{n} of {cfg.repeats} timed rounds", flush=True)
        for name, s in stats.items():
            self.done_cells += 1
            cell = f"{format_cell(s)}  (N={s['n']})" if "n" in s else f"capture failed: {s['capture_failed']}"
            print(f"[{self._elapsed()}] cell {self.done_cells:2d}/{self.total_cells} {setting_label(setting):>8} "
                  f"{name:<21} {cell}", flush=True)
        print(f"[{self._elapsed()}] {setting_label(setting)} done{self._eta_text()}", flush=True)

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.start:6.1f}s"

    def _eta_text(self) -> str:
        remaining_work = sum(self.work) - self.done_work
        if self.done_work == 0 or remaining_work <= 0:
            return ""
        rate = (time.perf_counter() - self.start) / self.done_work
        return f", ETA {rate * remaining_work:.0f}s"


def setting_seconds(budget: float, progress: "Progress", index: int, start: float) -> float:
    """Seconds setting ``index`` may take so the whole phase keeps to ``budget`` (0: none).

    What is left of the budget is shared among the remaining settings in proportion to
    their estimated work.
    """
    if not budget:
        return math.inf
    left = budget - (time.perf_counter() - start)
    return max(left, 0.0) * progress.work[index] / sum(progress.work[index:])


# Share of --time-budget the eager phase gets when CUDA graphs are timed too (a replay costs at
# most what the eager forward does, far less at batch 1).
EAGER_SHARE = 0.6


def measure_all(variants: dict, cfg: Config, graphs: bool = False, budget: float | None = None) -> dict:
    """label -> variant name -> stats, for every (batch, seq) setting, with progress lines;
    ``graphs``: the CUDA-graph replays instead of eager forwards."""
    progress = Progress(cfg, "CUDA graphs" if graphs else "eager")
    budget = cfg.time_budget if budget is None else budget
    start = time.perf_counter()
    results = {}
    for index, setting in enumerate(cfg.settings):
        progress.setting_started(index, setting, cfg)
        seconds = setting_seconds(budget, progress, index, start)
        results[setting_label(setting)] = measure_setting(variants, cfg, setting, progress, seconds, graphs)
        progress.setting_done(index, setting, results[setting_label(setting)], cfg)
    return results


def measure_graphs(variants: dict, cfg: Config, budget: float) -> tuple:
    """(results, None) of the CUDA-graph phase, or (None, why) when it could not run: a failure
    there must not cost the eager table already measured."""
    try:
        return measure_all(variants, cfg, graphs=True, budget=budget), None
    except Exception as err:  # noqa: BLE001
        print(f"CUDA graphs phase failed, eager results kept: {type(err).__name__}: {err}", flush=True)
        return None, f"{type(err).__name__}: {err}"
