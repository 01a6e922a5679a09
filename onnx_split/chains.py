"""Find split sites that feed each other through feature-wise ops only: the layers of one network
that can become several independent networks.

A *link* joins site A to site B when A's output reaches B's activation only through a region of
element-wise nodes whose other operands are constants that are scalars or per-feature vectors
(Relu, Gelu or its Erf pattern, a bias Add, a scale Mul, Cast, Dropout in inference, ...), and
nothing else reads any tensor of that region. Such a region can be run per part, on the part's
features, with its constants cut to those features. Anything that mixes features (LayerNorm,
Softmax, a Reshape that changes the last axis) or any other reader (a graph output, a second
consumer) ends the chain.

Two shape ops keep the feature axis and are part of a region too (HF GPT-2's Conv1D exports as
Gemm between them):

- a *feature-wise Reshape*: its target provably keeps the last axis at the layer's width (a
  constant target whose last element is it, or a target computed at run time, e.g. a Concat of
  Shape/Gather dims, whose last element is the constant width or the last dim of a tensor of the
  region), so it only merges or splits leading axes: on the [rows, features] view the parts run
  on it moves nothing;
- a *Shape reader* of a region tensor (its value is recomputed by the rewrite, rewrite/shapes.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .sites import Site, node_graphs, walk_graphs

UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Elu", "Selu", "Celu", "Softplus",
                   "Softsign", "HardSigmoid", "HardSwish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Mish",
                   "Cast", "Identity", "Dropout"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "PRelu"})
SCALAR_ONLY = frozenset({"Clip"})  # inputs after the first must be scalar constants
POWER = frozenset({"Pow"})  # the region as base, a constant scalar exponent that is a whole number >= 0
PASS_THROUGH = frozenset({"Identity", "Dropout"})  # no node is written for these
FEATURE_WISE = UNARY | BINARY | SCALAR_ONLY | POWER
RESHAPE = "Reshape"
"""A feature-wise Reshape is a no-op on the [rows, features] view every lane runs on."""
SHAPE = "Shape"


@dataclass
class Link:
    """The feature-wise region between two sites: ``nodes`` in graph order, the region's
    ``start`` (A's output) and ``end`` (B's activation), and the value of every constant it reads
    (each a scalar or one value per feature)."""

    a: int  # index of site A in the site list
    b: int
    nodes: list[int]  # indices into the graph's node list
    start: str
    end: str
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    reshapes: tuple[int, ...] = ()
    """The feature-wise Reshape nodes on the way from ``start`` to ``end``, in order."""
    shape_readers: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """(Shape node, the feature-wise Reshapes on the way to the tensor it reads) for every Shape
    node reading a tensor of the region: the rewrite computes their values from the chain's input."""


@dataclass
class Chain:
    """Sites that run as one set of sub-networks, in order, with the links between them."""

    sites: list[Site]
    links: list[Link]

    @property
    def name(self) -> str:
        return " -> ".join(s.name for s in self.sites)

    @property
    def first(self) -> Site:
        return self.sites[0]

    @property
    def last(self) -> Site:
        return self.sites[-1]


def per_feature_bias(site: Site) -> bool:
    """True when the site's Gemm bias can be cut per feature (absent, or a constant scalar/vector)."""
    if site.bias is None or site.beta == 0.0:
        return True
    return site.bias_value is not None and feature_vector(site.bias_value, site.weight.shape[1], 2) is not None


def feature_vector(value: np.ndarray, n: int, rank: int | None) -> np.ndarray | None:
    """``value`` as a scalar (0-d) or one value per feature ([n]), or None if it is neither or would
    raise the rank of an activation of rank ``rank`` (None: unknown)."""
    value = np.asarray(value)
    if rank is not None and value.ndim > rank or rank is None and value.ndim > 1:
        return None
    if any(d != 1 for d in value.shape[:-1]):
        return None
    if value.size == 1:
        return value.reshape(())
    if value.shape[-1] == n:
        return value.reshape(n)
    return None


def find_links(sites: list[Site], eligible: list[int]) -> list[Link]:
    """Links between the ``eligible`` sites (indices into ``sites``)."""
    by_activation = {(sites[i].scope, sites[i].activation): i for i in eligible}
    readers_of: dict[str, tuple[dict[str, list[int]], set[str]]] = {}
    producers_of: dict[str, dict[str, int]] = {}

    def producers(site: Site) -> dict[str, int]:  # built once per graph, and only if a Reshape needs it
        if site.scope not in producers_of:
            producers_of[site.scope] = {o: i for i, node in enumerate(site.graph.node) for o in node.output if o}
        return producers_of[site.scope]

    links = []
    for a in eligible:
        site = sites[a]
        if site.trans_a or not per_feature_bias(site):
            continue
        if site.scope not in readers_of:
            readers_of[site.scope] = _readers(site.graph)
        link = _region(site, a, *readers_of[site.scope], by_activation, sites, lambda site=site: producers(site))
        if link is not None:
            links.append(link)
    return links


