"""Fold a written chain's end permutations into the dense layers next to it.

A split chain lines up its inputs with one Gather and restores its output order with another
(batched layout, and the parallel layout's row Gathers). Where the chain's input comes from a dense
MatMul/Gemm through feature-wise nodes only (a chains.Link from a site that stays dense), that
layer can compute its outputs in the order the chain reads them: its weight's columns, its bias and
the per-feature constants on the way are permuted, and the Gather goes. Likewise at the output: the
weight rows of the dense layer after the chain, the chain's own bias and the constants between them
take the chain's order, and the ordering Gather goes. The result is the same function (each sum
only runs in another order); what changes is two fewer copies of the activation per chain, which is
what a small batch pays most for (docs/SIGNIFICANCE.md).

Only whole permutations are folded (a batched layout whose parts are padded reads some inputs
twice and drops its padding rows at the end: its Gathers stay), only in the main graph (inside an
If or Loop body a name may also be bound outside it), only into weights stored as initializers
that are not also graph inputs, and never into a site ``--include``/``--exclude`` leaves out; a
weight or constant read elsewhere too is copied, not changed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .. import spill
from ..chains import Link, find_links
from ..sites import Site, walk_graphs
from ..version import __version__
from .apply import all_names


@dataclass(frozen=True)
class Region:
    """A link's feature-wise region as names that survive the rewrite: for each constant a region
    node reads, (that node's first output, input position, the constant's name, its value)."""

    a: int
    b: int
    constants: tuple[tuple[str, int, str, np.ndarray], ...]


@dataclass(frozen=True)
class Fold:
    end: str  # "inputs" (into the layer before the chain) or "order" (into the layer after it)
    neighbour: str  # that layer's node name

    def describe(self) -> str:
        what = "input order" if self.end == "inputs" else "output order"
        return f"{what} into '{self.neighbour}'"


def regions(sites: list[Site]) -> list[Region]:
    """The links between any two sites of the model, read before the rewrite changes the graphs."""
    candidates = [i for i, s in enumerate(sites) if s.weight is not None and s.weight.ndim == 2]
    out = []
    for link in find_links(sites, candidates) if len(candidates) > 1 else []:
        out.append(Region(link.a, link.b, tuple(_constants(sites[link.a], link))))
    return out


def _constants(site: Site, link: Link):
    for index in link.nodes:
        node = site.graph.node[index]
        for position, name in enumerate(node.input):
            if name in link.constants:
                value = site.constant(name)
                if value is not None and np.asarray(value).size > 1:
                    yield node.output[0], position, name, np.asarray(value)


def fold_neighbours(model: onnx.ModelProto, sites: list[Site], found: list[Region],
                    chains: dict[int, tuple[list[int], dict[str, str]]], untouched=frozenset()) -> dict[int, list[Fold]]:
    """Fold what can be folded; ``chains`` is {job: (its site indices, Emitter.ends)} for every chain
    written; ``untouched``: sites whose weights must stay as they are (left out by --include or
    --exclude). Returns {job: the folds made}."""
    written = {i for indices, _ in chains.values() for i in indices}
    found = [r for r in found if sites[r.a].scope == "main" and sites[r.b].scope == "main"]
    before = {r.b: r for r in found if r.a not in written and r.a not in untouched}
    after = {r.a: r for r in found if r.b not in written and r.b not in untouched}
    folds: dict[int, list[Fold]] = {}
    for job, (indices, ends) in chains.items():
        first, last = sites[indices[0]], sites[indices[-1]]
        made = []
        if "inputs" in ends and indices[0] in before:
            region = before[indices[0]]
            if _fold_inputs(model, sites[region.a], first, region, ends["inputs"]):
                made.append(Fold("inputs", sites[region.a].name))
        if "order" in ends and indices[-1] in after:
            region = after[indices[-1]]
            if _fold_order(model, last, sites[region.b], region, ends["order"]):
                made.append(Fold("order", sites[region.b].name))
        if made:
            folds[job] = made
    return folds


# -------------------------------------------------------------------------------- the two ends

def _fold_inputs(model, dense: Site, first: Site, region: Region, gathered: str) -> bool:
    g, gather, index = _start(first, gathered, dense.weight.shape[1])
    if index is None:
        return False
    # back from the Gather to the chain's input: the rewrite's views of it only (rows, flatten)
    axis, tensor, reader = _axis(gather, first.activation_rank), gather.input[0], gather
    while tensor != first.activation:
        node = g.producer(tensor)
        if node is None or len(g.readers(tensor)) != 1 or g.readers(tensor)[0] is not reader:
            return False
        axis = _through_view(node, axis)
        if axis is None:
            return False
        reader, tensor = node, node.input[0]
    if axis != -1 or any(r is not reader and r.op_type != "Shape" for r in g.readers(tensor)):
        return False
    node = g.producer(dense.node.output[0])
    if node is None or not _dense_ready(g, dense, node):
        return False
    bias = None
    if dense.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and dense.beta != 0.0:
        bias = g.value(node.input[2])
        if bias is None:
            return False
    _set_constant(model, g, node, 1, _columns(g.value(node.input[1]), index, dense.trans_b))
    if bias is not None and bias.size > 1:
        _set_constant(model, g, node, 2, np.take(bias, index, axis=-1))
    _permute_region(model, g, region, index)
    _tag(model, node, f"output features reordered to the input order of the split '{first.name}' "
                      f"(the Gather that lined them up is folded here)")
    g.bypass(gather)
    return True


def _fold_order(model, last: Site, dense: Site, region: Region, gathered: str) -> bool:
    g, gather, index = _start(last, gathered, last.weight.shape[1])
    if index is None:
        return False
    inverse = np.argsort(index).astype(np.int64)
    # forward from the Gather to the chain's output: views, alpha and the chain's bias
    axis, tensor, scaled = _axis(gather, 2 if last.op_type == "Gemm" else last.activation_rank), gathered, []
    while tensor != last.output:
        readers = g.readers(tensor)
        if len(readers) != 1 or tensor in g.outputs or axis is None:
            return False
        node = readers[0]
        if node.op_type in ("Add", "Mul", "Sub", "Div") and node.input[0] == tensor and len(node.input) == 2:
            value = g.value(node.input[1])
            if value is None or not _along(value, axis, index.size):
                return False
            if value.size > 1:
                scaled.append((node, np.take(value, inverse, axis=value.ndim + axis)))
        else:
            axis = _through_view(node, axis)
        tensor = node.output[0]
    target = g.producer(dense.node.output[0])
    if axis != -1 or target is None or not _dense_ready(g, dense, target):
        return False
    for node, value in scaled:
        _set_constant(model, g, node, 1, value)
    _set_constant(model, g, target, 1, _rows(g.value(target.input[1]), inverse, dense.trans_b))
    _permute_region(model, g, region, inverse)
    _tag(model, target, f"input features reordered to the output order of the split '{last.name}' "
                        f"(the Gather that restored it is folded here)")
    g.bypass(gather)
    return True


# -------------------------------------------------------------------------------- helpers

class _Graph:
    """Lookups on one graph as it is now (after the rewrite)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.by_output = {o: n for n in graph.node for o in n.output if o}
        self.reading: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in set(node.input):
                self.reading.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return self.by_output.get(tensor)

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        return self.reading.get(tensor, [])

    def value(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name)
        return None if t is None or name in self.inputs else spill.array(t)  # (read from the run's spill)

    def bypass(self, node: onnx.NodeProto) -> None:
        """Remove the Gather ``node`` (its readers read its data input instead) and its indices if
        nothing else reads them. Last step of a fold: references into the graph do not survive it."""
        source, out, indices = node.input[0], node.output[0], node.input[1]
        producer = self.producer(source)
        if producer is not None and len(self.readers(source)) == 1 and source not in self.outputs:
            producer.output[list(producer.output).index(source)] = out  # the name readers know stays
        else:
            for reader in self.readers(out):
                for i, name in enumerate(reader.input):
                    if name == out:
                        reader.input[i] = source
        self.graph.node.remove(node)
        if len(self.readers(indices)) == 1 and indices in self.initializers and indices not in self.inputs:
            self.graph.initializer.remove(self.initializers.pop(indices))


