"""Find MatMul/Gemm nodes whose weight is a constant; normalise them to ``y = x @ W [* alpha] + bias``.

Every MatMul and Gemm of the default domain, in the main graph and in subgraphs (If/Loop/Scan
bodies), ends here either as a :class:`Site` with ``reason is None`` (a candidate) or with the
reason it is kept as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from . import spill
from .errors import first_line
from .protos import without_weights

SUPPORTED_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}
MIN_OPSET = 7
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}
_QUANTIZED = {"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"}
"""Ops whose presence in a weight's producer chain means the weight is stored quantized."""
_LOW_BIT_INTS = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
_MAX_FOLD_DEPTH = 16
_NOT_CONSTANT = " is not constant: "
_TOO_DEEP = "producer chain deeper than"
BETWEEN_ACTIVATIONS = "between two activations (attention-style): not a candidate"
"""The reason of a MatMul/Gemm whose right operand is computed at run time from the graph's inputs
(attention's Q @ K^T and P @ V): one short reason, the same for every such site, so the report can
count them on one line."""


@dataclass
class Site:
    """One MatMul/Gemm node. ``reason`` is None for a candidate, else why it is kept."""

    node: onnx.NodeProto
    graph: onnx.GraphProto
    scope: str  # "main" or the path of the subgraph, e.g. "loop/body"
    index: int  # position of the node in ``graph.node``
    name: str  # display name, the base of every new name
    op_type: str
    reason: str | None = None
    activation: str = ""
    weight_name: str = ""
    weight: np.ndarray | None = None  # [K, N], oriented so that y = x @ weight
    trans_a: bool = False
    trans_b: bool = False  # the stored weight is W^T (Gemm transB); ``weight`` is already W
    alpha: float = 1.0
    beta: float = 1.0
    bias: str | None = None  # name of Gemm's C
    bias_value: np.ndarray | None = None  # C's value when it is a constant
    activation_rank: int | None = None
    activation_rows: int | None = None  # rows M of the activation seen as [M, K], when static
    weight_producers: list[int] = field(default_factory=list)  # node indices folded into the weight
    constant: Callable[[str], np.ndarray | None] = field(default=lambda name: None, repr=False, compare=False)
    """The value of a tensor visible from this site's graph if it is a constant, else None."""
    shape_of: Callable[[str], list[int | None] | None] = field(default=lambda name: None, repr=False, compare=False)
    """The shape of a tensor visible from this site's graph as shape inference tells it (None for a
    dynamic dim), or None if it does not."""
    released: tuple[tuple[int, ...], np.dtype] | None = field(default=None, repr=False, compare=False)
    """The weight's shape and dtype once :func:`release_weights` let the weight go."""
    forget: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)
    """Lets go of the values read while finding the sites (their resolver's cache)."""

    @property
    def output(self) -> str:
        return self.node.output[0]

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self.weight is None:
            return None if self.released is None else self.released[0]
        return tuple(int(d) for d in self.weight.shape)

    @property
    def weight_dtype(self) -> np.dtype | None:
        if self.weight is None:
            return None if self.released is None else self.released[1]
        return self.weight.dtype


def release_weights(sites: list[Site]) -> None:
    """Let go of every site's weight array (its shape and dtype stay readable), and of the constants
    read to find them: once the rewrite has cut the parts, the weights are in the models, and the
    verification and timing that follow need the memory."""
    for site in sites:
        if site.weight is not None:
            site.released = (site.shape, site.weight.dtype)
            site.weight = None
        site.forget()


@dataclass
class _Scope:
    name: str
    graph: onnx.GraphProto
    producers: dict[str, int]
    initializers: dict[str, onnx.TensorProto]
    inputs: set[str]

    @classmethod
    def of(cls, name: str, graph: onnx.GraphProto, stored: onnx.GraphProto | None = None) -> "_Scope":
        """``stored``: the graph whose initializers are this one's (``graph`` has none of its own)."""
        producers = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
        initializers = (graph if stored is None else stored).initializer
        return cls(name, graph, producers, {t.name: t for t in initializers}, {i.name for i in graph.input})


