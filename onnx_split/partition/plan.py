"""The plan type every partitioner returns: which inputs and outputs each part owns, in order.

Pure numpy: no onnx import here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Part:
    """One independent sub-network: ``y[..., cols] = x[..., rows] @ W[rows][:, cols]``."""

    rows: np.ndarray  # sorted int64 input indices (into K)
    cols: np.ndarray  # sorted int64 output indices (into N)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rows.size), int(self.cols.size)

    @property
    def macs(self) -> int:
        return int(self.rows.size) * int(self.cols.size)


@dataclass(frozen=True)
class Plan:
    """How a weight W[K, N] is computed as independent parts.

    ``unused_rows``: inputs that no output uses (never read).
    ``dead_cols``: outputs that no input feeds (their value is the bias, or zero).
    ``n_components``: connected components that carry at least one edge.
    """

    k: int
    n: int
    parts: tuple[Part, ...]
    unused_rows: np.ndarray
    dead_cols: np.ndarray
    n_components: int
    method: str
    threshold: float

    @property
    def macs_dense(self) -> int:
        return self.k * self.n

    @property
    def macs_split(self) -> int:
        return sum(p.macs for p in self.parts)

    def with_dead_columns(self) -> tuple[Part, ...]:
        """The parts with ``dead_cols`` given to the part with the fewest rows (as zero columns),
        so every output column is produced by exactly one part."""
        if self.dead_cols.size == 0 or not self.parts:
            return self.parts
        target = min(range(len(self.parts)), key=lambda i: (self.parts[i].rows.size, i))
        parts = list(self.parts)
        part = parts[target]
        parts[target] = Part(part.rows, np.union1d(part.cols, self.dead_cols).astype(np.int64))
        return tuple(parts)
