"""Balanced partitions computed ahead, in a second process, while this one fits the sites before.

A ``--tolerance`` search and a ``--dry-run`` partition every candidate site at 2, 4, 8 and 16
parts (METIS and its refinement: about a third of a BERT-sized dry run) and then fit each plan on
the calibration moments, one site after the other. The partitions need nothing but the site's
scores, so a spawned worker makes them in site order, a few sites ahead of the caller; a caller
that has to wait for one meanwhile makes the last queued site's partitions itself. Each partition
is the same call with the same arguments and the same BLAS thread limit wherever it runs, so the
plans are the same as without the worker (tests/test_ahead.py compares them).

Used only where it can pay: at least :data:`MIN_ELEMENTS` weight entries among at least two
sites, and a second core. Where the worker cannot start or dies, the partitions are made here.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import multiprocessing
import os

import numpy as np

from ..blas import worker_start
from ..significance import values
from . import BALANCED
from .metis import metis_ladder
from .plan import Plan

log = logging.getLogger(__name__)

MIN_ELEMENTS = 8_000_000
"""Total weight entries of the sites below which a worker is not started (its start, about a
second, would cost more than it saves)."""
WINDOW = 3
"""Sites handed to the worker ahead of the one asked for (their scores are copied to it)."""


def partitions(partitioner: str, scores: np.ndarray, counts: tuple[int, ...], seed: int) -> dict[int, Plan]:
    """The plans of ``scores`` at each part count: what the worker runs for one site (METIS's
    graph of the scores built once for all of them). ``scores`` may be a significance.Significance:
    the worker then makes them from the weight it carries."""
    scores = values(scores)
    if partitioner == "metis":
        return metis_ladder(scores, counts, seed=seed)
    return {parts: BALANCED[partitioner](scores, parts, seed=seed) for parts in counts}


def wanted(sizes: list[int], cpus: int | None = None) -> bool:
    """Whether a worker pays for sites of these weight sizes (entries) on this machine."""
    cpus = os.cpu_count() if cpus is None else cpus
    return (cpus or 1) >= 2 and len(sizes) >= 2 and sum(sizes) >= MIN_ELEMENTS


class Ahead:
    """``take(key)``: the partitions of one site, made by the worker or here. ``jobs`` are
    (key, scores, part counts) in the order the caller will ask for them."""

    def __init__(self, jobs, partitioner: str, seed: int, threads: int = 1, window: int = WINDOW):
        self.partitioner, self.seed, self.window = partitioner, int(seed), int(window)
        self.pending = collections.deque(jobs)
        self.futures: dict = {}
        self.made_here: dict = {}
        self.pool: cf.ProcessPoolExecutor | None = None
        try:
            self.pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=worker_start, initargs=(max(1, int(threads)),))
        except (OSError, ValueError) as exc:  # no processes here: every partition is made in this one
            log.info("partitions: no worker process (%s): made here", exc)
        self._fill()

    def _fill(self) -> None:
        while self.pool is not None and self.pending and len(self.futures) < self.window:
            key, scores, counts = self.pending.popleft()
            self.futures[key] = self.pool.submit(partitions, self.partitioner, scores, tuple(counts), self.seed)

    def take(self, key) -> dict[int, Plan] | None:
        """The plans of ``key`` at its part counts, or None where the caller should make them."""
        if key in self.made_here:
            return self.made_here.pop(key)
        future = self.futures.pop(key, None)
        if future is None:  # never handed to the worker: not to be made twice
            self.pending = collections.deque(j for j in self.pending if j[0] != key)
            return None
        while not future.done() and self.pending:  # waiting: make the last queued site's here
            other, scores, counts = self.pending.pop()
            self.made_here[other] = partitions(self.partitioner, scores, tuple(counts), self.seed)
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001  (a dead worker: the partitions are made here)
            log.warning("partitions: the worker failed (%s): made here from now on", exc)
            self.close()
            return None
        self._fill()
        return result

    def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            for future in self.futures.values():
                future.cancel()
            self.futures.clear()
            pool.shutdown(wait=True, cancel_futures=True)
