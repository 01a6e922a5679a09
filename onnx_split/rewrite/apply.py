"""Replace each split site's node by its layout's nodes and drop what the old node alone used."""
from __future__ import annotations

from typing import Callable

import onnx

from ..partition import Plan
from ..sites import Site, default_opset
from .batched import emit_batched
from .emit import Emitter, Unsupported
from .parallel import emit_parallel

LAYOUT_EMITTERS: dict[str, Callable] = {"parallel": emit_parallel, "batched": emit_batched}


def rewrite_model(model: onnx.ModelProto, jobs: list[tuple[Site, Plan]], layout: str) -> dict[int, str]:
    """Rewrite ``model`` in place. ``jobs`` are sites found in this very model with their plans.

    Returns ``{job index: reason}`` for the sites the layout could not express (left untouched).
    """
    emit = LAYOUT_EMITTERS[layout]
    opset = default_opset(model)
    taken = _all_names(model.graph)
    refused: dict[int, str] = {}
    by_graph: dict[str, tuple[onnx.GraphProto, dict[int, list[onnx.NodeProto]]]] = {}
    dropped: set[str] = set()
    for j, (site, plan) in enumerate(jobs):
        if model.ir_version < 4 and site.scope != "main":
            refused[j] = "IR version < 4 needs new weights to be graph inputs, which a subgraph cannot take"
            continue
        em = Emitter(site.name, opset, taken, layout, model.ir_version)
        try:
            y = emit(em, site, plan)
        except Unsupported as exc:
            refused[j] = str(exc)
            continue
        em.rename_output(y, site.output)
        graph, replacements = by_graph.setdefault(site.scope, (site.graph, {}))
        replacements[site.index] = em.nodes
        graph.initializer.extend(em.initializers)
        if model.ir_version < 4:  # IR 3: every initializer is also a graph input
            graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                               for t in em.initializers)
        dropped.update(n for n in site.node.input[1:] if n)
        dropped.update(site.graph.node[i].output[0] for i in site.weight_producers)
    # Innermost graphs first: rebuilding a graph copies its nodes, subgraph attributes included, so a
    # subgraph edited after its parent was rebuilt would be edited in a detached copy.
    for scope in sorted(by_graph, key=lambda name: -name.count("/")):
        graph, replacements = by_graph[scope]
        nodes = []
        for i, node in enumerate(graph.node):
            nodes.extend(replacements.get(i, [node]))
        del graph.node[:]
        graph.node.extend(nodes)
    _drop_unused(model.graph, dropped)
    return refused


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in _graphs(graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for node in g.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(sub)


def _drop_unused(main: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove initializers and constant-producing nodes among ``candidates`` that nothing reads
    any more (transitively), in whichever graph they live."""
    while candidates:
        used = set()
        for g in _graphs(main):
            used.update(v.name for v in g.output)
            for node in g.node:
                used.update(node.input)
        unused = candidates - used
        if not unused:
            return
        next_candidates: set[str] = set()
        # Innermost first (reversed pre-order): rebuilding a graph's node list copies its nodes, so a
        # subgraph reached through the old parent after the parent was rebuilt would be a detached copy.
        for g in reversed(list(_graphs(main))):
            inputs = {i.name for i in g.input}
            keep_init = [t for t in g.initializer if t.name not in unused or t.name in inputs]
            if len(keep_init) != len(g.initializer):
                del g.initializer[:]
                g.initializer.extend(keep_init)
            keep_nodes = []
            for node in g.node:
                if node.output and all((o in unused or not o) for o in node.output):
                    next_candidates.update(i for i in node.input if i)
                else:
                    keep_nodes.append(node)
            if len(keep_nodes) != len(g.node):
                del g.node[:]
                g.node.extend(keep_nodes)
        candidates = next_candidates


def layout_macs(plan: Plan, layout: str) -> int:
    """Multiply-accumulates per activation row that ``layout`` really executes for ``plan``."""
    parts = plan.with_dead_columns()
    if not parts:
        return 0
    if layout == "batched":
        return len(parts) * max(p.rows.size for p in parts) * max(p.cols.size for p in parts)
    return sum(p.macs for p in parts)
