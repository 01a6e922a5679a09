"""``parallel`` layout: every part is its own sub-network, with its own MatMuls, through every layer
of the chain; the parts meet only after the last layer (Concat, then the output order).

Two forms. On the activation as it is (x @ W_p): each part takes its inputs with a Slice (a
contiguous run) or a Gather, and the weights stay on MatMul's right, where ORT prepacks them. Under
permutations, a 2-D activation with more than one row is permuted once at each end of the chain as
Transpose -> row Gather -> Transpose (then a Slice per part), since ORT's Gather on the last axis
copies element by element. On x^T
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
from .emit import Emitter, from_rows_view, is_run, rows_view
from .form import Form, Layout
from .registry import register
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
    else:
        x, axis, rank = first.activation, -1, first.activation_rank
    by_columns = not rows and rank == 2 and first.activation_rows != 1
    inputs = [p.levels[0] for p in plan.parts]
    if by_columns and not all(is_run(r) for r in inputs):
        # one Gather of rows of x^T for all parts, then a contiguous Slice per part
        em.at(first.name, first.node)
        x = columns(em, x, np.concatenate(inputs), "inputs", "line up every part's inputs", end="inputs")
        starts = np.cumsum([0] + [r.size for r in inputs])
        inputs = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
    outputs = []
    for i, part in enumerate(plan.parts):
        lane = _lane(chain, plan, i, rows)
        em.at(first.name, first.node)
        h = em.take(x, inputs[i], axis, rank, f"part{i}", lane.doc(0), size=plan.sizes[0])
        outputs.append(run_layers(em, chain, lane, h))
    em.at(last.name, last.node)
    y = outputs[0]
    if len(outputs) > 1:
        y = em.node("Concat", outputs, "Concat", f"join the {len(outputs)} parts of '{chain.name}'",
                    axis=em.axis(rank, axis))
    order = np.argsort(plan.output_order()).astype(np.int64)
    if by_columns and not np.array_equal(order, np.arange(plan.sizes[-1])):
        y = columns(em, y, order, "order", f"restore the output order of '{last.name}'", end="order")
    else:
        y = em.take(y, order, axis, rank, "order", f"restore the output order of '{last.name}'", size=plan.sizes[-1],
                    end="order")
    if rows:
        y = from_rows_view(em, y, first, plan.sizes[-1])
    return em.finish_gemm(y, last)


def columns(em: Emitter, x: str, index: np.ndarray, local: str, doc: str, end: str | None = None) -> str:
    """x[:, index] of a 2-D x as Transpose -> row Gather -> Transpose: ORT's Gather on the last axis
    copies element by element, a row Gather copies rows (several times faster at batch 32)."""
    xt = em.node("Transpose", [x], f"{local}/to_rows/Transpose", doc, perm=[1, 0])
    g = em.take(xt, index, 0, 2, local, doc, end=end)
    return em.node("Transpose", [g], f"{local}/from_rows/Transpose", doc, perm=[1, 0])


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


def _refuse_direct(chain: Chain, plan) -> str | None:
    if chain.first.trans_a:
        return "Gemm with transA has its inputs as rows: only the x^T forms apply"
    return None


def parts_macs(plan, layer: int | None = None) -> int:
    """The parts' blocks: what the parallel forms compute (no padding)."""
    partition = plan.partition
    layers = range(partition.n_layers) if layer is None else [layer]
    return sum(partition.layer_macs(i) for i in layers)


FORMS = (
    Form("parallel", frozenset({"blocks"}), lambda em, chain, plan: emit_parallel(em, chain, plan.partition, False),
         parts_macs, _refuse_direct, "one MatMul per part on x (Slice/Gather -> MatMul -> Concat)"),
    Form("parallel-rows", frozenset({"blocks"}),
         lambda em, chain, plan: emit_parallel(em, chain, plan.partition, True), parts_macs,
         doc="one MatMul per part on x^T (row Gathers instead of element gathers)"),
)
LAYOUT = Layout("parallel", lambda chain, plan: "parallel-rows" if prefers_rows(chain, plan.partition) else "parallel",
                "parallel", help="per part Slice->MatMul->Concat")
register(*FORMS, LAYOUT)
