"""``parallel`` layout: per part, take its inputs (Slice or Gather), MatMul, then Concat the parts
and restore the output order."""
from __future__ import annotations

import numpy as np

from ..partition import Plan
from .emit import Emitter


def emit_parallel(em: Emitter, site, plan: Plan) -> str:
    parts = plan.with_dead_columns()
    x, rank = site.activation, site.activation_rank
    if site.trans_a:
        x = em.node("Transpose", [x], "transA/Transpose", f"transA of Gemm '{site.name}'", perm=[1, 0])
    axis = em.axis(rank, -1)
    outputs = []
    for i, part in enumerate(parts):
        local = f"part{i}"
        doc = (f"part {i} of {len(parts)} of '{site.name}': {part.rows.size} of {plan.k} inputs "
               f"-> {part.cols.size} of {plan.n} outputs")
        xi = em.take(x, part.rows, -1, rank, local, doc, size=plan.k)
        wi = em.const(f"{local}/W", site.weight[np.ix_(part.rows, part.cols)])
        outputs.append(em.node("MatMul", [xi, wi], f"{local}/MatMul", doc))
    y = outputs[0]
    if len(outputs) > 1:
        y = em.node("Concat", outputs, "Concat", f"join the {len(outputs)} parts of '{site.name}'", axis=axis)
    order = np.concatenate([p.cols for p in parts])
    if not np.array_equal(order, np.arange(plan.n)):
        inverse = np.argsort(order).astype(np.int64)
        y = em.take(y, inverse, -1, rank, "order", f"restore the output order of '{site.name}'")
    return em.finish_gemm(y, site)
