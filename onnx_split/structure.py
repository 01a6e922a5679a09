"""What a split site's weight looks like before and after its plan, as small arrays for pictures.

For every layer of every unit that has a block plan, :func:`site_structures` gives |W| in the
original row/column order and |W| with rows and columns permuted into the plan's parts (each part's
inputs and outputs together, in part order; inputs no part reads and outputs no part writes at the
end), with each part's block as a rectangle in the permuted order. Both pictures are block-max
downsampled to at most ``MAX_PIXELS`` per side, so a nonzero entry never vanishes in a large weight.

Pure numpy: the plotting module (plots.py, matplotlib) draws these; nothing here imports it, and
no earlier stage imports this module (the pipeline builds them at its end, when asked).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_PIXELS = 256


@dataclass(frozen=True)
class SiteStructure:
    """One layer of one unit: ``before`` and ``after`` are block-max |W| (float32, at most
    MAX_PIXELS per side); ``blocks`` are the parts' rectangles (row0, row1, col0, col1) in the
    permuted order, in rows and columns of the weight (end exclusive)."""

    node: str
    scope: str
    shape: tuple[int, int]
    decision: str
    """the site's final decision in the report's words: ``split (<layout>)`` or ``kept: <reason>``"""
    chain: str | None
    layer: int
    factor: int
    """each pixel is the maximum of a factor x factor block of |W|"""
    before: np.ndarray = field(repr=False)
    after: np.ndarray = field(repr=False)
    blocks: tuple[tuple[int, int, int, int], ...] = ()
    approximates: bool = False
    """the plan drops the weights outside its blocks (lossy)"""

    @property
    def label(self) -> str:
        return self.node if self.scope == "main" else f"{self.scope}/{self.node}"


def block_max(values: np.ndarray, factor: int) -> np.ndarray:
    """The maximum of every ``factor`` x ``factor`` block of a 2-D array (edges padded with 0)."""
    if factor <= 1:
        return np.asarray(values, dtype=np.float32)
    k, n = values.shape
    rows, cols = -(-k // factor), -(-n // factor)
    padded = np.zeros((rows * factor, cols * factor), dtype=np.float32)
    padded[:k, :n] = values
    return padded.reshape(rows, factor, cols, factor).max(axis=(1, 3))


def downsample_factor(shape: tuple[int, int], limit: int = MAX_PIXELS) -> int:
    return max(1, -(-max(shape) // limit))


def permutation(levels_per_part: list[np.ndarray], size: int) -> np.ndarray:
    """Every index of ``range(size)`` once: each part's indices in part order (an index two parts
    share stays with the first), then the indices of no part."""
    seen = np.zeros(size, dtype=bool)
    order = []
    for idx in levels_per_part:
        idx = np.asarray(idx, dtype=np.int64)
        new = idx[~seen[idx]]
        seen[new] = True
        order.append(new)
    order.append(np.flatnonzero(~seen))
    return np.concatenate(order).astype(np.int64)


def _span(idx: np.ndarray, position: np.ndarray) -> tuple[int, int]:
    placed = position[np.asarray(idx, dtype=np.int64)]
    return int(placed.min()), int(placed.max()) + 1


def layer_structure(weight: np.ndarray, parts_rows: list[np.ndarray], parts_cols: list[np.ndarray], *,
                    limit: int = MAX_PIXELS):
    """(before, after, blocks, factor) of one K x N weight split into parts whose inputs are
    ``parts_rows[p]`` and outputs ``parts_cols[p]``."""
    w = np.abs(np.asarray(weight, dtype=np.float32))
    k, n = w.shape
    factor = downsample_factor((k, n), limit)
    rows, cols = permutation(parts_rows, k), permutation(parts_cols, n)
    row_pos, col_pos = np.empty(k, dtype=np.int64), np.empty(n, dtype=np.int64)
    row_pos[rows], col_pos[cols] = np.arange(k), np.arange(n)
    blocks = []
    for r, c in zip(parts_rows, parts_cols):
        if len(r) and len(c):
            r0, r1 = _span(r, row_pos)
            c0, c1 = _span(c, col_pos)
            blocks.append((r0, r1, c0, c1))
    before = block_max(w, factor)
    after = block_max(w[rows][:, cols], factor)
    return before, after, tuple(blocks), factor


def site_structures(sites: list, decisions: dict, units: list, labels: dict[int, str],
                    limit: int = MAX_PIXELS) -> list[SiteStructure]:
    """One :class:`SiteStructure` per layer of every unit whose plan is a block plan; ``labels``
    are the sites' final decisions as the report words them. The weights are the sites' original
    ones (for a lossy plan, including what it drops)."""
    found = []
    for unit in units:
        plan = unit.plan
        partition = getattr(plan, "partition", None)
        if getattr(plan, "kind", None) != "blocks" or partition is None:
            continue
        chain = unit.chain.name if len(unit.sites) > 1 else None
        for layer, i in enumerate(unit.sites):
            site = sites[i]
            if site.weight is None or site.weight.ndim != 2:
                continue
            parts_rows = [p.levels[layer] for p in partition.parts]
            parts_cols = [p.levels[layer + 1] for p in partition.parts]
            before, after, blocks, factor = layer_structure(site.weight, parts_rows, parts_cols, limit=limit)
            found.append(SiteStructure(site.name, site.scope, tuple(int(d) for d in site.weight.shape),
                                       labels.get(i, ""), chain, layer, factor, before, after, blocks,
                                       bool(plan.approximates)))
    return found
