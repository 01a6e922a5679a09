"""Node emission shared by the layouts: unique names under the site, opset-appropriate op forms."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..version import __version__


def is_run(index: np.ndarray) -> bool:
    """True when ``index`` is a contiguous ascending run (a Slice can take it)."""
    return bool(index.size) and np.array_equal(index, np.arange(index[0], index[0] + index.size))


def tag(node: onnx.NodeProto, source: onnx.NodeProto | None, ir_version: int, own) -> None:
    """``source``'s metadata on a node that replaces it (its own ``onnx_split.*`` keys excepted),
    then onnx_split's ``own`` (key, value) tags and version where node metadata exists (IR >= 10)."""
    if source is not None:
        for prop in source.metadata_props:
            if not prop.key.startswith("onnx_split."):
                node.metadata_props.add(key=prop.key, value=prop.value)
    if ir_version >= 10:  # node metadata exists from IR 10 on; Netron shows it
        for key, value in (*own, ("onnx_split.version", __version__)):
            node.metadata_props.add(key=key, value=value)


class Unsupported(Exception):
    """A layout cannot express this site; the message is the reason it is kept."""


class Emitter:
    """Collects the nodes and initializers that replace one site.

    Every name is ``<site>/split/<local>``, made unique against ``taken`` (all names in the model).
    Every node carries the metadata of the original node it replaces (``source``: the exporter's
    name scopes, ...), then onnx_split's own provenance tags.
    """

    def __init__(self, base: str, opset: int, taken: set[str], layout: str, ir_version: int = 0,
                 source: onnx.NodeProto | None = None):
        self.site = base
        self.base = f"{base}/split"
        self.source = source
        self.opset = opset
        self.ir_version = ir_version
        self.taken = taken
        self.layout = layout
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.gathers = 0  # Gather nodes on activations (set when the layout is complete)
        self.shapes = None  # a chain's shapes.ChainShapes, when its Reshapes or Shape readers need one
        self.functions: list[onnx.FunctionProto] = []  # model-local functions a form's nodes call
        self.ends: dict[str, str] = {}
        """``inputs``/``order``: the output of the one Gather that lines up all of the chain's inputs,
        or that puts all of its outputs in order, where a single Gather does (neighbours.py folds
        such a permutation into a dense layer next to the chain)."""

    def at(self, base: str, source: onnx.NodeProto | None = None) -> None:
        """Name what follows under another node (a later layer of a chain, a cloned activation),
        and give it ``source``'s metadata."""
        self.site = base
        self.base = f"{base}/split"
        self.source = source

    def name(self, local: str) -> str:
        candidate = f"{self.base}/{local}"
        unique, i = candidate, 1
        while unique in self.taken:
            unique, i = f"{candidate}_{i}", i + 1
        self.taken.add(unique)
        return unique

    def const(self, local: str, value: np.ndarray) -> str:
        name = self.name(local)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, local: str, values) -> str:
        return self.const(local, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], local: str, doc: str, *, output: str | None = None,
             attributes=(), **attrs) -> str:
        node_name = self.name(local)
        out = output if output is not None else self.name(f"{local}_out")
        node = onnx.helper.make_node(op, inputs, [out], name=node_name, **attrs)
        node.attribute.extend(attributes)
        node.doc_string = f"onnx_split {__version__} ({self.layout} layout): {doc}"
        tag(node, self.source, self.ir_version, (("onnx_split.site", self.site), ("onnx_split.layout", self.layout)))
        self.nodes.append(node)
        return out

    # -- opset-appropriate forms --------------------------------------------------------------

    def axis(self, rank: int | None, axis: int = -1) -> int:
        """``axis`` as a node attribute: negative axes need opset 11, older opsets need the rank."""
        if self.opset >= 11:
            return axis
        if rank is None:
            raise Unsupported(f"activation rank is unknown and opset {self.opset} < 11 needs it")
        return axis % rank

    def slice(self, x: str, start: int, end: int, axis: int, local: str, doc: str) -> str:
        if self.opset >= 10:
            inputs = [x, self.ints(f"{local}_starts", [start]), self.ints(f"{local}_ends", [end]),
                      self.ints(f"{local}_axes", [axis])]
            return self.node("Slice", inputs, local, doc)
        return self.node("Slice", [x], local, doc, starts=[start], ends=[end], axes=[axis])

    def split(self, x: str, parts: int, axis: int, local: str, doc: str) -> list[str]:
        """``parts`` equal pieces of ``x`` along ``axis`` (a non-negative axis), in one Split node:
        opset 18 names the count (``num_outputs``), older opsets split equally when given no sizes."""
        node_name = self.name(local)
        outs = [self.name(f"{local}_out{i}") for i in range(parts)]
        attrs = {"axis": axis, **({"num_outputs": parts} if self.opset >= 18 else {})}
        node = onnx.helper.make_node("Split", [x], outs, name=node_name, **attrs)
        node.doc_string = f"onnx_split {__version__} ({self.layout} layout): {doc}"
        tag(node, self.source, self.ir_version, (("onnx_split.site", self.site), ("onnx_split.layout", self.layout)))
        self.nodes.append(node)
        return outs

    def take(self, x: str, index: np.ndarray, axis: int, rank: int | None, local: str, doc: str,
             size: int | None = None, end: str | None = None) -> str:
        """x[..., index] along ``axis``: nothing when ``index`` is all of ``size``, a Slice when it
        is a contiguous run, else a Gather (recorded in :attr:`ends` under ``end``, if given)."""
        index = np.asarray(index, dtype=np.int64)
        if size is not None and np.array_equal(index, np.arange(size)):
            return x
        ax = self.axis(rank, axis)
        if is_run(index):
            return self.slice(x, int(index[0]), int(index[0] + index.size), ax, f"{local}/Slice", doc)
        out = self.node("Gather", [x, self.ints(f"{local}/indices", index)], f"{local}/Gather", doc, axis=ax)
        if end is not None:
            self.ends[end] = out
        return out

    def reshape(self, x: str, shape: str, local: str, doc: str) -> str:
        return self.node("Reshape", [x, shape], local, doc)  # the shape input form: opset >= 5

    def finish_gemm(self, y: str, site) -> str:
        """Apply Gemm's alpha and beta * C to the x @ W result."""
        if site.alpha != 1.0:
            alpha = self.const("alpha", np.asarray(site.alpha, dtype=site.weight.dtype))
            y = self.node("Mul", [y, alpha], "alpha/Mul", f"alpha = {site.alpha} of Gemm '{site.name}'")
        if site.bias is not None and site.beta != 0.0:
            y = self.node("Add", [y, self._bias(site)], "bias/Add", f"beta * C of Gemm '{site.name}'")
        return y

    def rename_output(self, old: str, new: str) -> None:
        """Give the final tensor the site's original output name, so consumers are untouched."""
        self.taken.discard(old)
        for node in self.nodes:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    def _bias(self, site) -> str:
        dtype = site.weight.dtype
        if site.bias_value is not None:
            value = site.bias_value
            if site.beta != 1.0:
                value = (np.asarray(site.beta, dtype=dtype) * value).astype(dtype)
            return self.const("bias", value)
        if site.beta == 1.0:
            return site.bias
        return self.node("Mul", [site.bias, self.const("beta", np.asarray(site.beta, dtype=dtype))],
                         "beta/Mul", f"beta = {site.beta} of Gemm '{site.name}'")


