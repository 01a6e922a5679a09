"""``parallel`` layout: every part is its own sub-network, with its own MatMuls, through every layer
of the chain; the parts meet only after the last layer (Concat, then the output order).

Two forms. On the activation as it is (x @ W_p): each part takes its inputs with a Slice (a
contiguous run) or a Gather, and the weights stay on MatMul's right, where ORT prepacks them. On x^T
(W_p^T @ x^T, the "rows" form): picking inputs and restoring the output order are row copies
instead of element gathers, which wins for hidden permutations at larger batches. The static rule
(``--layout parallel``) uses x @ W_p when the parts' inputs are contiguous runs and their outputs in
order, or when the activation has one static row; ``--layout auto`` measures both
(docs/BENCHMARKS.md).
"""
from __future__ import annotations

import numpy as np

from ..chains import Chain
from ..partition import ChainPlan
from .emit import Emitter, Unsupported, from_rows_view, is_run, rows_view
from .layers import Lane, run_layers, vector_for


def prefers_rows(chain: Chain, plan: ChainPlan) -> bool:
    """The static rule: the x^T form unless the parts are contiguous and in order, or batch is 1."""
    site = chain.first
    if site.trans_a:
        return True
    in_order = np.array_equal(plan.output_order(), np.arange(plan.sizes[-1]))
    direct = in_order and all(is_run(p.levels[0]) for p in plan.parts)
    return not (direct or site.activation_rows == 1)


def emit_parallel(em: Emitter, chain: Chain, plan: ChainPlan, rows: bool) -> str:
    first, last = chain.first, chain.last
    if rows:
        x, axis, rank = rows_view(em, first, plan.sizes[0]), 0, 2
    elif first.trans_a:
        raise Unsupported("Gemm with transA has its inputs as rows: only the x^T forms apply")
    else:
        x, axis, rank = first.activation, -1, first.activation_rank
    outputs = []
    for i, part in enumerate(plan.parts):
        lane = _lane(chain, plan, i, rows)
        em.at(first.name)
        h = em.take(x, part.levels[0], axis, rank, f"part{i}", lane.doc(0), size=plan.sizes[0])
        outputs.append(run_layers(em, chain, lane, h))
    em.at(last.name)
    y = outputs[0]
    if len(outputs) > 1:
        y = em.node("Concat", outputs, "Concat", f"join the {len(outputs)} parts of '{chain.name}'",
                    axis=em.axis(rank, axis))
    y = em.take(y, np.argsort(plan.output_order()).astype(np.int64), axis, rank, "order",
                f"restore the output order of '{last.name}'", size=plan.sizes[-1])
    if rows:
        y = from_rows_view(em, y, first, plan.sizes[-1])
    return em.finish_gemm(y, last)


def _lane(chain: Chain, plan: ChainPlan, i: int, rows: bool) -> Lane:
    part = plan.parts[i]

    def weight(layer: int) -> np.ndarray:
        block = chain.sites[layer].weight[np.ix_(part.levels[layer], part.levels[layer + 1])]
        return np.ascontiguousarray(block.T if rows else block)

    def doc(layer: int) -> str:
        k, n = part.layer_shape(layer)
        form = " (as W^T @ x^T)" if rows else ""
        return (f"part {i} of {len(plan.parts)} of '{chain.sites[layer].name}': {k} of {plan.sizes[layer]} "
                f"inputs -> {n} of {plan.sizes[layer + 1]} outputs{form}")

    return Lane(f"part{i}", weight, lambda v, level, pad: vector_for(v, part.levels[level], rows), rows, doc)
