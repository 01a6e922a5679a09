"""``batched`` layout: every part padded to one size per level, and one MatMul per layer computes
all parts at once (one kernel instead of P).

It works on x^T [K, M]: one row Gather lines the parts' inputs up as [P*k, M] (padding rows read a
real input against zero weights), a Reshape makes it [P, k, M], and W^T [P, n, k] @ x^T gives
[P, n, M] per layer; per-feature constants between layers are [P, n, 1] (padding lanes get 0, or
1 as a divisor, so they stay finite and meet only zero weights). After the last layer a row Gather
picks and orders the real outputs, and a Transpose turns y^T back.
"""
from __future__ import annotations

import numpy as np

from ..chains import Chain
from ..partition import ChainPlan
from .emit import Emitter, from_rows_view, rows_view
from .form import Form, Layout
from .registry import register
from .layers import Lane, run_layers


def padded_sizes(plan: ChainPlan) -> list[int]:
    return [max(p.levels[level].size for p in plan.parts) for level in range(len(plan.sizes))]


def emit_batched(em: Emitter, chain: Chain, plan: ChainPlan) -> str:
    first, last = chain.first, chain.last
    parts, sizes = plan.parts, padded_sizes(plan)
    n_parts = len(parts)
    rows = np.empty((n_parts, sizes[0]), dtype=np.int64)
    where = np.empty(plan.sizes[-1], dtype=np.int64)  # row of y^T [P*n, M] holding each output
    for i, p in enumerate(parts):
        rows[i, : p.levels[0].size] = p.levels[0]
        rows[i, p.levels[0].size:] = p.levels[0][0]  # padding reads a real input against zero weights
        where[p.levels[-1]] = i * sizes[-1] + np.arange(p.levels[-1].size)

    def weight(layer: int) -> np.ndarray:
        site = chain.sites[layer]
        w = np.zeros((n_parts, sizes[layer + 1], sizes[layer]), dtype=site.weight.dtype)
        for i, p in enumerate(parts):
            a, b = p.levels[layer], p.levels[layer + 1]
            w[i, : b.size, : a.size] = site.weight[np.ix_(a, b)].T
        return w

    def vector(values: np.ndarray, level: int, pad: float) -> np.ndarray:
        if values.ndim == 0:
            return values
        out = np.full((n_parts, sizes[level], 1), pad, dtype=values.dtype)
        for i, p in enumerate(parts):
            out[i, : p.levels[level].size, 0] = values[p.levels[level]]
        return out

    def doc(layer: int) -> str:
        return (f"{n_parts} parts of '{chain.sites[layer].name}' padded to [{sizes[layer]}, {sizes[layer + 1]}] "
                f"and computed by one MatMul (as W^T @ x^T)")

    em.at(first.name, first.node)
    xt = rows_view(em, first, plan.sizes[0])
    xg = em.take(xt, rows.reshape(-1), 0, 2, "inputs", "line up every part's inputs", size=plan.sizes[0], end="inputs")
    h = em.reshape(xg, em.ints("parts_shape", [n_parts, sizes[0], -1]), "parts/Reshape", doc(0))
    h = run_layers(em, chain, Lane("parts", weight, vector, True, doc), h)
    em.at(last.name, last.node)
    yt = em.reshape(h, em.ints("join_shape", [n_parts * sizes[-1], -1]), "join/Reshape", doc(len(parts[0].levels) - 2))
    padded = n_parts * sizes[-1] != plan.sizes[-1]  # then the Gather also drops the padding rows: not a permutation
    yt = em.take(yt, where, 0, 2, "order", f"select and order the outputs of '{last.name}'", size=n_parts * sizes[-1],
                 end=None if padded else "order")
    return em.finish_gemm(from_rows_view(em, yt, first, plan.sizes[-1]), last)


def padded_macs(plan, layer: int | None = None) -> int:
    """Every part padded to the largest: what the batched MatMul computes."""
    partition = plan.partition
    if not partition.parts:
        return 0
    sizes = padded_sizes(partition)
    layers = range(partition.n_layers) if layer is None else [layer]
    return len(partition.parts) * sum(sizes[i] * sizes[i + 1] for i in layers)


FORMS = (Form("batched", frozenset({"blocks"}), lambda em, chain, plan: emit_batched(em, chain, plan.partition),
              padded_macs, doc="all parts padded to one size and computed by one MatMul per layer"),)
LAYOUT = Layout("batched", lambda chain, plan: "batched", "batched", help="one MatMul over [parts,n,k]")
register(*FORMS, LAYOUT)
