"""Significance of each weight: how much the model's outputs depend on the connection it makes.

Two scores, both K x N for a weight used as ``y = x @ W``:

- ``magnitude``: |w_ij|. Needs no data, but treats every input feature as equally loud.
- ``activation``: |w_ij| * ||x_i||_2, with ||x_i|| the norm of input feature i of that very node
  over the calibration samples (all axes but the feature axis). A large weight on a feature that is
  always near zero moves the output little; this score sees that. The feature norms are the root
  of the diagonal of the calibration moments (moments.py), summed batch by batch.

Scores are float64 and finite: a NaN or infinite weight is the most significant one there is, so it
is scored above every finite weight and is never dropped by choice.
"""
from __future__ import annotations

import logging

import numpy as np

from .sites import Site

log = logging.getLogger(__name__)


def magnitude(weight: np.ndarray) -> np.ndarray:
    w = np.abs(np.asarray(weight).astype(np.float64))
    bad = ~np.isfinite(w)
    if bad.any():
        w[bad] = 2 * float(w[~bad].max(initial=0.0)) + 1.0
    return w


def activation_aware(weight: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """|w_ij| * ||x_i||; ``norms`` has one entry per input feature (row of W)."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.shape != (weight.shape[0],):
        raise ValueError(f"norms must have shape ({weight.shape[0]},), got {norms.shape}")
    return magnitude(weight) * norms[:, None]


class Significance:
    """One weight's K x N scores (:func:`magnitude`, or :func:`activation_aware` with ``norms``),
    made each time they are read (:meth:`values`). Float64 scores are twice the bytes of a float32
    weight: kept for every site of a model at once, they were twice the model's weights in memory.
    Pickled, it carries the weight and the norms, not the scores."""

    def __init__(self, weight: np.ndarray, norms: np.ndarray | None = None):
        self.weight, self.norms = weight, norms
        self.shape, self.size = tuple(weight.shape), int(weight.size)

    def values(self) -> np.ndarray:
        return magnitude(self.weight) if self.norms is None else activation_aware(self.weight, self.norms)


def values(scores: "Significance | np.ndarray") -> np.ndarray:
    """The K x N array of ``scores`` (a :class:`Significance`, or the array itself)."""
    return scores.values() if isinstance(scores, Significance) else scores


def site_scores(sites: list[Site], indices: list[int], score: str, norms: dict[int, np.ndarray]
                ) -> tuple[dict[int, Significance], dict[int, str]]:
    """{site index: its K x N scores, made when read} and {site index: the score actually used}
    for ``indices``."""
    scores, used = {}, {}
    for i in indices:
        weight = sites[i].weight
        if score == "activation" and i in norms:
            scores[i], used[i] = Significance(weight, np.asarray(norms[i], np.float64)), "activation"
        else:
            scores[i], used[i] = Significance(weight), "magnitude"
            if score == "activation":
                log.info("%s: scored by magnitude (activations inside subgraphs are not captured)", sites[i].name)
    return scores, used
