"""The shapes a chain's feature-wise Reshapes define, kept through the rewrite.

Inside a chain every lane runs on the rows of the chain's input (x as it is, or the columns of
x^T), and a feature-wise Reshape (chains.py: it keeps the last axis, so it only merges or splits
leading axes) moves nothing there: the lanes skip it. What it changes is the shape of the tensors
after it, which two kinds of readers see:

- Shape nodes reading a tensor inside the chain (HF GPT-2 reads ``x.size()`` of the activation
  between its two Conv1D layers to shape the output). That tensor no longer exists, so the Shape
  node is replaced, at its own place in the graph, by nodes computing the same value: the shape of
  a *carrier* with that tensor's leading dims, with the last dim set to the layer's width;
- the chain's output, when its shape is not the [rows, width] the lanes end with.

The carrier is x[..., 0:1] of the chain's input (one column: the only data copied), reshaped by
each Reshape of the way with its target's last element set to 1; a Reshape keeps the rows in order,
so the carrier's leading dims are the tensor's. Its nodes are written once per chain and Reshape,
where first needed; they never go into a function body (their values are read outside it).
"""
from __future__ import annotations

import numpy as np
import onnx

from ..chains import Chain
from .emit import Emitter


def needed(chain: Chain) -> bool:
    """Whether ``chain`` has a feature-wise Reshape on its way or a Shape reader inside."""
    return any(link.reshapes or link.shape_readers for link in chain.links)


def reshape_targets(chain: Chain) -> set[str]:
    """The shape inputs of the chain's feature-wise Reshapes (dropped with them if nothing else reads them)."""
    graph = chain.first.graph
    return {graph.node[i].input[1] for link in chain.links for i in link.nodes
            if graph.node[i].op_type == "Reshape"}


class ChainShapes:
    """The nodes that keep a chain's shapes: ``placed[i]`` go at node ``i`` of the chain's graph
    (a Shape reader's index: instead of it; the last site's: before the chain's own nodes)."""

    def __init__(self, chain: Chain, opset: int, taken: set[str], layout: str, ir_version: int):
        self.chain = chain
        self.em = Emitter(chain.first.name, opset, taken, layout, ir_version)
        self.placed: dict[int, list[onnx.NodeProto]] = {}
        self.carrier_nodes: list[onnx.NodeProto] = []
        """The nodes of every carrier, in order: what a model of the chain alone needs when the
        output is restored from a carrier."""
        self.restored_from_carrier = False
        self._carriers: dict[tuple[int, ...], str] = {}
        self._prefix = []  # per link: the Reshapes of the links before it
        done: tuple[int, ...] = ()
        for link in chain.links:
            self._prefix.append(done)
            done = done + link.reshapes
        self._all = done

    @property
    def initializers(self) -> list[onnx.TensorProto]:
        return self.em.initializers

    def write_readers(self) -> None:
        """Replace every Shape reader inside the chain by nodes computing its value."""
        graph = self.chain.first.graph
        readers = sorted((index, self._prefix[layer] + segment, self.chain.sites[layer].weight.shape[1])
                         for layer, link in enumerate(self.chain.links) for index, segment in link.shape_readers)
        for index, key, width in readers:  # graph order: a carrier is written before its first reader
            node = graph.node[index]
            start = len(self.em.nodes)
            self.em.at(node.name or node.output[0])
            carrier = self._carrier(key)
            doc = f"the value of Shape '{node.name or node.output[0]}' (its tensor is computed by parts)"
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if "start" in attrs or "end" in attrs:
                full = self._shape_of(carrier, width, doc)
                end = attrs.get("end", np.iinfo(np.int64).max)
                self.em.node("Slice", [full, self.em.ints("shape/start", [attrs.get("start", 0)]),
                                       self.em.ints("shape/end", [end]), self.em.ints("shape/axes", [0])],
                             "shape/range/Slice", doc, output=node.output[0])
            else:
                self._shape_of(carrier, width, doc, output=node.output[0])
            self.placed.setdefault(index, []).extend(self.em.nodes[start:])

    def restore(self, em: Emitter, y: str) -> str:
        """``y``, the lanes' joined output (with the leading dims of the chain's input), in the
        shape of the last site's output."""
        first, last = self.chain.first, self.chain.last
        if not self._all:
            return y  # no Reshape on the way: the leading dims are the input's, as the forms keep them
        rank_in = 2 if first.op_type == "Gemm" else first.activation_rank
        rank_out = 2 if last.op_type == "Gemm" else last.activation_rank
        n = last.weight.shape[1]
        em.at(last.name)
        doc = f"the output shape of '{last.name}' (the Reshapes on the way changed the leading dims)"
        if rank_out == 2:
            if rank_in == 2:
                return y
            shape = em.ints("shape/out", [-1, n])
        else:
            start = len(self.em.nodes)
            self.em.at(last.name)
            carrier = self._carrier(self._all)
            self.placed.setdefault(last.index, []).extend(self.em.nodes[start:])
            self.restored_from_carrier = True
            lead = em.slice(em.node("Shape", [carrier], "shape/out/Shape", doc), 0, -1, 0, "shape/out/lead", doc)
            shape = em.node("Concat", [lead, em.ints("shape/out/width", [n])], "shape/out/Concat", doc, axis=0)
        return em.reshape(y, shape, "shape/out/Reshape", doc)

    def _shape_of(self, carrier: str, width: int, doc: str, output: str | None = None) -> str:
        em = self.em
        lead = em.slice(em.node("Shape", [carrier], "shape/Shape", doc), 0, -1, 0, "shape/lead", doc)
        return em.node("Concat", [lead, em.ints("shape/width", [width])], "shape/Concat", doc, axis=0, output=output)

    def _carrier(self, key: tuple[int, ...]) -> str:
        """A tensor with the leading dims of the tensors after the Reshapes ``key`` and a last dim of 1."""
        if key in self._carriers:
            return self._carriers[key]
        em, first = self.em, self.chain.first
        start = len(em.nodes)
        if not key:
            doc = f"one column of the input of '{first.name}': it carries the leading dims through the chain"
            name = em.slice(first.activation, 0, 1, em.axis(first.activation_rank, -1), "shape/carrier", doc)
        else:
            previous = self._carrier(key[:-1])
            start = len(em.nodes)
            node = first.graph.node[key[-1]]
            doc = f"the leading dims after Reshape '{node.name or node.output[0]}'"
            value = first.constant(node.input[1])
            if value is not None:
                target = np.asarray(value, dtype=np.int64).reshape(-1).copy()
                target[-1] = 1
                shape = em.ints("shape/carrier_shape", target)
            else:
                lead = em.slice(node.input[1], 0, -1, 0, "shape/carrier_lead", doc)
                shape = em.node("Concat", [lead, em.ints("shape/one", [1])], "shape/carrier_shape", doc, axis=0)
            name = em.node("Reshape", [previous, shape], "shape/carrier/Reshape", doc,
                           attributes=[a for a in node.attribute if a.name == "allowzero"])
        self.carrier_nodes.extend(em.nodes[start:])
        self._carriers[key] = name
        return name
