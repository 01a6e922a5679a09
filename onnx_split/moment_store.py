"""The calibration moments of the lossy pass's candidate sites, held a group of sites at a time.

Each candidate's refits read the (K+1)^2 moments of its activation over each half of the search
samples (moments.py). Together they outweigh the weights they serve (float32, two halves: 3.2x the
weights of a BERT-sized encoder), and holding every site's at once made most of the pass's peak
memory. The store holds at most :func:`budget` bytes of them: when a fit asks for a site's moments
and they are not held, one streamed pass over the search samples collects them together with
those of the sites that follow it in the order the fits go (as many as the budget takes), and the
ones held before are let go. ORT computes only what the requested outputs need, so a group's pass
runs the model only as deep as its activations.

The first pass collects every site's diagonal and row count (the feature norms of the activation
score), which are kept, and the first group's moments. A site's sums are the same whichever pass
collects them: the same batches, in the same order, summed the same way.
"""
from __future__ import annotations

import logging

import numpy as np

from .moments import STORED, Moments, rows
from .pruned import Evaluator
from .sites import Site

log = logging.getLogger(__name__)

MOMENT_SHARE = 0.5
"""The moments held at once: at most this fraction of the candidate sites' weight bytes..."""
MIN_MOMENT_BYTES = 64 * 2**20
"""...or this many bytes, whichever is more (small models hold all of theirs in one group)."""

Key = tuple[str, bool]
"""(activation name, trans_a): the sites reading one activation the same way share its moments."""


def budget(sites: list[Site], indices: list[int]) -> int:
    """The bytes of moments a store of ``indices`` holds at once (:data:`MOMENT_SHARE`)."""
    weights = sum(int(sites[i].weight.nbytes) for i in indices)
    return max(MIN_MOMENT_BYTES, int(MOMENT_SHARE * weights))


class Norms:
    """One activation's feature norms and row count over all the folds (the moments' diagonals)."""

    def __init__(self, parts: list[Moments]):
        self.k = parts[0].k
        self.count = sum(p.count for p in parts)
        self._diagonal = sum(p.diagonal[:-1] for p in parts)

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(np.maximum(self._diagonal, 0.0))


class MomentStore:
    """The moments of the activations entering ``indices``' main-graph sites (``keyed``: the site
    each key's rows are read as), per fold of ``folds`` (lists of calibration batches), at most
    ``limit`` bytes of them held at once."""

    def __init__(self, evaluator: Evaluator, keyed: dict[Key, Site], folds: list[list[dict]], limit: int,
                 progress=None):
        self.evaluator, self.keyed, self.folds, self.limit = evaluator, keyed, folds, limit
        self.order = list(keyed)
        self.passes = 0
        self._sums: list[dict[Key, np.ndarray]] = [{} for _ in folds]
        self._norms: dict[Key, Norms] = {}
        self._collect(self._group(0), every_diagonal=True, progress=progress)

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def norms(self, key: Key) -> Norms | None:
        """The activation's norms and row count (kept for every key), or None where not captured."""
        return self._norms.get(key)

    def sums(self, key: Key) -> list[np.ndarray]:
        """Per fold, the activation's [X, 1]^T [X, 1] (float32), collected with the keys after it
        if they are not held (and the others let go)."""
        if key not in self._sums[0]:
            self._collect(self._group(self.order.index(key)))
        return [held[key] for held in self._sums]

    def held_bytes(self) -> int:
        return sum(v.nbytes for held in self._sums for v in held.values())

    def release(self) -> None:
        """Let go of every sum held (the norms stay)."""
        for held in self._sums:
            held.clear()

    def _bytes(self, key: Key) -> int:
        k = self.keyed[key].weight.shape[0] + 1
        return k * k * np.dtype(STORED).itemsize * len(self.folds)

    def _group(self, start: int) -> list[Key]:
        """The key at ``start`` and those after it that fit the budget with it."""
        group, size = [], 0
        for key in self.order[start:]:
            more = self._bytes(key)
            if group and size + more > self.limit:
                break
            group.append(key)
            size += more
        return group

    def _collect(self, group: list[Key], every_diagonal: bool = False, progress=None) -> None:
        """One streamed pass over every fold: the moments of ``group`` (and, ``every_diagonal``,
        every key's diagonal and count), the sums held before let go first."""
        self.release()
        self.passes += 1
        wanted = self.order if every_diagonal else group
        full = set(group)
        names = list(dict.fromkeys(key[0] for key in wanted))
        total, done = sum(len(b) for b in self.folds), 0
        found: list[dict[Key, Moments]] = []
        for batches in self.folds:
            here: dict[Key, Moments] = {}
            for batch in batches:
                if progress is not None:
                    progress(done, total)
                done += 1
                values = self.evaluator.activations(batch, {}, {}, names)
                for key in wanted:
                    x = rows(self.keyed[key], values[key[0]])
                    if key not in here:
                        here[key] = Moments(x.shape[1], STORED, full=key in full)
                    here[key].add(x)
            found.append(here)
        if progress is not None:
            progress(total, total)
        for held, here in zip(self._sums, found):
            held.update({key: m.sum for key, m in here.items() if m.sum is not None})
        if every_diagonal:
            self._norms = {key: Norms([f[key] for f in found]) for key in found[0]} if found else {}
        log.info("calibration moments of %d activation(s) collected (pass %d, %.0f MB held)", len(group),
                 self.passes, self.held_bytes() / 2**20)
