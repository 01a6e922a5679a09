"""The fits of ``--factorize``, one level of sites at a time: in this process (``--workers 1``) or
in a pool of worker processes (``--workers N``), each site's time estimated before it starts
(logged, and reported with the measured time), a site whose estimate would end past
``--fit-seconds`` not started.

The unit of work is one site's :func:`onnx_split.factorize.fit` ``(method, target, gram,
density)``: numpy arrays and plain values in, the fitted factors out (float64, the same
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
import signal
import time
from dataclasses import dataclass

import numpy as np

from .factorize import Fitted, fit

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
    estimated_seconds: float
    fitted: Fitted | None = None
    fit_seconds: float | None = None
    """Wall-clock seconds of the fit itself, where it ran (None: not fitted)."""
    reason: str | None = None
    """Why the site was not fitted (None when it was)."""


def fit_timed(method: str, target: np.ndarray, gram: np.ndarray, density: float) -> tuple[Fitted, float]:
    """(the fit, its seconds): what a worker runs for one site."""
    start = time.perf_counter()
    fitted = fit(method, target, gram, density)
    return fitted, time.perf_counter() - start


def probe(method: str, size: int, density: float) -> float:
    """Seconds of one fit of ``method`` on a seeded random ``size`` x ``size`` layer."""
    rng = np.random.default_rng(size)
    x = rng.standard_normal((2 * size, size))
    weight = rng.standard_normal((size, size)) / np.sqrt(size)
    return fit_timed(method, weight, x.T @ x, density)[1]


_LIMIT = None


def _worker_start(threads: int) -> None:
    """A worker's initializer: Ctrl-C is the parent's to handle (it ends the pool), and BLAS gets
    ``threads`` threads so that N workers do not each start one thread per core.

    threadpoolctl (a runtime dependency) is used rather than OMP_NUM_THREADS and its kin: under
    spawn, numpy and its BLAS are already loaded when this runs (unpickling the initializer
    imports this module), and those variables are read only when the library loads;
    threadpoolctl changes the loaded libraries' limits in place."""
    global _LIMIT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover  (installed with onnx_split)
        return
    _LIMIT = threadpool_limits(limits=threads)


class Estimator:
    """Seconds one fit of ``method`` at ``density`` should take (see the module docstring)."""

    def __init__(self, method: str, density: float, run_probe):
        self.method, self.density, self._run_probe = method, density, run_probe
        self.probes: list[tuple[float, float]] = []
        self.finished: list[tuple[float, float]] = []

    def estimate(self, k: int, n: int) -> float:
        w = work(self.method, k, n)
        if len({p[0] for p in self.finished}) < 2:  # the probes this site needs, not yet timed
            for size in PROBE_SIZES[len(self.probes):]:
                if any(p[0] >= w for p in self.finished + self.probes):
                    break
                seconds = self._run_probe(self.method, size, self.density)
                self.probes.append((work(self.method, size, size), float(seconds)))
        a, b = _affine(self.finished if len({p[0] for p in self.finished}) > 1 else self.finished + self.probes)
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

    ``workers`` 1 fits in this process; more start a pool of at most that many processes (spawned,
    not forked: this process holds ONNX Runtime sessions) on first use, kept for the run's levels,
    each worker's BLAS limited to max(1, cpus // workers) threads. ``fit_seconds``: a site whose
    estimate would end past that many seconds after the fitting began (the clock starts with the
    first site's estimate, its probes included) is not started (those running finish)."""

    def __init__(self, method: str, density: float, workers: int = 1, fit_seconds: float | None = None,
                 clock=time.monotonic):
        self.method, self.density, self.workers, self.fit_seconds = method, density, int(workers), fit_seconds
        self.clock = clock
        self.started: float | None = None
        self.threads = max(1, (os.cpu_count() or 1) // self.workers)
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
                                                initializer=_worker_start, initargs=(self.threads,))
        return self._pool

    def _drop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _probe(self, method: str, size: int, density: float) -> float:
        if self.workers == 1:
            return probe(method, size, density)
        try:
            return self._executor().submit(probe, method, size, density).result()
        except cf.process.BrokenProcessPool:
            self._drop()
            return probe(method, size, density)  # measured here then; the fits will tell

    def _start(self, job: Job) -> tuple[float, str | None]:
        """(the job's estimated seconds, why it is not started or None)."""
        if self.started is None:
            self.started = self.clock()
        k, n = job.target.shape
        estimate = self.estimator.estimate(k, n)
        elapsed = self.clock() - self.started
        if self.fit_seconds is not None and elapsed + estimate > self.fit_seconds:
            return estimate, (f"not factorized: its fit was estimated at {estimate:.3g} s, which would end past "
                              f"--fit-seconds {self.fit_seconds:g} ({elapsed:.3g} s of fitting had passed)")
        log.info("fitting %s (%s, %dx%d): estimated %.3g s", job.name, self.method, k, n, estimate)
        return estimate, None

    def _done(self, job: Job, estimate: float, fitted: Fitted, seconds: float) -> Outcome:
        self.estimator.record(*job.target.shape, seconds)
        log.info("fitted %s in %.3g s (estimated %.3g s)", job.name, seconds, estimate)
        return Outcome(job.site, estimate, fitted, seconds)

    def level(self, jobs: list[Job]):
        """One :class:`Outcome` per job, as the fits finish (in ``jobs``' order with one worker)."""
        if self.workers == 1:
            for job in jobs:
                estimate, why = self._start(job)
                if why is not None:
                    yield Outcome(job.site, estimate, reason=why)
                    continue
                fitted, seconds = fit_timed(self.method, job.target, job.gram, self.density)
                yield self._done(job, estimate, fitted, seconds)
            return
        waiting, running = collections.deque(jobs), {}
        while waiting or running:
            while waiting and len(running) < self.workers:
                job = waiting.popleft()
                estimate, why = self._start(job)
                if why is not None:
                    yield Outcome(job.site, estimate, reason=why)
                    continue
                future = self._executor().submit(fit_timed, self.method, job.target, job.gram, self.density)
                running[future] = job, estimate
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: running[f][0].site):
                job, estimate = running.pop(future)
                try:
                    fitted, seconds = future.result()
                except cf.process.BrokenProcessPool:
                    self._drop()  # a new pool for the jobs left (the broken one is unusable)
                    log.warning("the worker process fitting %s died", job.name)
                    yield Outcome(job.site, estimate, reason="not factorized: the worker process fitting it died "
                                                             "(killed, or out of memory?)")
                    continue
                yield self._done(job, estimate, fitted, seconds)


def _terminate(pool: cf.ProcessPoolExecutor) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.terminate()
        except Exception:  # noqa: BLE001  (already gone)
            pass


__all__ = ["FitPool", "Job", "Outcome", "PROBE_SIZES", "fit_timed", "probe", "work"]
