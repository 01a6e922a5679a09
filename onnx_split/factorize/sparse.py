"""What every factorization method shares: exact top-k masks, exact budget shares, the masked
least-squares refit, and the layer error ``||X(W - W')|| / ||XW||`` read off moments.

Everything is float64 in the ``y = x @ W`` orientation, W [K, N], with ``gram`` = XᵀX [K, K] (the
bias is not touched: a fixed bias drops out of the difference).
"""
from __future__ import annotations

import numpy as np

from ..refit import column_groups

EPS = 1e-12


def topk_mask(scores: np.ndarray, keep: int) -> np.ndarray:
    """A boolean mask of the ``keep`` largest ``scores`` (exactly ``keep``; ties: argpartition's)."""
    flat = np.asarray(scores).ravel()
    keep = int(min(max(keep, 0), flat.size))
    mask = np.zeros(flat.size, dtype=bool)
    if keep:
        mask[np.argpartition(-flat, keep - 1)[:keep]] = True
    return mask.reshape(np.shape(scores))


def shares(total: int, sizes) -> np.ndarray:
    """``total`` split over groups in proportion to ``sizes``, each at most its size, summing to
    ``total`` exactly (largest remainders get the rounding)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(max(total, 0), sizes.sum()))
    exact = total * sizes / max(int(sizes.sum()), 1)
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:total - int(counts.sum())]] += 1
    return np.minimum(counts, sizes)


def refit_masked(gram: np.ndarray, target: np.ndarray, mask: np.ndarray, damping: float) -> np.ndarray:
    """argmin over X supported on ``mask`` of ½tr(XᵀGX) − tr(XᵀT), column by column (columns keeping
    the same rows solved together), G damped by ``damping`` × the mean diagonal of each G_SS."""
    new = np.zeros(target.shape)
    for rows, cols in column_groups(mask):
        if rows.size == 0:
            continue
        g = gram[np.ix_(rows, rows)].copy()
        g[np.diag_indices(rows.size)] += damping * max(float(np.mean(np.diag(g))), EPS)
        try:
            new[np.ix_(rows, cols)] = np.linalg.solve(g, target[np.ix_(rows, cols)])
        except np.linalg.LinAlgError:
            new[np.ix_(rows, cols)] = np.linalg.lstsq(g, target[np.ix_(rows, cols)], rcond=None)[0]
    return new


def layer_error(weight: np.ndarray, approx: np.ndarray, gram: np.ndarray, cross: np.ndarray | None = None,
                original: np.ndarray | None = None) -> float:
    """||X'W' − XW||_F / ||XW||_F from moments: ``gram`` = X'ᵀX', ``cross`` = X'ᵀX and
    ``original`` = XᵀX (both None: X' = X, the error ||X(W − W')|| / ||XW||); 0 when XW is 0 and
    so is the difference."""
    w, new = np.asarray(weight, np.float64), np.asarray(approx, np.float64)
    h = gram if original is None else original
    den = float(np.einsum("ij,ij->", w, h @ w))
    if cross is None:
        diff = w - new
        num = float(np.einsum("ij,ij->", diff, gram @ diff))
    else:
        num = den + float(np.einsum("ij,ij->", new, gram @ new)) - 2 * float(np.einsum("ij,ij->", new, cross @ w))
    if den <= 0:
        return 0.0 if num <= EPS else float("inf")
    return float(np.sqrt(max(num, 0.0) / den))
