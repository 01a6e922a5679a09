"""Double Sparse Factorization: W ≈ A·B with both factors sparse, ``keep`` non-zeros in all.

The recipe (after Boža & Macko, "Two Sparse Matrices are Better than One", 2024), for W [K, N]
and H = XᵀX:

1. D = diag(√H_ii) scales W's rows, M = D·W, so that ‖M − AB‖_F approximates the layer error
   ‖X(W − D⁻¹AB)‖ with H's diagonal only.
2. r = min(K, N). The square factor, on the smaller side, starts as the identity (A = I_K when
   K ≤ N, else B = I_N); the other is M magnitude-pruned to its share of the budget.
3. ``rounds`` rounds: B, then A, each improved by ``STEPS`` ADMM steps of admm.solve on
   ‖M − AB‖² with the other fixed (a global top-k per factor, masks frozen after two steps,
   ρ growing over the rounds).
4. A ← D⁻¹A, and B refitted on its mask against the full ‖X(W − AB)‖² (column by column).

The budget is split between the factors by trying ``splits`` (the fraction of ``keep`` given to
the square factor) and keeping the one of least error on the calibration moments.
"""
from __future__ import annotations

import numpy as np

from .admm import REFIT_DAMPING, ROUNDS, rhos, solve
from .sparse import EPS, layer_error, refit_masked, topk_mask

SPLITS = (0.15, 0.3, 0.45)
"""Candidate fractions of the non-zeros given to the square factor."""


def dsf(weight: np.ndarray, gram: np.ndarray, keep: int, rounds: int = ROUNDS,
        splits=SPLITS) -> tuple[np.ndarray, np.ndarray]:
    """(A [K, r], B [r, N]) of least calibration error over ``splits``."""
    best = None
    for split in splits:
        a, b = factor_pair(weight, gram, keep, split, rounds)
        err = layer_error(weight, a @ b, gram)
        if best is None or err < best[0]:
            best = (err, a, b)
    return best[1], best[2]


def budget(shape: tuple[int, int], keep: int, split: float) -> tuple[int, int]:
    """(non-zeros of A, of B) for a square factor's share ``split`` of ``keep``: the square factor
    at least its diagonal's r entries and the other at least r where the budget allows, never more
    than ``keep`` in all."""
    k, n = shape
    r = min(k, n)
    square = max(min(max(int(round(split * keep)), r), r * r, keep - r), 0)
    rest = keep - square
    return (square, rest) if k <= n else (rest, square)


def factor_pair(weight: np.ndarray, gram: np.ndarray, keep: int, split: float,
                rounds: int = ROUNDS) -> tuple[np.ndarray, np.ndarray]:
    k, n = weight.shape
    r = min(k, n)
    d = np.sqrt(np.maximum(np.diag(gram), 0.0))
    d = np.where(d > EPS, d, max(float(d.max(initial=0.0)), 1.0) * 1e-6)
    m = d[:, None] * weight
    keep_a, keep_b = budget(weight.shape, keep, split)
    if k <= n:
        a, b = np.eye(r), np.where(topk_mask(np.abs(m), keep_b), m, 0.0)
    else:
        a, b = np.where(topk_mask(np.abs(m), keep_a), m, 0.0), np.eye(r)
    for rho in rhos(rounds):
        b = solve(a.T @ a, a.T @ m, b, keep_b, float(rho))
        a = solve(b @ b.T, b @ m.T, a.T, keep_a, float(rho)).T
    a = a / d[:, None]
    ha = gram @ a
    b = refit_masked(a.T @ ha, ha.T @ weight, b != 0, REFIT_DAMPING)
    return a, b
