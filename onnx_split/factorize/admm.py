"""Sparse least squares by ADMM with a top-k projection, and the single-matrix ADMM method.

:func:`solve` minimises ½tr(XᵀGX) − tr(XᵀT) over X [r, n] with at most ``keep`` non-zeros:

    X ← (G + ρI)⁻¹ (T + ρ(Z − U))      Z ← P(X + U)      U ← U + X − Z

with P the projection onto the ``keep`` entries largest in |x_ij|·√G_ii (a global top-k over the
matrix, each row weighted by what it can contribute, as Wanda weighs W's rows by ‖x_i‖). The mask
P chooses is recomputed during the first ``free`` steps of a call and then frozen, so the last
steps settle the values on one support. ρ is a fraction of G's mean diagonal (so it does not
depend on the scale of the activations).

The single-matrix method (:func:`admm`) runs the same schedule as DSF's factor updates on
G = H, T = HW: ``rounds`` calls of ``steps`` steps with ρ growing geometrically between calls
(the last calls pin X to its support), started from Wanda's mask, then an exact damped refit of
the kept weights on the final mask.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from .pruning import wanda
from .sparse import EPS, refit_masked, topk_mask

ROUNDS = 40
STEPS = 5
FREE_STEPS = 2
RHO = (0.01, 1.0)
"""ρ of the first and the last round, as fractions of G's mean diagonal (geometric in between)."""
REFIT_DAMPING = 1e-4


def rhos(rounds: int) -> np.ndarray:
    return np.geomspace(RHO[0], RHO[1], max(rounds, 1))


def solve(gram: np.ndarray, target: np.ndarray, start: np.ndarray, keep: int, rho: float,
          steps: int = STEPS, free: int = FREE_STEPS) -> np.ndarray:
    """Z: ``start`` improved by ``steps`` ADMM steps, exactly ``keep`` entries kept (see module)."""
    scale = rho * max(float(np.mean(np.diag(gram))), EPS)
    factor = scipy.linalg.cho_factor(gram + scale * np.eye(gram.shape[0]), lower=True)
    weight = np.sqrt(np.maximum(np.diag(gram), 0.0))[:, None]   # row i's entries matter in proportion to √G_ii
    mask = topk_mask(np.abs(start) * weight, keep)
    z = np.where(mask, start, 0.0)
    dual = np.zeros_like(z)
    for step in range(steps):
        x = scipy.linalg.cho_solve(factor, target + scale * (z - dual))
        v = x + dual
        if step < free:
            mask = topk_mask(np.abs(v) * weight, keep)
        z = np.where(mask, v, 0.0)
        dual += x - z
    return z


def admm(weight: np.ndarray, gram: np.ndarray, keep: int, rounds: int = ROUNDS) -> np.ndarray:
    target = gram @ weight
    z = wanda(weight, gram, keep)
    for rho in rhos(rounds):
        z = solve(gram, target, z, keep, float(rho))
    return refit_masked(gram, target, z != 0, REFIT_DAMPING)
