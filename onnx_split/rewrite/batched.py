"""``batched`` layout: every part padded to one [k, n] block, and a single MatMul over a [P, n, k]
weight computes all parts at once (one kernel instead of P).

It works on x^T [K, M]: one row Gather lines the parts' inputs up as [P*k, M] (padding rows read a
real input against zero weights), a Reshape makes it [P, k, M], and W^T [P, n, k] @ x^T gives
y^T [P, n, M]; a row Gather then picks and orders the N real outputs, and a Transpose turns y^T back.
"""
from __future__ import annotations

import numpy as np

from ..partition import Plan
from .emit import Emitter, from_rows_view, rows_view


def emit_batched(em: Emitter, site, plan: Plan) -> str:
    parts = plan.with_dead_columns()
    n_parts = len(parts)
    k = max(p.rows.size for p in parts)
    n = max(p.cols.size for p in parts)
    weight_t = np.zeros((n_parts, n, k), dtype=site.weight.dtype)
    rows = np.empty((n_parts, k), dtype=np.int64)
    where = np.empty(plan.n, dtype=np.int64)  # row of y^T [P*n, M] holding each original output
    for i, p in enumerate(parts):
        weight_t[i, : p.cols.size, : p.rows.size] = site.weight[np.ix_(p.rows, p.cols)].T
        rows[i, : p.rows.size] = p.rows
        rows[i, p.rows.size:] = p.rows[0]  # padding reads a real input against zero weights
        where[p.cols] = i * n + np.arange(p.cols.size)
    doc = f"{n_parts} parts of '{site.name}' padded to [{k}, {n}] and computed by one MatMul"

    xt = rows_view(em, site, plan.k)
    xg = em.take(xt, rows.reshape(-1), 0, 2, "inputs", "line up every part's inputs", size=plan.k)
    x3 = em.reshape(xg, em.ints("parts_shape", [n_parts, k, -1]), "parts/Reshape", doc)
    y3 = em.node("MatMul", [em.const("Wt", weight_t), x3], "MatMul", doc + " (as W^T @ x^T)")
    yt = em.reshape(y3, em.ints("join_shape", [n_parts * n, -1]), "join/Reshape", doc)
    yt = em.take(yt, where, 0, 2, "order", f"select and order the outputs of '{site.name}'", size=n_parts * n)
    return em.finish_gemm(from_rows_view(em, yt, site, plan.n), site)
