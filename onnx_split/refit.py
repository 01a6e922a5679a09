"""Refit: the kept entries of a lossy plan's weight, solved to reproduce the original layer output.

A block plan keeps, for each output column j, the weights of a set S_j of input rows (the rows of
its part) and drops the rest. Dropping alone (the masked weight) loses what the other rows
contributed. Given calibration moments (moments.py), the best kept weights in least squares over
the calibration rows are, per group of columns that keep the same rows,

    [w_S; b] = (H'_SS + lambda I)^-1 (C [W; b])_S          C = [X', 1]^T [X, 1],  H' = [X', 1]^T [X', 1]

where X is the site's activation in the original model and X' the one it receives once the sites
before it are rewritten (X' = X, so C = H', when the site is refitted on its own). The bias row is
solved with the weights when the site has a per-feature constant bias (so the dropped rows' mean
contribution moves into the bias); otherwise the bias stays. ``lambda`` is a fraction of the mean
diagonal of H'_SS (ridge damping: a part may have as many rows as there are calibration rows).

:class:`Problem` holds what one weight's fits share (C [W; b] is a (K+1) x N product, computed
once), so trying several plans and dampings costs only the per-group solves; its :meth:`error`
reads the output error of any block-structured weight off moments of samples it was not fitted on.
:meth:`Problem.combined` is the problem of two sets of rows together, its moments summed only where
a solve reads them (no third (K+1)^2 matrix). The moments may be stored in float32 (moments.py);
every product and solve here is float64, in the ``y = x @ W + b`` orientation (alpha and beta
folded in by the caller).
"""
from __future__ import annotations

import numpy as np

DAMPING = 0.001
"""lambda as a fraction of the mean diagonal of the group's H'_SS, when no held-out moments choose it."""
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)
"""The dampings cross-validation chooses from (fitted on one half of the samples, measured on the other)."""


def column_groups(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, columns) of every set of columns that keep the same input rows."""
    groups: dict[bytes, list[int]] = {}
    packed = np.packbits(mask, axis=0)
    for j in range(mask.shape[1]):
        groups.setdefault(packed[:, j].tobytes(), []).append(j)
    return [(np.flatnonzero(mask[:, cols[0]]), np.asarray(cols)) for cols in groups.values()]


ROWS_AT_ONCE = 512
"""Rows of a float32 moment matrix widened to float64 at a time (a (K+1)^2 float64 copy is never made)."""


def _times(parts: tuple[np.ndarray, ...], old: np.ndarray) -> np.ndarray:
    """(sum of ``parts``) @ ``old`` in float64, a block of rows at a time."""
    out = np.zeros((parts[0].shape[0], old.shape[1]))
    for part in parts:
        for start in range(0, part.shape[0], ROWS_AT_ONCE):
            out[start:start + ROWS_AT_ONCE] += np.asarray(part[start:start + ROWS_AT_ONCE], np.float64) @ old
    return out


def solve_system(h: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """h^-1 rhs: numpy's LU (LAPACK posv through scipy measured no faster inside a fit, where its
    calls alternate with numpy's products on the other OpenBLAS copy), least squares where h is
    singular."""
    try:
        return np.linalg.solve(h, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(h, rhs, rcond=None)[0]


class Problem:
    """One weight [W; b] and the moments of one set of calibration rows."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, gram: np.ndarray,
                 cross: np.ndarray | None = None, original: np.ndarray | None = None):
        """``gram`` = [X',1]^T[X',1]; ``cross`` = [X',1]^T[X,1] and ``original`` = [X,1]^T[X,1]
        (None: X' = X). float64 or float32; only ``gram`` is kept (``cross`` and ``original`` are
        read once, into C [W; b] and the reference output's squared norm)."""
        k, n = weight.shape
        self.k, self.solve_bias = k, bias is not None
        self.old = np.vstack([weight, (np.zeros(n) if bias is None else bias)[None, :]])
        self.grams = (gram,)
        self.target = _times((gram if cross is None else cross,), self.old)  # C [W; b]
        reference = self.target if cross is None else _times((gram if original is None else original,), self.old)
        self.den = float(np.einsum("ij,ij->", self.old, reference))

    @classmethod
    def combined(cls, problems: list["Problem"]) -> "Problem":
        """The problem of all of ``problems``' rows together (the same weight): their products and
        norms added, their moments kept apart and summed per block a solve reads."""
        first = problems[0]
        both = cls.__new__(cls)
        both.k, both.solve_bias, both.old = first.k, first.solve_bias, first.old
        both.grams = tuple(g for p in problems for g in p.grams)
        both.target = sum((p.target for p in problems[1:]), first.target.copy())
        both.den = sum(p.den for p in problems)
        return both

    def _gram(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The float64 block (rows, cols) of the summed moments [X',1]^T[X',1]."""
        block = np.asarray(self.grams[0][np.ix_(rows, cols)], np.float64)
        for g in self.grams[1:]:
            block += g[np.ix_(rows, cols)]
        return block

    def blocks(self, groups) -> list[np.ndarray]:
        """Per group, the float64 block (rows + bias row)^2 of the summed moments: read once and
        passed to :meth:`solve` and :meth:`error`, so trying several dampings and measuring their
        fits gathers each block once."""
        return [self._gram(np.append(rows, self.k), np.append(rows, self.k)) for rows, _ in groups]

    def solve(self, groups, damping: float, blocks: list[np.ndarray] | None = None) -> np.ndarray:
        """[W'; b'] (K+1) x N: zero outside each group's rows; b' solved or the original b.
        ``blocks``: this problem's :meth:`blocks` of ``groups``, if already read."""
        new = np.zeros_like(self.old)
        new[self.k] = self.old[self.k]
        blocks = self.blocks(groups) if blocks is None else blocks
        for (rows, cols), full in zip(groups, blocks):
            keep = np.append(rows, self.k) if self.solve_bias else rows
            if keep.size == 0:
                continue
            h = full.copy() if self.solve_bias else full[:-1, :-1].copy()
            d = np.arange(rows.size)
            if rows.size:
                h[d, d] += damping * max(float(np.mean(np.diag(h)[:rows.size])), 1e-12)
            rhs = self.target[np.ix_(keep, cols)]
            if not self.solve_bias:  # the fixed bias row's contribution moves to the right-hand side
                rhs = rhs - full[:-1, -1:] * self.old[self.k, cols][None, :]
            new[np.ix_(keep, cols)] = solve_system(h, rhs)
        return new

    def error(self, groups, new: np.ndarray, blocks: list[np.ndarray] | None = None) -> float:
        """||[X',1] new - [X,1][W; b]|| / ||[X,1][W; b]|| on this problem's rows, for a ``new`` that
        is zero outside each group's rows (and the bias row). ``blocks`` as for :meth:`solve`."""
        num = self.den
        blocks = self.blocks(groups) if blocks is None else blocks
        for (rows, cols), full in zip(groups, blocks):
            keep = np.append(rows, self.k)
            block = new[np.ix_(keep, cols)]
            num += float(np.einsum("ij,ij->", block, full @ block))
            num -= 2 * float(np.einsum("ij,ij->", block, self.target[np.ix_(keep, cols)]))
        if self.den <= 0:
            return 0.0 if num <= 1e-300 else float("inf")
        return float(np.sqrt(max(num, 0.0) / self.den))

    def masked(self, mask: np.ndarray) -> np.ndarray:
        new = np.where(np.vstack([mask, np.ones((1, mask.shape[1]), bool)]), self.old, 0.0)
        return new