def _start(site: Site, gathered: str, size: int):
    """(the site's graph as it is now, the Gather writing ``gathered``, its indices if they are a
    permutation of ``size`` features, else None)."""
    g = _Graph(site.graph)
    gather = g.producer(gathered)
    return g, gather, _permutation(g, gather, size)


def _permutation(g: _Graph, gather, size: int) -> np.ndarray | None:
    """The Gather's constant indices if they are a permutation of ``size`` features."""
    if gather is None or gather.op_type != "Gather" or len(gather.input) != 2:
        return None
    index = g.value(gather.input[1])
    if index is None or index.ndim != 1 or index.size != size:
        return None
    index = index.astype(np.int64)
    return index if np.array_equal(np.sort(index), np.arange(size)) else None


def _axis(gather, rank: int | None) -> int | None:
    """The Gather's axis counted from the end (its data is 2-D when it gathers rows)."""
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    if axis < 0:
        return axis
    if axis == 0:
        return -2  # the rows view [K, M]
    return axis - rank if rank is not None else None


def _through_view(node, axis: int) -> int | None:
    """The feature axis on the other side of a 2-D Transpose or a Reshape that keeps the last axis
    (the rewrite's own views), or None for any other node."""
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return {-1: -2, -2: -1}.get(axis) if perm == [1, 0] else None
    if node.op_type == "Reshape" and axis == -1:
        return -1
    return None


