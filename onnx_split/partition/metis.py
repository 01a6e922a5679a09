"""Lossy balanced partition by METIS on the bipartite graph of significant weights.

The K inputs and N outputs of ``y = x @ W`` are the K + N vertices of a bipartite graph with an
edge (i, K + j) of integer weight proportional to ``scores[i, j]`` (scaled so the largest is
10000, every edge at least 1). A ``parts``-way partition of the graph drops exactly the edges it
cuts, so METIS's minimum edge cut is the maximum retained significance.

Sparsification: a dense K x N matrix has K * N edges (16M at 4096 x 4096), too many to hand to
METIS quickly, so the graph keeps only each row's and each column's ``top`` largest entries
(union; default 32) among the positive ones. The retained significance of the result, and the
refinement that follows, always use the full ``scores``.

Balance: METIS balances the K + N vertices overall (to a few percent), not inputs and outputs
separately, so its labels are rebalanced to exact sizes on each side (the items that lose least
leave over-full parts) and then improved by :func:`balance.refine`.

METIS comes from ``pymetis``; otherwise pure numpy/scipy: no onnx import here.
"""
from __future__ import annotations

import numpy as np
import pymetis
from scipy import sparse

from .balance import check_inputs, index_labels, one_hot, plan_from_labels, rebalance, refine
from .plan import Plan

WEIGHT_SCALE = 10000


def _top_per_row(scores: np.ndarray, top: int) -> np.ndarray:
    """Column indices of each row's ``top`` largest entries (rows x top)."""
    n = scores.shape[1]
    return np.argpartition(scores, n - top, axis=1)[:, n - top:]


def top_edges(scores: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the positive entries that are among the ``top`` largest of their row or of
    their column."""
    k, n = scores.shape
    keep = np.zeros(scores.shape, dtype=bool)
    if n <= top or k <= top:
        keep[:] = True
    else:
        keep[np.arange(k)[:, None], _top_per_row(scores, top)] = True
        keep[_top_per_row(np.ascontiguousarray(scores.T), top), np.arange(n)[:, None]] = True
    keep &= scores > 0
    return np.nonzero(keep)


def bipartite_graph(scores: np.ndarray, top: int) -> sparse.csr_matrix | None:
    """Symmetric (K + N) x (K + N) CSR adjacency with integer edge weights; None without edges."""
    k, n = scores.shape
    rows, cols = top_edges(scores, top)
    if rows.size == 0:
        return None
    values = scores[rows, cols]
    weights = np.maximum(1, np.rint(values * (WEIGHT_SCALE / values.max()))).astype(np.int64)
    half = sparse.csr_matrix((weights, (rows, cols)), shape=(k, n))
    graph = sparse.bmat([[None, half], [half.T, None]], format="csr")
    graph.sort_indices()
    return graph


_UNBUILT = object()


def metis_blocks(scores: np.ndarray, parts: int, *, seed: int = 0, top: int = 32, graph=_UNBUILT) -> Plan:
    """Balanced ``parts``-way plan of ``scores`` (K x N) by METIS, rebalanced and refined.
    ``graph``: :func:`bipartite_graph` of these scores and ``top``, if already built."""
    scores, parts = check_inputs(scores, parts)
    k, n = scores.shape
    if parts == 1:
        return plan_from_labels(np.zeros(k, np.int64), np.zeros(n, np.int64), 1, "metis")
    if graph is _UNBUILT:
        graph = bipartite_graph(scores, top)
    if graph is None:  # all-zero scores: every plan retains everything
        return plan_from_labels(index_labels(k, parts), index_labels(n, parts), parts, "metis")

    adjacency = pymetis.CSRAdjacency(adj_starts=graph.indptr.astype(np.int64), adjacent=graph.indices.astype(np.int64))
    result = pymetis.part_graph(parts, adjacency, eweights=graph.data.astype(np.int64),
                                options=pymetis.Options(seed=int(seed)))
    labels = np.asarray(result[1], dtype=np.int64)
    row_part = rebalance(labels[:k], scores @ one_hot(labels[k:], parts))
    col_part = rebalance(labels[k:], (one_hot(row_part, parts).T @ scores).T)
    row_part, col_part = refine(scores, row_part, col_part, parts)
    return plan_from_labels(row_part, col_part, parts, "metis")


def metis_ladder(scores: np.ndarray, counts, *, seed: int = 0, top: int = 32) -> dict[int, Plan]:
    """:func:`metis_blocks` at each part count of ``counts``, the graph built once."""
    scores, _ = check_inputs(scores, 1)
    graph = bipartite_graph(scores, top) if any(int(c) > 1 for c in counts) else None
    return {int(c): metis_blocks(scores, int(c), seed=seed, top=top, graph=graph) for c in counts}
