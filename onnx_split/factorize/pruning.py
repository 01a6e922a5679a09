"""One sparse matrix in place of W, without iterating: magnitude, Wanda, and a SparseGPT-style
reconstruction. Each returns W' [K, N] with exactly ``keep`` non-zeros (fewer only where a kept
weight is itself 0).

- magnitude: the ``keep`` largest |w_ij| of the layer.
- Wanda: |w_ij|·‖x_i‖ (‖x_i‖ = √H_ii), the largest per output column, the budget shared equally
  between the columns (as Wanda compares weights per output).
- SparseGPT-style: the inputs taken in order, in blocks of ``block`` rows; in each block the
  entries of least saliency w²/[U]_ii² are dropped (the block's share of the budget, chosen over
  the whole block), and each dropped weight's error is moved onto the inputs not yet visited
  through the upper Cholesky factor U of the damped inverse Hessian (H⁻¹ = UᵀU): optimal brain
  surgeon, one input at a time.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from .sparse import EPS, shares, topk_mask

SPARSEGPT_DAMPING = 0.01
"""λ added to H's diagonal, as a fraction of its mean, before inverting."""
SPARSEGPT_BLOCK = 128


def magnitude(weight: np.ndarray, gram: np.ndarray, keep: int) -> np.ndarray:
    return np.where(topk_mask(np.abs(weight), keep), weight, 0.0)


def wanda(weight: np.ndarray, gram: np.ndarray, keep: int) -> np.ndarray:
    k, n = weight.shape
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    scores = np.abs(weight) * norms[:, None]
    counts = shares(keep, np.full(n, k))
    mask = np.zeros_like(weight, dtype=bool)
    for j in range(n):
        mask[:, j] = topk_mask(scores[:, j], int(counts[j]))
    return np.where(mask, weight, 0.0)


def inverse_factor(gram: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """(U with (H + λI)⁻¹ = UᵀU upper triangular, the inputs that never fire): a dead input's
    diagonal is set to 1 so that H stays invertible (its weights are dropped first anyway)."""
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damping * max(float(np.mean(np.diag(h))), EPS)
    inverse = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h, lower=True), np.eye(h.shape[0]))
    return scipy.linalg.cholesky(inverse, lower=False), dead


def sparsegpt(weight: np.ndarray, gram: np.ndarray, keep: int, block: int = SPARSEGPT_BLOCK,
              damping: float = SPARSEGPT_DAMPING) -> np.ndarray:
    k, n = weight.shape
    u, dead = inverse_factor(gram, damping)
    w = np.array(weight, dtype=np.float64)
    w[dead] = 0.0
    starts = list(range(0, k, block))
    counts = shares(keep, [min(block, k - s) * n for s in starts])
    for start, count in zip(starts, counts):
        end = min(start + block, k)
        diag = np.diag(u)[start:end]
        kept = topk_mask(np.where(dead[start:end, None], -1.0, w[start:end] ** 2 / diag[:, None] ** 2), int(count))
        errors = np.zeros((end - start, n))
        for r in range(end - start):
            i = start + r
            errors[r] = np.where(kept[r], 0.0, w[i]) / u[i, i]
            w[i:end] -= np.outer(u[i, i:end], errors[r])   # row i becomes its kept entries exactly
        w[end:] -= u[start:end, end:].T @ errors
        w[start:end] = np.where(kept, w[start:end], 0.0)    # exact zeros (rounding left ~1e-17)
    return w
