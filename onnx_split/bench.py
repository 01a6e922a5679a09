"""Latency of two models in ONNX Runtime, measured as a ratio in one process.

Both sessions are warmed up, then run interleaved (alternating which goes first) until a time
budget is spent; medians and p90 are reported. Inputs and outputs are bound with IOBinding on the
provider's device, so on CUDA host<->device copies are outside the timed region.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .runtime import CUDA, make_session, model_source, ort_error, provider_status


@dataclass
class LatencyEntry:
    provider: str
    status: str  # measured | unavailable
    original_ms: float | None = None
    rewritten_ms: float | None = None
    speedup: float | None = None
    """original median / rewritten median: > 1 means the rewrite is faster"""
    original_p90_ms: float | None = None
    rewritten_p90_ms: float | None = None
    runs: int = 0
    threads: int = 1
    detail: str = ""
    inputs: str = ""
    """what the models ran on (e.g. ``batch 32``)"""


class Runner:
    """One session with its inputs bound on the provider's device."""

    def __init__(self, source, provider: str, feeds: dict[str, np.ndarray], threads: int):
        self.session = make_session(source, provider, "enabled", threads)
        device = "cuda" if provider == CUDA else "cpu"
        self.binding = self.session.io_binding()
        self._keep = []
        for name, value in feeds.items():
            ortvalue = ort.OrtValue.ortvalue_from_numpy(value, device, 0)
            self._keep.append(ortvalue)
            self.binding.bind_ortvalue_input(name, ortvalue)
        for out in self.session.get_outputs():
            self.binding.bind_output(out.name, device)

    def __call__(self) -> float:
        start = time.perf_counter_ns()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return (time.perf_counter_ns() - start) / 1e6


def round_robin(runs: list, *, seconds: float, warmup: int = 5, min_rounds: int = 10,
                max_rounds: int = 100_000) -> list[list[float]]:
    """Warm every run up, then run them in rounds, rotating which goes first, until ``seconds`` have
    passed or ``max_rounds`` are done (at least ``min_rounds``). Returns each run's times."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() < deadline):
        shift = rounds % len(runs)
        for i in list(range(shift, len(runs))) + list(range(shift)):
            times[i].append(runs[i]())
        rounds += 1
    return times


def time_pair(run_a, run_b, *, seconds: float, warmup: int = 5, min_runs: int = 10,
              max_runs: int = 100_000) -> tuple[list[float], list[float]]:
    """Two runs interleaved (alternating which goes first): see :func:`round_robin`."""
    times_a, times_b = round_robin([run_a, run_b], seconds=seconds, warmup=warmup, min_rounds=min_runs,
                                   max_rounds=max_runs)
    return times_a, times_b


def benchmark_models(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict[str, np.ndarray], *,
                     providers: list[str], seconds: float = 1.0, threads: int = 1) -> list[LatencyEntry]:
    entries = []
    with model_source(original) as src_a, model_source(rewritten) as src_b:
        for provider in providers:
            why = provider_status(provider)
            if why:
                entries.append(LatencyEntry(provider, "unavailable", threads=threads, detail=why))
                continue
            try:
                run_a = Runner(src_a, provider, feeds, threads)
                run_b = Runner(src_b, provider, feeds, threads)
            except Exception as exc:  # ORT raises its own types
                entries.append(LatencyEntry(provider, "unavailable", threads=threads,
                                            detail=f"cannot run here: {ort_error(exc)}"))
                continue
            try:
                a, b = time_pair(run_a, run_b, seconds=seconds)
            except Exception as exc:  # a model that loads can still fail to run on these inputs
                entries.append(LatencyEntry(provider, "unavailable", threads=threads,
                                            detail=f"failed while running: {ort_error(exc)}"))
                continue
            entries.append(summarize(provider, a, b, threads))
    return entries


def summarize(provider: str, a: list[float], b: list[float], threads: int) -> LatencyEntry:
    med_a, med_b = float(np.median(a)), float(np.median(b))
    return LatencyEntry(
        provider, "measured", original_ms=med_a, rewritten_ms=med_b,
        speedup=med_a / med_b if med_b > 0 else None,
        original_p90_ms=float(np.percentile(a, 90)), rewritten_p90_ms=float(np.percentile(b, 90)),
        runs=len(a), threads=threads,
    )
