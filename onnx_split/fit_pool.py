"""The fits of ``--factorize``, one level of sites at a time: in this process (``--workers 1``) or
in a pool of worker processes (``--workers N``), each site's time estimated before it starts
(logged, and reported with the measured time), a site whose estimate would end past
``--fit-seconds`` not started.

The unit of work is one site's :func:`onnx_split.factorize.fit` ``(method, target, gram,
density)`` (:func:`~onnx_split.factorize.fit_structured` for ``blocks`` and ``lowrank``, which
take the block count too): numpy arrays and plain values in, the fitted factors out (float64, the same
computation wherever it runs). The sites of one level are independent of each other; levels are
sequential (a level is fitted on the activations the levels before it produce), so the planner
hands over one level at a time and builds the plans from what comes back.

The estimate: seconds = a + b·work(method, K, N), with a and b fitted (least squares, both ≥ 0)
on the fits of this method already finished in this run and, until one has, on tiny timed fits
of the same method and density on a seeded random problem (:data:`PROBE_SIZES`), run where the
fits run (in a worker when there is a pool), so that the rate is measured, not assumed.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass

import numpy as np

from .blas import limited, worker_start
from .factorize import DEFAULT_BLOCKS, STRUCTURED, Fitted, fit, fit_structured

log = logging.getLogger(__name__)

PROBE_SIZES = (64, 128)
"""Sides of the square probe layers timed before the first real fit of a method finishes (the
second only for a site larger than the first)."""


def work(method: str, k: int, n: int) -> float:
    """A measure of the arithmetic of fitting a K x N weight with ``method`` (only its growth with
    K and N matters: the rate is calibrated per method). ``magnitude``/``wanda``: a top-k over
    K·N; ``sparsegpt``: the inverse Hessian (K³) and the row updates (K²N); ``admm``: one
    Cholesky factorisation (K³) and solves (K²N) per round; ``dsf``: the same on the r x r
    systems of both factors, r = min(K, N)."""
    k, n = int(k), int(n)
    if method in ("magnitude", "wanda"):
        return float(k * n)
    if method == "dsf":
        r = min(k, n)
        return float(r * r * (r + k + n))
    return float(k * k * (k + n))


@dataclass(frozen=True, eq=False)
class Job:
    """One site's fit: the weight to approximate (the corrected target W̃, float64) and XᵀX."""

    site: int
    name: str
    target: np.ndarray
    gram: np.ndarray


@dataclass(frozen=True, eq=False)
class Outcome:
    site: int
    estimated_seconds: float | None
    """None where nothing could be measured to estimate it from."""
    fitted: object = None
    """The :class:`~onnx_split.factorize.Fitted` (or ``Structured``) factors; None: not fitted."""
    fit_seconds: float | None = None
    """Wall-clock seconds of the fit itself, where it ran (None: not fitted)."""
    reason: str | None = None
    """Why the site was not fitted (None when it was)."""


def fit_any(method: str, target: np.ndarray, gram: np.ndarray, density: float, groups: int = DEFAULT_BLOCKS):
    """:func:`~onnx_split.factorize.fit`, or ``fit_structured`` for the structured methods."""
    if method in STRUCTURED:
        return fit_structured(method, target, gram, density, groups)
    return fit(method, target, gram, density)


def fit_timed(method: str, target: np.ndarray, gram: np.ndarray, density: float,
              groups: int = DEFAULT_BLOCKS) -> tuple[Fitted, float]:
    """(the fit, its seconds): what a worker runs for one site."""
    start = time.perf_counter()
    fitted = fit_any(method, target, gram, density, groups)
    return fitted, time.perf_counter() - start


