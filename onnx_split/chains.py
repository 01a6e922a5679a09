"""Find split sites that feed each other through feature-wise ops only: the layers of one network
that can become several independent networks.

A *link* joins site A to site B when A's output reaches B's activation only through a region of
element-wise nodes whose other operands are constants that are scalars or per-feature vectors
(Relu, Gelu or its Erf pattern, a bias Add, a scale Mul, Cast, Dropout in inference, ...), and
nothing else reads any tensor of that region. Such a region can be run per part, on the part's
features, with its constants cut to those features. Anything that mixes features (LayerNorm,
Softmax, a Reshape) or any other reader (a graph output, a second consumer) ends the chain.
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
PASS_THROUGH = frozenset({"Identity", "Dropout"})  # no node is written for these
FEATURE_WISE = UNARY | BINARY | SCALAR_ONLY


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
    links = []
    for a in eligible:
        site = sites[a]
        if site.trans_a or not per_feature_bias(site):
            continue
        if site.scope not in readers_of:
            readers_of[site.scope] = _readers(site.graph)
        link = _region(site, a, *readers_of[site.scope], by_activation, sites)
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


def _region(site: Site, a: int, readers, outputs: set[str], by_activation, sites: list[Site]) -> Link | None:
    """The link from site A = ``sites[a]``, if its output reaches exactly one eligible site B through
    feature-wise nodes only and nothing else reads the way."""
    graph, n = site.graph, site.weight.shape[1]
    rank = 2 if site.op_type == "Gemm" else site.activation_rank
    region, nodes, frontier, ends = {site.output}, [], [site.output], set()
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
            if index in nodes:
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
    if b.weight.shape[0] != n or b.trans_a or readers.get(b.activation) != [b.index]:
        return None
    constants: dict[str, np.ndarray] = {}
    if not all(_admit(graph.node[i], region, constants, site, n, rank) for i in nodes):
        return None
    return Link(a, end, sorted(nodes), site.output, b.activation, constants)


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
