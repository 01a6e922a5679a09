"""Second-moment statistics of the activations entering each site, accumulated batch by batch.

For a site ``y = x @ W + b`` the refit (refit.py) and the local error of a candidate weight need only

    H = [X, 1]^T [X, 1]            (K+1) x (K+1), over every activation row of the calibration samples

(and, for a sequential refit, the cross moment ``[X', 1]^T [X, 1]`` between the activations the
already-rewritten model produces, X', and the original's, X). Both are sums over rows, so they are
accumulated one batch at a time and the activations themselves are never held for all samples.
The feature norms of the activation-aware significance are ``sqrt(diag(H))`` of the same sums.

Each batch's product is computed in float64; the running sum the pass keeps per activation is
stored in :data:`STORED` (float32: half the bytes of the (K+1)^2 matrices, which at BERT width
outweigh the weights they serve; refit.py widens each block it reads back to float64).
"""
from __future__ import annotations

import numpy as np

from .sites import Site

STORED = np.float32
"""The dtype the calibration pass stores its moment sums in (refit.py solves in float64)."""


def rows(site: Site, value: np.ndarray) -> np.ndarray:
    """The activation entering ``site`` as [rows, K] float64 (all axes but the feature axis merged)."""
    x = np.asarray(value, dtype=np.float64)
    axis = 0 if site.trans_a else x.ndim - 1
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def _augmented(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


class Moments:
    """Running ``[X', 1]^T [X, 1]`` for one activation (``X' = X`` unless a second one is given),
    summed in ``dtype`` (each batch's product in float64). Without ``full``, only its diagonal
    and row count are summed (``sum`` is None): the feature norms, at K+1 numbers instead of (K+1)^2."""

    def __init__(self, k: int, dtype=np.float64, full: bool = True):
        self.k = k
        self.sum = np.zeros((k + 1, k + 1), dtype) if full else None
        self.diagonal = np.zeros(k + 1)  # float64 whatever ``dtype``: the norms stay exact
        self.count = 0

    def add(self, x: np.ndarray, x_new: np.ndarray | None = None) -> None:
        finite = np.isfinite(x).all(axis=1)
        if x_new is not None:
            finite &= np.isfinite(x_new).all(axis=1)
        right = _augmented(x[finite])
        left = right if x_new is None else _augmented(x_new[finite])
        if self.sum is not None:
            self.sum += left.T @ right
        self.diagonal += np.einsum("ij,ij->j", left, right)
        self.count += int(right.shape[0])

    @property
    def norms(self) -> np.ndarray:
        """||x_i||_2 per input feature over every row added (of X' for a cross moment)."""
        return np.sqrt(np.maximum(self.diagonal[:-1], 0.0))
