"""Replace each rewritten chain's nodes by its layout's nodes and drop what the old nodes alone used."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..chains import Chain
from ..sites import default_opset, walk_graphs
from .emit import Emitter, Unsupported
from .function import DOMAIN, add_functions
from .form import Layout
from .registry import FORMS, refusal
from .shapes import ChainShapes, needed, reshape_targets


@dataclass(frozen=True)
class Job:
    """One rewrite: a chain of sites found in the model being rewritten, its plan, the form to
    write it in, and whether to wrap it in a function call."""

    chain: Chain
    plan: object  # a WeightPlan whose kind the form accepts
    form: str
    wrapper: Layout | None = None
    """A layout whose ``wrap`` puts the nodes in one function call (``function``), or None."""


def emit_chain(chain: Chain, plan, form: str, *, opset: int, taken: set[str], ir_version: int,
               wrapper: Layout | None = None, function_index: int = 0, overloads: set[str] | None = None
               ) -> tuple[Emitter, onnx.FunctionProto | None]:
    """The nodes and initializers that compute ``chain`` in ``form``; with a ``wrapper`` layout, as
    one call of a new function (returned too). Raises :class:`Unsupported` with the reason."""
    why = refusal(form, chain, plan)
    if why is not None:
        raise Unsupported(why)
    layout = wrapper.name if wrapper is not None else form
    em = Emitter(chain.first.name, opset, taken, layout, ir_version, source=chain.first.node)
    shapes = ChainShapes(chain, opset, taken, layout, ir_version) if needed(chain) else None
    if shapes is not None:
        shapes.write_readers()
    y = FORMS[form].emit(em, chain, plan)
    if shapes is not None:
        y = shapes.restore(em, y)
    em.rename_output(y, chain.last.output)
    em.ends = {end: chain.last.output if tensor == y else tensor for end, tensor in em.ends.items()}
    em.gathers = sum(n.op_type == "Gather" for n in em.nodes)
    em.shapes = shapes
    func = None
    if wrapper is not None:
        func = wrapper.wrap(em, chain, chain.last.output, opset, function_index,
                            overloads if overloads is not None else set())
    return em, func


def rewrite_model(model: onnx.ModelProto, jobs: list[Job], *, stored: dict[int, tuple[int, int]] | None = None,
                  ends: dict[int, dict[str, str]] | None = None) -> tuple[dict[int, str], dict[int, int]]:
    """Rewrite ``model`` in place. ``jobs`` are chains found in this very model. Returns
    ``{job index: reason}`` for the chains that could not be written (left untouched), and
    ``{job index: Gather nodes written}`` for the others.

    A new tensor equal (type, shape and bytes) to one an earlier job wrote in the same graph is not
    written twice: the job reads that one (two sites reading one weight with the same plan share
    their parts). ``stored``, if given, gets ``{job index: (bytes written, bytes shared)}``; ``ends``
    gets ``{job index: Emitter.ends}`` for the jobs written in the graph itself (not in a function)."""
    opset = default_opset(model)
    taken = all_names(model.graph)
    refused: dict[int, str] = {}
    by_graph: dict[str, tuple[onnx.GraphProto, dict[int, list[onnx.NodeProto]]]] = {}
    dropped: set[str] = set()
    functions: list[onnx.FunctionProto] = []
    gathers: dict[int, int] = {}
    overloads: set[str] = set()
    written: dict[str, dict[tuple, str]] = {}  # graph scope -> {(type, dims, bytes): tensor name}
    for j, job in enumerate(jobs):
        chain, site = job.chain, job.chain.last
        if model.ir_version < 4 and site.scope != "main":
            refused[j] = "IR version < 4 needs new weights to be graph inputs, which a subgraph cannot take"
            continue
        try:
            em, func = emit_chain(chain, job.plan, job.form, opset=opset, taken=taken, ir_version=model.ir_version,
                                  wrapper=job.wrapper, function_index=len(functions), overloads=overloads)
        except Unsupported as exc:
            refused[j] = str(exc)
            continue
        gathers[j] = em.gathers
        if ends is not None and func is None:
            ends[j] = dict(em.ends)
        sizes = _share(em, written.setdefault(site.scope, {}))
        if stored is not None:
            stored[j] = sizes
        if func is not None:
            functions.append(func)
        functions.extend(em.functions)
        graph, replacements = by_graph.setdefault(site.scope, (site.graph, {}))
        for other in chain.sites[:-1]:
            replacements[other.index] = []
        for link in chain.links:
            for index in link.nodes:
                replacements[index] = []
            dropped.update(link.constants)
        # at the last site's place: every input of the chain (its activation, a Gemm's C) exists there
        before, initializers = [], list(em.initializers)
        if em.shapes is not None:  # Shape readers inside the chain: replaced where they are
            for index, nodes in em.shapes.placed.items():
                if index != site.index:
                    replacements[index] = nodes
            before = em.shapes.placed.get(site.index, [])
            initializers += em.shapes.initializers
            dropped.update(reshape_targets(chain))
        replacements[site.index] = before + em.nodes
        graph.initializer.extend(initializers)
        if model.ir_version < 4:  # IR 3: every initializer is also a graph input
            graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                               for t in initializers)
        for s in chain.sites:
            dropped.update(n for n in s.node.input[1:] if n)
            dropped.update(s.graph.node[i].output[0] for i in s.weight_producers)
    # Innermost graphs first: rebuilding a graph copies its nodes, subgraph attributes included, so a
    # subgraph edited after its parent was rebuilt would be edited in a detached copy.
    for scope in sorted(by_graph, key=lambda name: -name.count("/")):
        graph, replacements = by_graph[scope]
        nodes = []
        for i, node in enumerate(graph.node):
            nodes.extend(replacements.get(i, [node]))
        del graph.node[:]
        graph.node.extend(nodes)
    add_functions(model, functions)
    import_custom_domain(model)
    _drop_unused(model.graph, dropped)
    return refused, gathers


def import_custom_domain(model: onnx.ModelProto) -> None:
    """Import the ``onnx_split`` domain where a written node uses it (the kernel form's node)."""
    uses = any(n.domain == DOMAIN for _, g in walk_graphs(model.graph) for n in g.node)
    if uses and not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))


