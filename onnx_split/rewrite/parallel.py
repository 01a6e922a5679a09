"""``parallel`` layout: per part, take its inputs, MatMul with the part's weight, join the parts and
restore the output order.

When every part's inputs are a contiguous run and the parts' outputs are already in order, this is
Slice -> MatMul -> Concat on the activation as it is. Otherwise (hidden permutations) it works on
x^T, where picking inputs and reordering outputs are row copies instead of element gathers:
y^T = Concat_p(W_p^T @ x^T[rows_p]), reordered by a row Gather, then transposed back. The one
exception is an activation with a static single row (batch 1), where the element Gathers are as
cheap as row copies and x @ W_p keeps the weight where ORT prepacks it: there the direct form wins
(docs/BENCHMARKS.md).
"""
from __future__ import annotations

import numpy as np

from ..partition import Plan
from .emit import Emitter, from_rows_view, is_run, rows_view


def emit_parallel(em: Emitter, site, plan: Plan) -> str:
    parts = plan.with_dead_columns()
    order = np.concatenate([p.cols for p in parts])
    in_order = np.array_equal(order, np.arange(plan.n))
    direct = in_order and all(is_run(p.rows) for p in parts)
    if (direct or site.activation_rows == 1) and not site.trans_a:
        return em.finish_gemm(_direct(em, site, plan, parts, order), site)
    xt = rows_view(em, site, plan.k)
    outputs = []
    for i, part in enumerate(parts):
        local, doc = f"part{i}", _doc(site, plan, parts, i)
        xi = em.take(xt, part.rows, 0, 2, local, doc, size=plan.k)
        wt = em.const(f"{local}/Wt", np.ascontiguousarray(site.weight[np.ix_(part.rows, part.cols)].T))
        outputs.append(em.node("MatMul", [wt, xi], f"{local}/MatMul", doc + " (as W^T @ x^T)"))
    yt = outputs[0]
    if len(outputs) > 1:
        yt = em.node("Concat", outputs, "Concat", f"join the {len(outputs)} parts of '{site.name}'", axis=0)
    if not in_order:
        yt = em.take(yt, np.argsort(order).astype(np.int64), 0, 2, "order",
                     f"restore the output order of '{site.name}'")
    return em.finish_gemm(from_rows_view(em, yt, site, plan.n), site)


def _direct(em: Emitter, site, plan: Plan, parts, order: np.ndarray) -> str:
    """Slice or Gather -> MatMul -> Concat on the activation itself, then the output order."""
    x, rank = site.activation, site.activation_rank
    outputs = []
    for i, part in enumerate(parts):
        local, doc = f"part{i}", _doc(site, plan, parts, i)
        xi = em.take(x, part.rows, -1, rank, local, doc, size=plan.k)
        wi = em.const(f"{local}/W", site.weight[np.ix_(part.rows, part.cols)])
        outputs.append(em.node("MatMul", [xi, wi], f"{local}/MatMul", doc))
    y = outputs[0]
    if len(outputs) > 1:
        y = em.node("Concat", outputs, "Concat", f"join the {len(outputs)} parts of '{site.name}'",
                    axis=em.axis(rank, -1))
    return em.take(y, np.argsort(order).astype(np.int64), -1, rank, "order",
                   f"restore the output order of '{site.name}'", size=plan.n)


def _doc(site, plan: Plan, parts, i: int) -> str:
    part = parts[i]
    return (f"part {i} of {len(parts)} of '{site.name}': {part.rows.size} of {plan.k} inputs "
            f"-> {part.cols.size} of {plan.n} outputs")