def probe(method: str, size: int, density: float, groups: int = DEFAULT_BLOCKS) -> tuple[int, float] | None:
    """(the side, the seconds) of one fit of ``method`` on a seeded random square layer of about
    ``size`` (a multiple of ``groups`` for ``blocks``; doubled, up to 8 times, while the method
    refuses it at ``density``), or None if it refuses them all."""
    if method == "blocks":
        size = groups * max(1, -(-size // groups))
    for side in (size, 2 * size, 4 * size, 8 * size):
        rng = np.random.default_rng(side)
        x = rng.standard_normal((2 * side, side))
        weight = rng.standard_normal((side, side)) / np.sqrt(side)
        try:
            return side, fit_timed(method, weight, x.T @ x, density, groups)[1]
        except ValueError:  # a structured method's refusal (too low a density for this side)
            continue
    return None


class Estimator:
    """Seconds one fit of ``method`` at ``density`` should take (see the module docstring)."""

    def __init__(self, method: str, density: float, run_probe):
        self.method, self.density, self._run_probe = method, density, run_probe
        self.probes: list[tuple[float, float]] = []
        self.tried = 0
        self.finished: list[tuple[float, float]] = []

    def estimate(self, k: int, n: int) -> float | None:
        """Seconds; None where nothing could be measured (no probe the method accepts, no fit finished)."""
        w = work(self.method, k, n)
        if len({p[0] for p in self.finished}) < 2:  # the probes this site needs, not yet timed
            while self.tried < len(PROBE_SIZES) and not any(p[0] >= w for p in self.finished + self.probes):
                found = self._run_probe(self.method, PROBE_SIZES[self.tried], self.density)
                self.tried += 1
                if found is not None:
                    side, seconds = found
                    self.probes.append((work(self.method, side, side), float(seconds)))
        points = self.finished if len({p[0] for p in self.finished}) > 1 else self.finished + self.probes
        if not points:
            return None
        a, b = _affine(points)
        return a + b * w

    def record(self, k: int, n: int, seconds: float) -> None:
        self.finished.append((work(self.method, k, n), float(seconds)))


def _affine(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) ≥ 0 of seconds ≈ a + b·work by least squares (one point, or points of one work:
    proportional)."""
    w = np.array([p[0] for p in points], dtype=np.float64)
    t = np.array([p[1] for p in points], dtype=np.float64)
    if len(points) > 1 and np.ptp(w) > 0:
        (b, a), *_ = np.linalg.lstsq(np.stack([w, np.ones_like(w)], axis=1), t, rcond=None)
        if a >= 0 and b >= 0:
            return float(a), float(b)
        if b > 0:  # a < 0: through the origin
            return 0.0, float(np.dot(w, t) / np.dot(w, w))
    return 0.0, float(t.sum() / max(w.sum(), 1.0))


class FitPool:
    """The fits of one run (``with FitPool(...) as pool: for outcome in pool.level(jobs): ...``).

    ``workers`` 1 fits in this process, BLAS limited to ``threads`` (``--threads``, blas.py); more
    start a pool of at most that many processes (spawned, not forked: this process holds ONNX
    Runtime sessions) on first use, kept for the run's levels, each worker's BLAS limited to
    max(1, min(threads, cpus // workers)) threads: its share of the cores, and never more than one
    process would use (more threads than that only wait on each other on shared cores, blas.py). ``fit_seconds``: a site whose
    estimate would end past that many seconds after the fitting began (the clock starts with the
    first site's estimate, its probes included) is not started (those running finish)."""

    def __init__(self, method: str, density: float, workers: int = 1, fit_seconds: float | None = None,
                 threads: int = 1, groups: int = DEFAULT_BLOCKS, clock=time.monotonic):
        self.method, self.density, self.workers, self.fit_seconds = method, density, int(workers), fit_seconds
        self.groups, self.clock = groups, clock
        self.started: float | None = None
        self.threads = max(1, int(threads))
        self.worker_threads = max(1, min(self.threads, (os.cpu_count() or 1) // self.workers))
        self._pool: cf.ProcessPoolExecutor | None = None
        self.estimator = Estimator(method, density, self._probe)

    def __enter__(self) -> "FitPool":
        return self

    def __exit__(self, kind, value, trace) -> None:
        self.close(abandon=kind is not None)

    def close(self, abandon: bool = False) -> None:
        """End the pool; ``abandon`` (an error or an interrupt): its running fits are killed, not
        waited for (a DSF fit can take minutes)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if abandon:
            _terminate(pool)
        pool.shutdown(wait=True, cancel_futures=True)

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=worker_start, initargs=(self.worker_threads,))
        return self._pool

    def _drop(self, broken: cf.ProcessPoolExecutor | None = None) -> None:
        """End the current pool (the next job starts a new one); with ``broken``, only if that is
        still the current pool (a future of a pool already replaced must not end its successor)."""
        if broken is not None and broken is not self._pool:
            return
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, job: Job):
        """(the pool, the future) of ``job``'s fit; a pool found broken (a worker died while this
        process was busy elsewhere) is replaced once."""
        for attempt in (0, 1):
            pool = self._executor()
            try:
                return pool, pool.submit(fit_timed, self.method, job.target, job.gram, self.density, self.groups)
            except cf.process.BrokenProcessPool:
                self._drop(pool)
                if attempt:
                    raise

    def _probe(self, method: str, size: int, density: float):
        if self.workers > 1:
            try:
                return self._executor().submit(probe, method, size, density, self.groups).result()
            except cf.process.BrokenProcessPool:
                self._drop()  # measured here then; the fits will tell
        with limited(self.threads):
            return probe(method, size, density, self.groups)

    def _start(self, job: Job) -> tuple[float | None, str | None]:
        """(the job's estimated seconds or None, why it is not started or None)."""
        if self.started is None:
            self.started = self.clock()
        k, n = job.target.shape
        estimate = self.estimator.estimate(k, n)
        elapsed = self.clock() - self.started
        if self.fit_seconds is not None and estimate is not None and elapsed + estimate > self.fit_seconds:
            return estimate, (f"not factorized: its fit was estimated at {estimate:.3g} s, which would end past "
                              f"--fit-seconds {self.fit_seconds:g} ({elapsed:.3g} s of fitting had passed)")
        log.info("fitting %s (%s, %dx%d): estimated %s", job.name, self.method, k, n, _seconds(estimate))
        return estimate, None

    def _done(self, job: Job, estimate: float | None, fitted, seconds: float) -> Outcome:
        self.estimator.record(*job.target.shape, seconds)
        log.info("fitted %s in %.3g s (estimated %s)", job.name, seconds, _seconds(estimate))
        return Outcome(job.site, estimate, fitted, seconds)

    def level(self, jobs: list[Job]):
        """One :class:`Outcome` per job, as the fits finish (in ``jobs``' order with one worker)."""
        if self.workers == 1:
            for job in jobs:
                estimate, why = self._start(job)
                if why is not None:
                    yield Outcome(job.site, estimate, reason=why)
                    continue
                with limited(self.threads):
                    fitted, seconds = fit_timed(self.method, job.target, job.gram, self.density, self.groups)
                yield self._done(job, estimate, fitted, seconds)
            return
        # A worker that dies breaks its whole pool: every fit running there fails with it. Those
        # fits are suspects, rerun one at a time (nothing else running), so that only the fit that
        # kills its worker when it runs alone is reported as such.
        waiting, running, suspects = collections.deque(jobs), {}, collections.deque()
        while waiting or running or suspects:
            while True:  # start what may start: a suspect alone, else new jobs up to the workers
                if suspects and not running:
                    (job, estimate), alone = suspects.popleft(), True
                elif waiting and not suspects and len(running) < self.workers:
                    job, alone = waiting.popleft(), False
                    estimate, why = self._start(job)
                    if why is not None:
                        yield Outcome(job.site, estimate, reason=why)
                        continue
                else:
                    break
                try:
                    pool, future = self._submit(job)
                except cf.process.BrokenProcessPool:
                    yield Outcome(job.site, estimate, reason=NO_WORKER)
                    continue
                running[future] = job, estimate, pool, alone
            if not running:
                continue
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: running[f][0].site):
                job, estimate, pool, alone = running.pop(future)
                try:
                    fitted, seconds = future.result()
                except (cf.process.BrokenProcessPool, cf.CancelledError):
                    self._drop(pool)  # a new pool for the jobs left (the broken one is unusable)
                    if not alone:
                        suspects.append((job, estimate))
                        continue
                    log.warning("a worker process died while %s was being fitted", job.name)
                    yield Outcome(job.site, estimate, reason="not factorized: a worker process of the pool died "
                                                             "while it was being fitted (killed, or out of memory?)")
                    continue
                yield self._done(job, estimate, fitted, seconds)


NO_WORKER = "not factorized: no worker process could be started for its fit"


def _seconds(estimate: float | None) -> str:
    return "-" if estimate is None else f"{estimate:.3g} s"


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.terminate()
        except Exception:  # noqa: BLE001  (already gone)
            pass


__all__ = ["FitPool", "Job", "Outcome", "PROBE_SIZES", "fit_any", "fit_timed", "probe", "work"]
