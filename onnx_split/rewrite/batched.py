"""``batched`` layout: every part padded to one [k, n] block; a single MatMul over a [P, k, n]
weight computes all parts at once (one kernel instead of P)."""
from __future__ import annotations

import numpy as np

from ..partition import Plan
from .emit import Emitter


def emit_batched(em: Emitter, site, plan: Plan) -> str:
    parts = plan.with_dead_columns()
    n_parts = len(parts)
    k = max(p.rows.size for p in parts)
    n = max(p.cols.size for p in parts)
    dtype = site.weight.dtype
    weight = np.zeros((n_parts, k, n), dtype=dtype)
    rows = np.empty((n_parts, k), dtype=np.int64)
    where = np.empty(plan.n, dtype=np.int64)  # flat position of each original output
    for i, p in enumerate(parts):
        weight[i, : p.rows.size, : p.cols.size] = site.weight[np.ix_(p.rows, p.cols)]
        rows[i, : p.rows.size] = p.rows
        rows[i, p.rows.size:] = p.rows[0]  # padding reads a real input against zero weights
        where[p.cols] = i * n + np.arange(p.cols.size)
    doc = f"{n_parts} parts of '{site.name}' padded to [{k}, {n}] and computed by one MatMul"

    x, rank = site.activation, site.activation_rank
    if site.trans_a:
        x = em.node("Transpose", [x], "transA/Transpose", f"transA of Gemm '{site.name}'", perm=[1, 0])
    flat = x
    if rank != 2:
        flat = em.reshape(x, em.ints("flat_shape", [-1, plan.k]), "flatten/Reshape", "rows of the activation")
    xg = em.take(flat, rows.reshape(-1), 1, 2, "inputs", "gather every part's inputs", size=plan.k)
    x3 = em.reshape(xg, em.ints("parts_shape", [-1, n_parts, k]), "parts/Reshape", doc)
    x3 = em.node("Transpose", [x3], "parts/Transpose", doc, perm=[1, 0, 2])
    y3 = em.node("MatMul", [x3, em.const("W", weight)], "MatMul", doc)
    y3 = em.node("Transpose", [y3], "join/Transpose", doc, perm=[1, 0, 2])
    y = em.reshape(y3, em.ints("join_shape", [-1, n_parts * n]), "join/Reshape", doc)
    if not np.array_equal(where, np.arange(plan.n)):
        y = em.take(y, where, 1, 2, "order", f"select and order the outputs of '{site.name}'")
    if rank != 2:
        lead = em.node("Shape", [x], "shape/Shape", "leading dims of the activation")
        lead = em.slice(lead, 0, -1, 0, "shape/Slice", "leading dims of the activation")
        shape = em.node("Concat", [lead, em.ints("shape/N", [plan.n])], "shape/Concat", "output shape", axis=0)
        y = em.reshape(y, shape, "unflatten/Reshape", "restore the leading dims")
    return em.finish_gemm(y, site)