def _along(value: np.ndarray, axis: int, n: int) -> bool:
    """A scalar, or one value per feature along ``axis`` (counted from the end)."""
    if value.size == 1:
        return True
    if value.ndim < -axis:
        return False
    return all(d == (n if i == value.ndim + axis else 1) for i, d in enumerate(value.shape))


def _dense_ready(g: _Graph, site: Site, node) -> bool:
    """The neighbour's weight is a 2-D initializer of this graph (not a graph input), read as it is
    stored (no producers folded into it)."""
    if site.weight_producers or len(node.input) < 2:
        return False
    value = g.value(node.input[1])
    return value is not None and value.ndim == 2


def _columns(stored: np.ndarray, index: np.ndarray, trans_b: bool) -> np.ndarray:
    return stored[index, :] if trans_b else stored[:, index]


def _rows(stored: np.ndarray, index: np.ndarray, trans_b: bool) -> np.ndarray:
    return stored[:, index] if trans_b else stored[index, :]


def _set_constant(model, g: _Graph, node, position: int, value: np.ndarray) -> None:
    """``node``'s input ``position`` becomes ``value``: the initializer itself when nothing else in
    the model reads it, else a copy under a new name."""
    name = node.input[position]
    tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
    if _read_once(model, name) and name in g.initializers:
        g.initializers[name].CopyFrom(tensor)
        return
    new = _unique(model, f"{name}/onnx_split_order")
    tensor.name = new
    g.graph.initializer.append(tensor)
    g.initializers[new] = g.graph.initializer[-1]
    node.input[position] = new


def _permute_region(model, g: _Graph, region: Region, index: np.ndarray) -> None:
    for output, position, _, value in region.constants:
        node = g.producer(output)
        if node is not None:
            current = g.value(node.input[position])
            value = current if current is not None else value
            _set_constant(model, g, node, position, np.take(value, index, axis=-1))


def _read_once(model, name: str) -> bool:
    count = 0
    for _, graph in walk_graphs(model.graph):
        for node in graph.node:
            count += list(node.input).count(name)
        if any(o.name == name for o in graph.output):
            return False
    return count == 1


def _unique(model, base: str) -> str:
    names = all_names(model.graph)
    unique, i = base, 1
    while unique in names:
        unique, i = f"{base}_{i}", i + 1
    return unique


def _tag(model, node, what: str) -> None:
    note = f"onnx_split {__version__}: {what}"
    node.doc_string = f"{node.doc_string}\n{note}" if node.doc_string else note
    if model.ir_version >= 10:
        node.metadata_props.add(key="onnx_split.folded", value=what)