def rows_view(em: Emitter, site, k: int) -> str:
    """The activation as x^T [K, M], whose inputs are rows: selecting them is a contiguous copy per
    input (cheap), where selecting columns of x [M, K] copies element by element (slow in ORT)."""
    x, rank = site.activation, site.activation_rank
    if site.trans_a:
        return x  # Gemm's A is already [K, M]
    if rank != 2:
        x = em.reshape(x, em.ints("flat_shape", [-1, k]), "flatten/Reshape", "the activation as rows [M, K]")
    return em.node("Transpose", [x], "to_rows/Transpose", "x^T: one row per input feature", perm=[1, 0])


def from_rows_view(em: Emitter, yt: str, site, n: int) -> str:
    """y^T [N, M] back to the shape of the original output."""
    y = em.node("Transpose", [yt], "from_rows/Transpose", "back from y^T", perm=[1, 0])
    if site.activation_rank == 2 or site.op_type == "Gemm":
        return y
    x = site.activation
    lead = em.node("Shape", [x], "shape/Shape", "leading dims of the activation")
    lead = em.slice(lead, 0, -1, 0, "shape/Slice", "leading dims of the activation")
    shape = em.node("Concat", [lead, em.ints("shape/N", [n])], "shape/Concat", "output shape", axis=0)
    return em.reshape(y, shape, "unflatten/Reshape", "restore the leading dims")