class _Resolver:
    """Answers "is this tensor a constant, and what is its value" across nested scopes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.opsets = list(model.opset_import)
        self._cache: dict[tuple[str, str], tuple[np.ndarray | None, str | None, list[int]]] = {}
        self._quantized: dict[tuple[str, str], str] = {}
        """(scope, tensor) -> the quantizing node of its producer chain, for folded tensors"""

    def forget(self) -> None:
        self._cache.clear()

    def quantized(self, name: str, scopes: list[_Scope]) -> str | None:
        """The DequantizeLinear (or similar) node a folded constant ``name`` comes from, or None."""
        for scope in scopes:
            if name in scope.producers:
                return self._quantized.get((scope.name, name))
            if name in scope.inputs or name in scope.initializers:
                return None
        return None

    def value(self, name: str, scopes: list[_Scope], depth: int = 0):
        """(array or None, reason if not constant, producer node indices in the innermost scope)."""
        for level, scope in enumerate(scopes):
            key = (scope.name, name)
            if key not in self._cache:
                if name in scope.producers:
                    result = self._fold(name, scope, scopes[level:], depth)
                    if result[1] and _TOO_DEEP in result[1]:
                        return result  # depends on where the chain was entered: not cached
                    self._cache[key] = result
                elif name in scope.inputs:
                    where = "graph input" if level == len(scopes) - 1 else "subgraph input"
                    extra = " with an initializer default" if name in scope.initializers else ""
                    if extra and self.model.ir_version < 4:
                        extra += " (IR version < 4 lists every weight as a graph input; export with IR >= 4 to split)"
                    self._cache[key] = (None, f"weight '{name}' is a {where}{extra}: it can change at run time", [])
                elif name in scope.initializers:
                    self._cache[key] = _read(scope.initializers[name])
                else:
                    continue
            value, reason, chain = self._cache[key]
            # producers found in an outer scope are not nodes of the site's graph
            return value, reason, (chain if level == 0 else [])
        return None, f"weight '{name}' is not defined in any enclosing graph", []

    def _fold(self, name: str, scope: _Scope, scopes: list[_Scope], depth: int):
        index = scope.producers[name]
        node = scope.graph.node[index]
        what = f"{node.op_type} node '{node.name or node.output[0]}'"
        if node.domain not in ("", "ai.onnx"):
            return None, f"weight '{name}' comes from custom-domain {what}", []
        if node.op_type in _NONDETERMINISTIC:
            return None, f"weight '{name}' comes from random {what}", []
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None, f"weight '{name}' comes from control-flow {what}", []
        if depth >= _MAX_FOLD_DEPTH:
            return None, f"weight '{name}' comes from a {_TOO_DEEP} {_MAX_FOLD_DEPTH}", []
        feeds, chain = {}, [index]
        for inp in node.input:
            if not inp:
                continue
            val, reason, sub = self.value(inp, scopes, depth + 1)
            if val is None:
                # the root cause only: nesting every step's reason made them O(depth) long, and the
                # pass O(nodes^2) in time and memory on a deep chain of layers
                return None, f"weight '{name}' is not constant: {reason.rsplit(_NOT_CONSTANT, 1)[-1]}", []
            feeds[inp] = val
            chain += sub
        source = _quantizing(node, feeds) or next(
            (q for q in (self.quantized(i, scopes) for i in node.input if i) if q), None)
        if source:
            self._quantized[(scope.name, name)] = source
        try:
            out = _run_node(node, feeds, self.opsets, self.model.ir_version)
        except Exception as exc:  # the reference evaluator raises many types
            return None, f"weight '{name}' could not be folded from {what}: {first_line(exc)}", []
        return out[list(node.output).index(name)], None, chain


def _all_finite(weight: np.ndarray) -> bool:
    with np.errstate(all="ignore"):  # a signalling NaN raises "invalid value" on the slightest touch
        return bool(np.isfinite(weight).all())


def _read(tensor: onnx.TensorProto):
    """An initializer's value, or why it cannot be read (a damaged tensor is kept, not a crash)."""
    try:
        return spill.array(tensor), None, []
    except Exception as exc:  # numpy and onnx raise several types for inconsistent data
        return None, f"weight '{tensor.name}' cannot be read: {first_line(exc, 120)}", []


def _quantizing(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> str | None:
    """``node`` as "<op> node '<name>'" if it dequantizes: a DequantizeLinear (or similar), or a Cast
    of an 8-bit-or-narrower integer tensor to a float type."""
    what = f"{node.op_type} node '{node.name or node.output[0]}'"
    if node.op_type in _QUANTIZED:
        return what
    if node.op_type == "Cast" and node.input and node.input[0] in feeds:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        try:
            src = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(feeds[node.input[0]]).dtype)
        except (KeyError, TypeError, ValueError):
            return None
        if src in _LOW_BIT_INTS and to in SUPPORTED_DTYPES:
            return what
    return None