def _share(em: Emitter, seen: dict[tuple, str]) -> tuple[int, int]:
    """Drop ``em``'s initializers that equal one already written in its graph (``seen``, updated)
    and read that one instead. Returns (bytes kept, bytes shared)."""
    kept, renamed, sizes = [], {}, [0, 0]
    for t in em.initializers:
        key = (t.data_type, tuple(t.dims), t.raw_data) if t.HasField("raw_data") else None
        if key is not None and key in seen:
            renamed[t.name] = seen[key]
            sizes[1] += len(t.raw_data)
            continue
        if key is not None:
            seen[key] = t.name
        sizes[0] += t.ByteSize()
        kept.append(t)
    if renamed:
        em.initializers = kept
        _rename_inputs(em.nodes, renamed)
    return sizes[0], sizes[1]


def _rename_inputs(nodes, renamed: dict[str, str]) -> None:
    """Rename inputs of ``nodes`` and of the nodes of their subgraphs (an If branch reads the
    weights of the graph around it)."""
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attribute.g.node, renamed)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for g in attribute.graphs:
                    _rename_inputs(g.node, renamed)


def all_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for _, g in walk_graphs(graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for node in g.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def _drop_unused(main: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove initializers and constant-producing nodes among ``candidates`` that nothing reads
    any more (transitively), in whichever graph they live."""
    while candidates:
        used = set()
        for _, g in walk_graphs(main):
            used.update(v.name for v in g.output)
            for node in g.node:
                used.update(node.input)
        unused = candidates - used
        if not unused:
            return
        next_candidates: set[str] = set()
        # Innermost first (reversed pre-order): rebuilding a graph's node list copies its nodes, so a
        # subgraph reached through the old parent after the parent was rebuilt would be a detached copy.
        for _, g in reversed(list(walk_graphs(main))):
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
