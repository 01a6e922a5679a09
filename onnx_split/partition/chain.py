"""Joint partition of a chain of layers: one set of sub-networks that runs through every layer.

Layers ``W_1 [U_0, U_1]``, ``W_2 [U_1, U_2]``, ... connect units of consecutive levels (level 0 is
the first layer's inputs, level l its l-th layer's outputs). With an edge wherever ``|w| >
threshold``, the connected components of the whole layered graph are sub-networks that never meet:
part i of layer l feeds only part i of layer l+1. Taking components of all layers at once is what
chooses the row permutation of one layer and the column permutation of the layer before it
jointly, so that the two line up.

Units that reach no output of the last layer are dropped (their work is never seen); outputs of
the last layer that no input feeds are given to one part as zero columns (their value is the bias).

Pure numpy/scipy: no onnx import here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from .components import pack, significant_mask
from .plan import Part, Plan


@dataclass(frozen=True)
class ChainPart:
    """One sub-network through every layer: ``levels[l]`` are its units of level l (sorted)."""

    levels: tuple[np.ndarray, ...]

    def layer_shape(self, layer: int) -> tuple[int, int]:
        return int(self.levels[layer].size), int(self.levels[layer + 1].size)

    @property
    def macs(self) -> int:
        return sum(a.size * b.size for a, b in zip(self.levels[:-1], self.levels[1:]))


@dataclass(frozen=True)
class ChainPlan:
    """How a chain of layers with level sizes ``sizes`` runs as independent sub-networks."""

    sizes: tuple[int, ...]
    parts: tuple[ChainPart, ...]
    n_components: int
    threshold: float
    method: str

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def macs_dense(self) -> int:
        return sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def macs_split(self) -> int:
        return sum(p.macs for p in self.parts)

    def layer_macs(self, layer: int) -> int:
        return sum(a * b for a, b in (p.layer_shape(layer) for p in self.parts))

    def output_order(self) -> np.ndarray:
        """The last layer's outputs in the order the parts produce them."""
        return np.concatenate([p.levels[-1] for p in self.parts])

    @classmethod
    def from_plan(cls, plan: Plan, dead_part: bool = False) -> "ChainPlan":
        """The one-layer chain of a single-weight plan. Outputs no input feeds are given, as zero
        columns, to the part with the fewest inputs; with ``dead_part`` (lossy plans, whose
        weights there are zeroed before the rewrite) to a part of their own that reads one input,
        so they cost one multiply-add each instead of a whole part's inputs."""
        if dead_part and plan.dead_cols.size and plan.parts:
            parts = plan.parts + (Part(np.zeros(1, dtype=np.int64), plan.dead_cols),)
        else:
            parts = plan.with_dead_columns()
        chain_parts = tuple(ChainPart((p.rows, p.cols)) for p in parts)
        return cls((plan.k, plan.n), chain_parts, plan.n_components, plan.threshold, plan.method)


def joint_components(weights: list[np.ndarray], threshold: float = 0.0, max_parts: int = 16) -> ChainPlan | None:
    """Components of the layered graph of ``weights`` packed into at most ``max_parts`` parts.

    Returns None when there is no valid joint plan: nothing reaches the last layer's outputs, or
    every part lacks units at some level.
    """
    masks = [significant_mask(w, threshold) for w in weights]
    sizes = [masks[0].shape[0]] + [m.shape[1] for m in masks]
    for layer, m in enumerate(masks):
        if m.shape[0] != sizes[layer]:
            raise ValueError(f"layer {layer} has {m.shape[0]} inputs, the layer before has {sizes[layer]} outputs")
    for layer in range(len(masks) - 1, 0, -1):  # a hidden unit that feeds nothing live is dead work
        dead = ~masks[layer].any(axis=1)
        if dead.any():
            masks[layer - 1][:, dead] = False
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows, cols = [], []
    for layer, m in enumerate(masks):
        r, c = np.nonzero(m)
        rows.append(r + offsets[layer])
        cols.append(c + offsets[layer + 1])
    r, c = np.concatenate(rows), np.concatenate(cols)
    total = int(offsets[-1])
    graph = sparse.coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(total, total)).tocsr()
    n_labels, labels = connected_components(graph, directed=False)
    level_labels = [labels[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
    counts = np.stack([np.bincount(lab, minlength=n_labels) for lab in level_labels], axis=1)
    has_edge = counts.sum(axis=1) > 1  # a component of one unit is an isolated unit
    live = np.flatnonzero(has_edge & (counts[:, -1] > 0))
    if live.size == 0:
        return None
    parts = []
    for group in pack(counts[live], max_parts):
        chosen = live[group]
        parts.append([np.flatnonzero(np.isin(lab, chosen)).astype(np.int64) for lab in level_labels])
    dead = np.flatnonzero(~has_edge[level_labels[-1]]).astype(np.int64)  # last-layer outputs nothing feeds
    if dead.size:
        target = min(range(len(parts)), key=lambda i: (parts[i][-2].size, i))
        parts[target][-1] = np.union1d(parts[target][-1], dead).astype(np.int64)
    parts = _absorb_headless(parts)
    if parts is None:
        return None
    result = tuple(ChainPart(tuple(p)) for p in parts)
    result = tuple(sorted(result, key=lambda p: int(p.levels[-1][0])))
    return ChainPlan(tuple(int(s) for s in sizes), result, int(live.size), float(threshold), "joint components")


def _absorb_headless(parts: list[list[np.ndarray]]) -> list[list[np.ndarray]] | None:
    """Merge each part that has no unit at some level (a sub-network that starts from a bias, not
    from the input) into the smallest complete part: a merged part uses the true weights, so it is
    still exact. None if no part is complete."""
    complete = [p for p in parts if all(level.size for level in p)]
    if not complete:
        return None
    for part in parts:
        if any(level.size == 0 for level in part):
            target = min(complete, key=lambda p: sum(a.size * b.size for a, b in zip(p[:-1], p[1:])))
            for i, level in enumerate(part):
                target[i] = np.union1d(target[i], level).astype(np.int64)
    return complete