def _run_node(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opsets, ir_version: int):
    from onnx.reference import ReferenceEvaluator

    inputs = [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    outputs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = onnx.helper.make_graph([node], "fold", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):  # folding NaN/inf: the value says so
        warnings.simplefilter("ignore", RuntimeWarning)
        return ReferenceEvaluator(model).run(None, feeds)


def _shapes(model: onnx.ModelProto, weights: onnx.ModelProto) -> dict[str, dict[str, list[int | None]]]:
    """{scope name: {tensor: shape}} (None for a dynamic dim) for every tensor shape inference can
    tell, from a copy that has the main graph's weight shapes (those of ``weights``) but not their data."""
    light = without_weights(model)
    for t in weights.graph.initializer:  # inference needs the shapes of weights, not their values
        light.graph.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
    try:
        light = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False)
    except Exception:  # shape inference is a help here, never a requirement
        pass
    shapes: dict[str, dict[str, list[int | None]]] = {}
    for scope_name, graph in walk_graphs(light.graph):
        known = shapes.setdefault(scope_name, {})
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                known[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for t in graph.initializer:
            known[t.name] = list(t.dims)
    return shapes


def subgraphs(graph: onnx.GraphProto, scope_name: str):
    """(node index, node, scope name, subgraph) for each subgraph attribute of the graph's nodes.

    Scope names read ``main/<node>/<attribute>``; a node without a name, or one whose name is
    already used in this graph, gets ``<op_type>#<index>`` so that every scope name is unique.
    """
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        label = node.name or f"{node.op_type}#{index}"
        if label in seen:
            label = f"{label}#{index}"
        seen.add(label)
        for attr, i, count, sub in node_graphs(node):
            suffix = attr.name if count == 1 else f"{attr.name}[{i}]"
            yield index, node, f"{scope_name}/{label}/{suffix}", sub


def node_graphs(node: onnx.NodeProto):
    """(attribute, position, count, subgraph) for every subgraph attribute of ``node``."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for i, sub in enumerate(graphs):
            yield attr, i, len(graphs), sub


def graphs_by_scope(model: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    """Every graph of ``model`` by the scope name its sites carry (``main``, ``main/If_0/then_branch``..)."""
    return dict(walk_graphs(model.graph))


def walk_graphs(graph: onnx.GraphProto, scope_name: str = "main", parent: str | None = None, *,
                with_parent: bool = False):
    """(scope name, graph) for ``graph`` and every subgraph below it, parents before children
    (with ``with_parent``: (scope name, graph, parent scope name or None))."""
    yield (scope_name, graph, parent) if with_parent else (scope_name, graph)
    for _, _, sub_name, sub in subgraphs(graph, scope_name):
        yield from walk_graphs(sub, sub_name, scope_name, with_parent=with_parent)


NAME_SCOPES = "pkg.torch.onnx.name_scopes"
"""The node metadata key where torch.onnx's dynamo exporter records the module hierarchy: the repr
of a list of cumulative module paths (``['', 'encoder', 'encoder.layer.0', ...]``), the last entry
usually the node's own FX name (``linear_3``)."""


def module_path(node: onnx.NodeProto) -> str | None:
    """The innermost module path of ``node``'s name-scope metadata (``encoder.layer.0.attention.self.query``),
    or None when there is none or it cannot be read. A last entry that does not extend the path
    before it (the FX node name) is not a module."""
    text = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
    if not text:
        return None
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = [part.strip().strip("'\"") for part in text.strip().strip("[]()").split(",")]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return None
    scopes = [str(v).strip() for v in value if isinstance(v, str) and str(v).strip()]
    if len(scopes) > 1 and not scopes[-1].startswith(scopes[-2] + "."):
        scopes = scopes[:-1]
    return scopes[-1] if scopes else None


def written_by_onnx_split(node: onnx.NodeProto) -> bool:
    """A node this pass wrote (its provenance doc string or metadata): never split again."""
    return node.doc_string.startswith("onnx_split ") or any(p.key == "onnx_split.site" for p in node.metadata_props)


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def runtime_tensors(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> set[str]:
    """The tensors of ``graph`` computed from a graph input (or, in a subgraph, from its own inputs
    or an outer tensor in ``outer``): values that can change at run time, so never constants.
    A node with a subgraph counts as reading every outer tensor its subgraphs name."""
    live = set(outer) | {i.name for i in graph.input}
    for node in graph.node:
        reads = [n for n in node.input if n]
        for _, _, _, sub in node_graphs(node):
            reads += _names_read(sub)
        if any(n in live for n in reads):
            live.update(o for o in node.output if o)
    return live


def _names_read(graph: onnx.GraphProto) -> list[str]:
    names = []
    for node in graph.node:
        names += [n for n in node.input if n]
        for _, _, _, sub in node_graphs(node):
            names += _names_read(sub)
    return names


def find_sites(model: onnx.ModelProto, *, min_elements: int = 0,
               weights: onnx.ModelProto | None = None) -> list[Site]:
    """Every MatMul/Gemm of the model, in graph order (subgraphs after their parent node).

    ``weights``: the model whose main-graph initializers hold the weights, where ``model`` is a copy
    of it without them (protos.without_weights: the pipeline's working copy until the rewrite)."""
    weights = model if weights is None else weights
    resolver = _Resolver(model)
    shapes = _shapes(model, weights)
    opset = default_opset(model)
    sites: list[Site] = []
    visible: dict[str, list[_Scope]] = {}  # scope -> its own scope, then the enclosing ones
    live: dict[str, set[str]] = {}  # scope -> tensors that can change at run time
    for scope_name, graph, parent in walk_graphs(model.graph, with_parent=True):
        scopes = visible[scope_name] = [_Scope.of(scope_name, graph, weights.graph if parent is None else None)] \
            + (visible[parent] if parent else [])
        live[scope_name] = runtime_tensors(graph, frozenset(live[parent]) if parent else frozenset())
        for index, node in enumerate(graph.node):
            if node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm"):
                site = Site(node=node, graph=graph, scope=scope_name, index=index,
                            name=node.name or node.output[0], op_type=node.op_type)
                site.constant = lambda name, scopes=scopes: resolver.value(name, scopes)[0]
                site.forget = resolver.forget
                site.shape_of = lambda name, scopes=scopes: next(
                    (shapes[sc.name][name] for sc in scopes if name in shapes.get(sc.name, {})), None)
                _describe(site, scopes, resolver, shapes, opset, min_elements, live[scope_name])
                sites.append(site)
    return sites


def _describe(site: Site, scopes, resolver: _Resolver, shapes, opset: int, min_elements: int,
              live: set[str] = frozenset()) -> None:
    node = site.node
    if written_by_onnx_split(node):
        site.reason = "written by onnx_split (a part of an earlier split)"
        return
    if opset < MIN_OPSET:
        site.reason = f"opset {opset} is older than {MIN_OPSET}; not supported"
        return
    if len(node.input) < 2:
        site.reason = f"{node.op_type} has fewer than two inputs"
        return
    a_name, b_name = node.input[0], node.input[1]
    produced = not any(b_name in sc.inputs for sc in scopes)  # a graph input has its own reason
    if a_name in live and b_name in live and produced:  # no folding: it could never be a constant
        site.reason = f"{node.op_type} {BETWEEN_ACTIVATIONS}"
        return
    a_val, _, _ = resolver.value(a_name, scopes)
    b_val, b_reason, chain = resolver.value(b_name, scopes)
    if a_val is not None and b_val is not None:
        site.reason = "both operands are constant (a constant-folding case, not a split)"
        return
    quantized = resolver.quantized(b_name, scopes)
    if b_val is None and quantized is not None and a_val is None:
        site.reason = f"weight is quantized (it comes from {quantized}): kept as it is"
        return
    if b_val is None:
        if a_val is not None:
            site.reason = f"the constant is the left operand ({node.op_type}(W, x)); only x·W is split"
        else:
            site.reason = b_reason
        return
    site.activation, site.weight_name, site.weight_producers = a_name, b_name, chain
    shape = next((shapes[sc.name][a_name] for sc in scopes if a_name in shapes.get(sc.name, {})), None)
    site.activation_rank = None if shape is None else len(shape)
    if shape is not None and all(d is not None for d in shape[:-1]):
        site.activation_rows = int(np.prod(shape[:-1], dtype=np.int64))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = b_val
    if node.op_type == "Gemm":
        site.trans_b = bool(attrs.get("transB", 0))
        if weight.ndim == 2 and site.trans_b:
            weight = weight.T
        site.trans_a = bool(attrs.get("transA", 0))
        site.alpha = float(attrs.get("alpha", 1.0))
        site.beta = float(attrs.get("beta", 1.0))
        site.activation_rank = 2
        if shape is not None and len(shape) == 2 and shape[-1 if site.trans_a else 0] is not None:
            site.activation_rows = int(shape[-1 if site.trans_a else 0])
        if len(node.input) > 2 and node.input[2]:
            site.bias = node.input[2]
            site.bias_value = resolver.value(site.bias, scopes)[0]
    site.weight = weight
    dtype = onnx.helper.np_dtype_to_tensor_dtype(weight.dtype)
    if site.reason:
        return
    if quantized is not None:
        site.reason = (f"weight is quantized (it comes from {quantized}): splitting would fold it to "
                       f"{np.dtype(weight.dtype).name} and lose the quantization")
    elif dtype not in SUPPORTED_DTYPES:
        site.reason = (f"weight dtype {onnx.TensorProto.DataType.Name(dtype).lower()} is not supported "
                       f"({', '.join(SUPPORTED_DTYPES.values())})")
    elif weight.ndim != 2:
        site.reason = f"weight has shape {list(weight.shape)}; only 2-D weights are split"
    elif weight.size < min_elements:
        site.reason = f"weight has {weight.size} elements, below --min-elements {min_elements}"
    elif site.activation_rank == 0:
        site.reason = "activation is a scalar"
    elif not _all_finite(weight):
        site.reason = "weight holds NaN or infinite values: no split of it can be checked against the original"