def chains_from_links(eligible: list[int], links: list[Link]) -> list[list[int]]:
    """Maximal paths of linked sites (each a list of site indices); unlinked sites are paths of one."""
    nxt = {link.a: link for link in links}
    has_prev = {link.b for link in links}
    paths = []
    for i in eligible:
        if i in has_prev:
            continue
        path = [i]
        while path[-1] in nxt:
            path.append(nxt[path[-1]].b)
        paths.append(path)
    return paths


def _readers(graph: onnx.GraphProto) -> tuple[dict[str, list[int]], set[str]]:
    """{tensor: indices of the nodes that read it} (a node also reads what its subgraphs read from
    outside) and the graph's output names."""
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in _reads(node):
            if name:
                readers.setdefault(name, []).append(index)
    return readers, {o.name for o in graph.output}


def _reads(node: onnx.NodeProto) -> set[str]:
    """What ``node`` reads, its subgraphs' nodes included."""
    names = set(node.input)
    for _, _, _, sub in node_graphs(node):
        for _, graph in walk_graphs(sub):
            for inner in graph.node:
                names.update(inner.input)
    return names


def _region(site: Site, a: int, readers, outputs: set[str], by_activation, sites: list[Site],
            producers=lambda: {}) -> Link | None:
    """The link from site A = ``sites[a]``, if its output reaches exactly one eligible site B through
    feature-wise nodes only and nothing else reads the way (but Shape nodes)."""
    graph, n = site.graph, site.weight.shape[1]
    rank = 2 if site.op_type == "Gemm" else site.activation_rank
    region, nodes, frontier, ends = {site.output}, [], [site.output], set()
    shape_readers: dict[int, str] = {}
    while frontier:  # everything downstream of A's output up to the next site
        tensor = frontier.pop()
        if tensor in outputs:
            return None
        for index in readers.get(tensor, []):
            node = graph.node[index]
            target = by_activation.get((site.scope, tensor))
            if target is not None and node is sites[target].node:
                ends.add(target)
                continue
            if index in nodes or index in shape_readers:
                continue
            if node.domain in ("", "ai.onnx") and node.op_type == SHAPE:
                shape_readers[index] = tensor
                continue
            if node.domain in ("", "ai.onnx") and node.op_type == RESHAPE and node.input[0] == tensor:
                nodes.append(index)
                if node.output[0] not in region:
                    region.add(node.output[0])
                    frontier.append(node.output[0])
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in FEATURE_WISE:
                return None
            if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] and (
                    readers.get(node.output[1]) or node.output[1] in outputs):
                return None  # its mask is read
            nodes.append(index)
            for out in node.output:
                if out and out not in region:
                    region.add(out)
                    frontier.append(out)
    if len(ends) != 1 or a in ends:
        return None
    end = ends.pop()
    b = sites[end]
    if b.weight.shape[0] != n or b.trans_a or [r for r in readers.get(b.activation, [])
                                               if r not in shape_readers] != [b.index]:
        return None
    constants: dict[str, np.ndarray] = {}
    shapes = _Shapes(site, n, region, rank, producers)
    for i in sorted(nodes):  # graph order: every region input of a node is known before it
        node = graph.node[i]
        if not shapes.step(i, node) or node.op_type != RESHAPE and not _admit(
                node, region, constants, site, n, shapes.rank_of[node.output[0]]):
            return None
    readers_seen = tuple((i, shapes.segment[t]) for i, t in sorted(shape_readers.items()))
    return Link(a, end, sorted(nodes), site.output, b.activation, constants, shapes.segment[b.activation],
                readers_seen)


