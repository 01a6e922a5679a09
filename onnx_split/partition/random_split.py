"""Lossy balanced partition at random: the baseline a real partitioner must beat.

Rows and columns are each shuffled by a seeded permutation and cut into ``parts`` consecutive
groups of balanced sizes; row group ``p`` and column group ``p`` form part ``p``. For unstructured
scores this retains about ``1 / parts`` of the significance.

Pure numpy: no onnx import here.
"""
from __future__ import annotations

import numpy as np

from .balance import check_inputs, index_labels, plan_from_labels
from .plan import Plan


def random_blocks(scores: np.ndarray, parts: int, *, seed: int = 0) -> Plan:
    """Balanced ``parts``-way plan of ``scores`` (K x N) from random row and column groups."""
    scores, parts = check_inputs(scores, parts)
    k, n = scores.shape
    rng = np.random.default_rng(seed)
    row_part = np.empty(k, dtype=np.int64)
    col_part = np.empty(n, dtype=np.int64)
    row_part[rng.permutation(k)] = index_labels(k, parts)
    col_part[rng.permutation(n)] = index_labels(n, parts)
    return plan_from_labels(row_part, col_part, parts, "random")
