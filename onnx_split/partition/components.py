"""Exact partition: connected components of the bipartite graph of significant weights.

W[K, N] is a bipartite graph between its K inputs and N outputs with an edge wherever
``|w| > threshold``. Each connected component is an independent sub-network. Components are
then packed into at most ``max_parts`` parts balanced by multiply-accumulates.

Pure numpy/scipy: no onnx import here.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from .plan import Part, Plan


def significant_mask(weight: np.ndarray, threshold: float) -> np.ndarray:
    """K x N boolean matrix of ``|w| > threshold``; NaN and inf count as significant."""
    w = np.asarray(weight)
    if w.dtype.kind != "f":  # ml_dtypes (bfloat16) report kind 'V'
        w = w.astype(np.float32)
    return ~(np.abs(w) <= threshold)  # NaN compares False, so it stays significant


def _labels(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected-component labels of the K + N nodes of the bipartite graph of ``mask``."""
    k, n = mask.shape
    if mask.all(axis=1).any() or mask.all(axis=0).any():
        # An input that reaches every output (or an output every input reaches) joins all edges into
        # one component: the usual case of a dense weight, decided without building the graph.
        labels = np.concatenate([np.where(mask.any(axis=1), 0, 1 + np.arange(k)),
                                 np.where(mask.any(axis=0), 0, 1 + k + np.arange(n))])
        return 1 + k + n, labels
    adjacency = sparse.csr_matrix(mask)
    graph = sparse.bmat([[None, adjacency], [adjacency.T, None]], format="csr")
    return connected_components(graph, directed=False)


def exact_components(weight: np.ndarray, threshold: float = 0.0, max_parts: int = 16) -> Plan:
    """Plan the split of ``weight`` (K x N, ``y = x @ W``) into independent parts."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {weight.shape}")
    if max_parts < 1:
        raise ValueError("max_parts must be >= 1")
    k, n = weight.shape
    n_labels, labels = _labels(significant_mask(weight, threshold))
    row_labels, col_labels = labels[:k], labels[k:]

    row_count = np.bincount(row_labels, minlength=n_labels)
    col_count = np.bincount(col_labels, minlength=n_labels)
    live = np.flatnonzero((row_count > 0) & (col_count > 0))
    unused_rows = np.flatnonzero(col_count[row_labels] == 0).astype(np.int64)
    dead_cols = np.flatnonzero(row_count[col_labels] == 0).astype(np.int64)

    groups = [live[g] for g in pack(np.stack([row_count[live], col_count[live]], axis=1), max_parts)]
    parts = []
    for group in groups:
        rows = np.flatnonzero(np.isin(row_labels, group)).astype(np.int64)
        cols = np.flatnonzero(np.isin(col_labels, group)).astype(np.int64)
        parts.append(Part(rows, cols))
    parts.sort(key=lambda p: int(p.cols[0]))
    return Plan(
        k=k,
        n=n,
        parts=tuple(parts),
        unused_rows=unused_rows,
        dead_cols=dead_cols,
        n_components=int(live.size),
        method="components",
        threshold=float(threshold),
    )


def pack(counts: np.ndarray, max_parts: int) -> list[np.ndarray]:
    """Greedy largest-first packing of components into at most ``max_parts`` bins.

    ``counts[c, l]`` is how many units of level ``l`` component ``c`` has (one layer: inputs and
    outputs; a chain of layers: one level per layer boundary). A bin is computed as one dense block
    per layer, so its cost is the sum over layers of (units in) x (units out); each component goes
    to the bin whose cost stays smallest, which balances the bins and keeps merging waste low.
    Returns the component indices of each non-empty bin.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape[0] == 0:
        return []
    own = (counts[:, :-1] * counts[:, 1:]).sum(axis=1)
    order = sorted(range(counts.shape[0]), key=lambda c: (-int(own[c]), c))
    n_bins = min(max_parts, len(order))
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    size = np.zeros((n_bins, counts.shape[1]), dtype=np.int64)
    for comp in order:
        merged = size + counts[comp]
        cost = (merged[:, :-1] * merged[:, 1:]).sum(axis=1)
        best = int(np.argmin(cost))
        bins[best].append(comp)
        size[best] = merged[best]
    return [np.asarray(b, dtype=np.int64) for b in bins if b]
