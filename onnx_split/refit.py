"""Refit: the kept entries of a lossy plan's weight, solved to reproduce the original layer output.

A block plan keeps, for each output column j, the weights of a set S_j of input rows (the rows of
its part) and drops the rest. Dropping alone (the masked weight) loses what the other rows
contributed. Given the calibration moments (moments.py) the best kept weights, in least squares over
every calibration row, are per part

    [w_S; b] = (H'_SS + lambda I)^-1  C_S,:  [W; b]          C = [X', 1]^T [X, 1],  H' = [X', 1]^T [X', 1]

where X is the site's activation in the original model and X' the one it receives once the sites
before it are rewritten (X' = X when the site is refitted on its own). The bias row is solved with
the weights when the site has a per-feature constant bias (so the dropped rows' mean contribution
moves into the bias); otherwise only the weights are. ``lambda`` is a fraction of the mean diagonal
of H'_SS (damping: a part may have more rows than there are calibration rows).

Everything is float64 and in the ``y = x @ W + b`` orientation of :class:`~onnx_split.sites.Site`
(alpha and beta folded in by :mod:`onnx_split.lossy`).
"""
from __future__ import annotations

import numpy as np

DAMPING = 0.001
"""lambda as a fraction of the mean diagonal of the part's H'_SS."""


def column_groups(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, columns) of every set of columns that keep the same input rows."""
    groups: dict[bytes, list[int]] = {}
    packed = np.packbits(mask, axis=0)
    for j in range(mask.shape[1]):
        groups.setdefault(packed[:, j].tobytes(), []).append(j)
    return [(np.flatnonzero(mask[:, cols[0]]), np.asarray(cols)) for cols in groups.values()]


def refit(mask: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, gram: np.ndarray,
          cross: np.ndarray | None = None, damping: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The refitted weight (zero outside ``mask``) and bias (None when ``bias`` is None).

    ``gram``: H' = [X', 1]^T [X', 1]; ``cross``: C = [X', 1]^T [X, 1] (None: X' = X, so C = H').
    """
    damping = DAMPING if damping is None else damping
    k, n = weight.shape
    full = np.vstack([weight, (np.zeros(n) if bias is None else bias)[None, :]])  # [W; b]
    target = (gram if cross is None else cross) @ full  # C [W; b]: (K+1) x N
    new_w = np.zeros((k, n))
    new_b = None if bias is None else np.array(bias, dtype=np.float64)
    for rows, cols in column_groups(mask):
        keep = np.append(rows, k) if bias is not None else rows
        if keep.size == 0:
            continue
        h = gram[np.ix_(keep, keep)].copy()
        d = np.arange(rows.size)
        h[d, d] += damping * max(float(np.mean(np.diag(h)[:rows.size])) if rows.size else 0.0, 1e-12)
        rhs = target[np.ix_(keep, cols)]
        try:
            solved = np.linalg.solve(h, rhs)
        except np.linalg.LinAlgError:
            solved = np.linalg.lstsq(h, rhs, rcond=None)[0]
        new_w[np.ix_(rows, cols)] = solved[:rows.size]
        if bias is not None:
            new_b[cols] = solved[rows.size]
    return new_w, new_b


def local_error(weight: np.ndarray, bias: np.ndarray | None, new_weight: np.ndarray,
                new_bias: np.ndarray | None, gram: np.ndarray) -> float:
    """||[X,1]([W;b] - [W';b'])|| / ||[X,1][W;b]|| over the calibration rows of ``gram`` ([X,1]^T[X,1])."""
    n = weight.shape[1]
    b = np.zeros(n) if bias is None else bias
    b2 = b if new_bias is None else new_bias
    full = np.vstack([weight, b[None, :]])
    delta = full - np.vstack([new_weight, b2[None, :]])
    num = float(np.einsum("ij,ij->", delta, gram @ delta))
    den = float(np.einsum("ij,ij->", full, gram @ full))
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return float(np.sqrt(max(num, 0.0) / den))