class _Shapes:
    """Walks a region in graph order: the feature-wise Reshapes each tensor passes (its *segment*),
    its rank where known, and whether each Reshape keeps the last axis at the width ``n``."""

    def __init__(self, site: Site, n: int, region: set[str], rank: int | None, producers):
        self.site, self.n, self.region = site, n, region
        self.graph = site.graph
        self._producers = producers  # () -> {tensor: index of the node writing it}, shared by a graph's links
        self.segment: dict[str, tuple[int, ...]] = {site.output: ()}
        self.rank_of: dict[str, int | None] = {site.output: rank}

    def step(self, index: int, node: onnx.NodeProto) -> bool:
        """Record ``node``'s outputs; False if its region inputs come through different Reshapes (their
        shapes would not line up) or it is a Reshape that does not keep the last axis."""
        inputs = [x for x in (node.input[:1] if node.op_type == RESHAPE else node.input) if x in self.region]
        if not inputs or any(x not in self.segment for x in inputs):  # not in graph order
            return False
        segments = {self.segment[x] for x in inputs}
        if len(segments) != 1:
            return False
        segment, rank = segments.pop(), self.rank_of[inputs[0]]
        if node.op_type == RESHAPE:
            if not self.keeps_last_axis(node):
                return False
            segment, rank = segment + (index,), self.length(node.input[1])
        for out in node.output:
            if out:
                self.segment[out], self.rank_of[out] = segment, rank
        return True

    def keeps_last_axis(self, node: onnx.NodeProto) -> bool:
        if len(node.input) < 2 or not node.input[1]:
            return False
        allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
        value = self.site.constant(node.input[1])
        if value is not None:
            v = np.asarray(value).reshape(-1)
            if v.dtype.kind not in "iu" or not v.size or int(v[-1]) != self.n:
                return False
            # a 0 copies an input dim (which one depends on the ranks): refused, to be safe
            return bool(allowzero or not (v[:-1] == 0).any())
        return self.last_element(node.input[1]) == self.n

    def rank(self, name: str) -> int | None:
        if name in self.rank_of:
            return self.rank_of[name]
        shape = self.site.shape_of(name)
        return None if shape is None else len(shape)

    def length(self, name: str, depth: int = 0) -> int | None:
        """The number of elements of a 1-D shape tensor ``name``, where it can be told."""
        value = self.site.constant(name)
        if value is not None:
            return int(np.asarray(value).size)
        shape = self.site.shape_of(name)
        if shape is not None and len(shape) == 1 and shape[0] is not None:
            return int(shape[0])
        node = self._producer(name)
        if node is None or depth > 16:
            return None
        if node.op_type == "Unsqueeze" and self.site.shape_of(node.input[0]) == []:
            return 1
        if node.op_type == "Concat":
            lengths = [self.length(x, depth + 1) for x in node.input if x]
            return None if None in lengths else sum(lengths)
        if node.op_type == SHAPE and not node.attribute:
            return self.rank(node.input[0])
        return None

    def last_element(self, name: str, depth: int = 0) -> int | None:
        """The value of the last element of an integer tensor ``name``, where it is provably constant."""
        value = self.site.constant(name)
        if value is not None:
            v = np.asarray(value).reshape(-1)
            return int(v[-1]) if v.size and v.dtype.kind in "iu" else None
        node = self._producer(name)
        if node is None or depth > 16:
            return None
        if node.op_type == "Concat":
            for x in reversed([x for x in node.input if x]):
                length = self.length(x, depth + 1)
                if length is None:
                    return None
                if length:
                    return self.last_element(x, depth + 1)
            return None
        if node.op_type in ("Unsqueeze", "Squeeze", "Identity", "Reshape"):  # the same elements, in order
            return self.last_element(node.input[0], depth + 1)
        if node.op_type == "Gather" and len(node.input) > 1:
            index = self.site.constant(node.input[1])
            source = self._producer(node.input[0])
            if index is None or source is None or source.op_type != SHAPE or source.attribute:
                return None
            index = np.asarray(index).reshape(-1)
            if not index.size or index.dtype.kind not in "iu":
                return None
            return self._dim(source.input[0], int(index[-1]))
        return None

    def _dim(self, tensor: str, axis: int) -> int | None:
        """Dim ``axis`` of ``tensor``: the width for the last axis of a region tensor, else what shape
        inference tells."""
        rank = self.rank(tensor)
        if axis < 0 and rank is not None:
            axis += rank
        if tensor in self.region:
            return self.n if axis == -1 or rank is not None and axis == rank - 1 else None
        shape = self.site.shape_of(tensor)
        if shape is None or not 0 <= axis < len(shape):
            return None
        return shape[axis]

    def _producer(self, name: str) -> onnx.NodeProto | None:
        index = self._producers().get(name)
        if index is None:
            return None
        node = self.graph.node[index]
        return node if node.domain in ("", "ai.onnx") else None


def _admit(node: onnx.NodeProto, region: set[str], constants: dict, site: Site, n: int, rank) -> bool:
    """Whether ``node`` is feature-wise here; records the values of the constants it reads."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in FEATURE_WISE:
        return False
    if node.op_type == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            training = site.constant(node.input[2])
            if training is None or bool(np.asarray(training).any()):
                return False
        inputs = node.input[:1]
    else:
        inputs = node.input
    if node.op_type in POWER:  # region ** k for a whole k >= 0: finite on the padding lanes' zeros too
        exponent = None if len(inputs) < 2 or inputs[1] in region else site.constant(inputs[1])
        if inputs[0] not in region or exponent is None or np.asarray(exponent).size != 1:
            return False
        k = float(np.asarray(exponent).reshape(-1)[0])
        if not (k >= 0 and k == int(k)):
            return False
    for position, name in enumerate(inputs):
        if not name or name in region:
            if name and node.op_type == "Div" and position == 1:
                return False  # x / region: padding lanes could divide by zero
            continue
        value = site.constant(name)
        if value is None:
            return False
        vec = feature_vector(value, n, rank)
        if vec is None or (node.op_type in SCALAR_ONLY and vec.ndim):
            return False
        constants[name] = vec
    return any(name in region for name in inputs if name)
