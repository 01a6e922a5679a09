"""Factorization of one weight from its calibration moments: W [K, N] ≈ W' with a budget of
non-zeros, by one of :data:`METHODS`.

- ``dsf``: W ≈ A·B, both sparse, the non-zeros counted over both (dsf.py);
- ``magnitude``, ``wanda``, ``sparsegpt`` (pruning.py) and ``admm`` (admm.py): one sparse matrix;
- ``blocks`` (W ≈ B₁·Π·B₂, block-diagonal factors) and ``lowrank`` (W ≈ U·V): the structured
  factorizations of structured.py, which run as two smaller MatMuls (:func:`fit_structured`).

``fit(method, weight, gram, density)`` returns a :class:`Fitted` whose ``factors`` multiply to the
approximation; ``density`` is the fraction of W's K·N entries kept (all factors together), and 1
returns W itself. ``gram`` is XᵀX [K, K] of the calibration activations (``Moments.sum`` without
its bias row and column). Numpy and scipy only: no onnx here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from . import admm, dsf, pruning
from .structured import STRUCTURED, Structured, blocks, lowrank
from .structured import refusal as structured_refusal
from .sparse import layer_error

METHODS = {
    "dsf": dsf.dsf,
    "magnitude": pruning.magnitude,
    "wanda": pruning.wanda,
    "sparsegpt": pruning.sparsegpt,
    "admm": admm.admm,
}
"""The sparse ``--factorize`` choices -> (weight, gram, keep) -> the factors (one array, or a pair)."""

CHOICES = (*METHODS, *STRUCTURED)
"""Every ``--factorize`` choice: the sparse methods (written compressed), then the structured ones."""
DEFAULT_BLOCKS = 4
"""``--factorize blocks``: the blocks of each factor unless ``--blocks`` says otherwise."""


@dataclass(frozen=True, eq=False)
class Fitted:
    method: str
    density: float
    factors: tuple[np.ndarray, ...]
    """float64 factors whose product approximates W (x @ W orientation)."""
    budget: int
    """The non-zeros allowed (``keep``)."""

    @property
    def weight(self) -> np.ndarray:
        return reduce(np.matmul, self.factors)

    @property
    def nonzeros(self) -> int:
        return int(sum(np.count_nonzero(f) for f in self.factors))

    def error(self, weight: np.ndarray, gram: np.ndarray) -> float:
        """||X(W − W')|| / ||XW|| on the samples of ``gram``."""
        return layer_error(weight, self.weight, gram)


def keep_count(shape: tuple[int, int], density: float) -> int:
    return int(min(shape[0] * shape[1], math.floor(density * shape[0] * shape[1] + 1e-9)))


def fit(method: str, weight: np.ndarray, gram: np.ndarray, density: float) -> Fitted:
    """``weight`` approximated by ``method`` with ``density`` of its entries as non-zeros."""
    if method not in METHODS:
        raise ValueError(f"unknown factorization {method!r} (choose from {', '.join(METHODS)})")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"the density must be in (0, 1], not {density:g}")
    w = np.asarray(weight, dtype=np.float64)
    keep = keep_count(w.shape, density)
    if keep >= w.size:
        return Fitted(method, density, (w.copy(),), keep)
    found = METHODS[method](w, np.asarray(gram, dtype=np.float64), keep)
    return Fitted(method, density, found if isinstance(found, tuple) else (found,), keep)


def fit_structured(method: str, weight: np.ndarray, gram: np.ndarray, density: float,
                   groups: int = DEFAULT_BLOCKS) -> Structured:
    """``weight`` as B₁·Π·B₂ with ``groups`` blocks (``blocks``) or U·V (``lowrank``), with
    ``density`` × K·N parameters; ValueError says why a weight cannot be (see blocks.refusal)."""
    if method not in STRUCTURED:
        raise ValueError(f"unknown structured factorization {method!r} (choose from {', '.join(STRUCTURED)})")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"the density must be in (0, 1], not {density:g}")
    w, h = np.asarray(weight, dtype=np.float64), np.asarray(gram, dtype=np.float64)
    why = structured_refusal(w.shape, density, groups if method == "blocks" else 1)
    if why is not None:
        raise ValueError(why)
    return blocks(w, h, density, groups) if method == "blocks" else lowrank(w, h, density)


__all__ = ["CHOICES", "DEFAULT_BLOCKS", "Fitted", "METHODS", "STRUCTURED", "Structured", "fit", "fit_structured",
           "keep_count", "layer_error", "structured_refusal"]
