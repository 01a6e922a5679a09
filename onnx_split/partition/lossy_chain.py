"""Joint balanced partition of a chain of lossy-split layers: G sub-networks through every layer.

Layers ``S_1 [U_0, U_1]``, ``S_2 [U_1, U_2]``, ... (significance scores) connect units of
consecutive levels. A balanced G-way partition of every level's units, the same parts at every
level, keeps the scores inside the parts' blocks of every layer and drops the rest; part i of
layer l then feeds only part i of layer l+1, so the rewrite needs no Gather between the layers.

METIS partitions the layered graph (each layer's rows' and columns' ``top`` largest scores as
edges, as in metis.py); each level is then made exactly balanced and improved in turn, a level's
gain for part p being what its units would keep in the blocks of part p of the layers on both
sides of it (:func:`balance.assign`, exact for the level given its neighbours).

Pure numpy/scipy: no onnx import here.
"""
from __future__ import annotations

import numpy as np
import pymetis
from scipy import sparse

from .balance import assign, capacities, one_hot, rebalance
from .chain import ChainPart, ChainPlan
from .metis import WEIGHT_SCALE, top_edges


def _gain(scores: list[np.ndarray], labels: list[np.ndarray], level: int, parts: int) -> np.ndarray:
    """units of ``level`` x parts: the scores each unit keeps in part p's blocks of both adjacent layers."""
    gain = np.zeros((scores[0].shape[0] if level == 0 else scores[level - 1].shape[1], parts))
    if level > 0:
        gain += (one_hot(labels[level - 1], parts).T @ scores[level - 1]).T
    if level < len(scores):
        gain += scores[level] @ one_hot(labels[level + 1], parts)
    return gain


def kept(scores: list[np.ndarray], labels: list[np.ndarray], parts: int) -> float:
    """The fraction of all layers' scores inside the parts' blocks."""
    total = sum(float(s.sum()) for s in scores)
    inside = sum(float((one_hot(labels[layer], parts).T @ s @ one_hot(labels[layer + 1], parts)).trace())
                 for layer, s in enumerate(scores))
    return 1.0 if total == 0 else inside / total


def joint_balanced(scores: list[np.ndarray], parts: int, *, seed: int = 0, top: int = 32,
                   rounds: int = 8) -> ChainPlan:
    """A balanced ``parts``-way partition of every level of the chain ``scores`` (float, >= 0)."""
    scores = [np.asarray(s, dtype=np.float64) for s in scores]
    sizes = [scores[0].shape[0]] + [s.shape[1] for s in scores]
    for layer, s in enumerate(scores):
        if s.shape[0] != sizes[layer]:
            raise ValueError(f"layer {layer} has {s.shape[0]} inputs, the layer before has {sizes[layer]} outputs")
    parts = max(1, min([parts, *sizes]))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    peak = max((float(s.max()) for s in scores if s.size), default=0.0)
    rows, cols, weights = [], [], []
    for layer, s in enumerate(scores):
        r, c = top_edges(s, top)
        if r.size and peak > 0:
            rows.append(r + offsets[layer])
            cols.append(c + offsets[layer + 1])
            weights.append(np.maximum(1, np.rint(s[r, c] * (WEIGHT_SCALE / peak))).astype(np.int64))
    total = int(offsets[-1])
    if parts > 1 and rows:
        r, c, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
        half = sparse.csr_matrix((w, (r, c)), shape=(total, total))
        graph = (half + half.T).tocsr()
        graph.sort_indices()
        adjacency = pymetis.CSRAdjacency(adj_starts=graph.indptr.astype(np.int64),
                                         adjacent=graph.indices.astype(np.int64))
        found = np.asarray(pymetis.part_graph(parts, adjacency, eweights=graph.data.astype(np.int64),
                                              options=pymetis.Options(seed=int(seed)))[1], dtype=np.int64)
        labels = [found[offsets[i]:offsets[i + 1]].copy() for i in range(len(sizes))]
    else:
        labels = [np.repeat(np.arange(parts), capacities(n, parts)) for n in sizes]
    for level in range(len(sizes)):  # exact sizes first, each level given its neighbours
        labels[level] = rebalance(labels[level], _gain(scores, labels, level, parts))
    best = kept(scores, labels, parts)
    for _ in range(rounds):
        for level in range(len(sizes)):
            labels[level] = assign(_gain(scores, labels, level, parts), start=labels[level])
        value = kept(scores, labels, parts)
        if value < best * (1 + 1e-3):
            break
        best = value
    chain_parts = tuple(ChainPart(tuple(np.flatnonzero(lab == p).astype(np.int64) for lab in labels))
                        for p in range(parts))
    chain_parts = tuple(p for p in chain_parts if all(level.size for level in p.levels))
    return ChainPlan(tuple(int(s) for s in sizes), chain_parts, len(chain_parts), 0.0, "joint metis")
