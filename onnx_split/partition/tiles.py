"""Static block sparsity: keep the most significant tiles of W, the baseline for lossy splits.

W (K x N, ``y = x @ W``) is cut into ``tile x tile`` tiles (the last row and column of tiles may be
smaller). A tile's score is the sum of ``scores`` inside it; the ``ceil(keep * n_tiles)`` highest
scoring tiles are kept (ties: lower row-major tile index first) and the rest dropped.

As a :class:`Plan`: one part per output tile-column that keeps at least one tile, its columns that
block's outputs and its rows the union of the row ranges of its kept tiles. Parts' rows overlap
(each output block reads only its own kept input blocks), unlike the balanced partitioners' plans.
Output blocks that keep no tile are ``dead_cols`` (their value is the bias), inputs that no kept
tile reads are ``unused_rows``. The plan's MACs are the kept tiles' total area.

Pure numpy: no onnx import here.
"""
from __future__ import annotations

import math

import numpy as np

from .balance import check_inputs
from .plan import Part, Plan


def tile_scores(scores: np.ndarray, tile: int) -> np.ndarray:
    """ceil(K / tile) x ceil(N / tile) sums of ``scores`` per tile."""
    k, n = scores.shape
    per_row = np.add.reduceat(scores, np.arange(0, k, tile), axis=0)
    return np.add.reduceat(per_row, np.arange(0, n, tile), axis=1)


def kept_tiles(scores: np.ndarray, tile: int, keep: float) -> np.ndarray:
    """Boolean tile mask of the ``ceil(keep * n_tiles)`` highest-scoring tiles."""
    sums = tile_scores(scores, tile)
    count = math.ceil(round(keep * sums.size, 9))  # round: 0.3 * 10 is 3.0000000000000004
    mask = np.zeros(sums.size, dtype=bool)
    mask[np.argsort(-sums, axis=None, kind="stable")[:count]] = True
    return mask.reshape(sums.shape)


def static_tiles(scores: np.ndarray, tile: int, keep: float) -> Plan:
    """Plan that keeps the most significant ``keep`` fraction of ``tile x tile`` tiles."""
    scores, _ = check_inputs(scores, 1)
    if int(tile) < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    tile = int(tile)
    k, n = scores.shape
    mask = kept_tiles(scores, tile, keep)
    parts, dead = [], []
    for b in range(mask.shape[1]):
        cols = np.arange(b * tile, min((b + 1) * tile, n), dtype=np.int64)
        blocks = np.flatnonzero(mask[:, b])
        if blocks.size == 0:
            dead.append(cols)
            continue
        rows = np.concatenate([np.arange(a * tile, min((a + 1) * tile, k)) for a in blocks]).astype(np.int64)
        parts.append(Part(rows, cols))
    unused = [np.arange(a * tile, min((a + 1) * tile, k)) for a in np.flatnonzero(~mask.any(axis=1))]
    return Plan(k=k, n=n, parts=tuple(parts),
                unused_rows=np.concatenate([np.zeros(0, np.int64), *unused]).astype(np.int64),
                dead_cols=np.concatenate([np.zeros(0, np.int64), *dead]).astype(np.int64),
                n_components=len(parts), method="tiles", threshold=0.0)
