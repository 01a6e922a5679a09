"""The model as a plan makes it: the same graph with each planned site reading the plan's effective
weight (``WeightPlan.effective_weight``: for block plans, W with the dropped entries zeroed).

A split site computes exactly ``x @ W'`` with W' its plan's effective weight. So an approximating
plan raises two separate questions, answered here and in verify.py:

- how far the model with W' is from the original (the relative output error, measured on
  calibration samples with :class:`Evaluator`: the chosen weights are graph inputs of one ORT
  session, so trying a plan costs one run, not a rewrite and a new session);
- whether the rewritten model computes the model with W' (verification against
  :func:`reference_model`, at the usual tight tolerances).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError
from .isolate import crash_reason
from .protos import without_weights
from .runtime import CPU, make_session, model_source, ort_error
from .sites import Site, graphs_by_scope, walk_graphs


def relative_error(reference: list, got: list) -> float:
    """||y' - y|| / ||y|| over the floating-point outputs together (float64); 0 when both are zero.

    Integer, boolean and non-tensor outputs (indices, shapes, sequences) are left out: their
    distance means nothing here. A non-finite value counts as equal where the other side holds the
    same one (NaN against NaN, inf against inf); a non-finite value on one side only, or in the
    difference, makes the error inf.
    """
    return ErrorSum().add(reference, got).value


def counted(value) -> bool:
    """Whether an output counts in the output error: a floating-point tensor (indices, shapes,
    booleans and sequences do not)."""
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


class ErrorSum:
    """:func:`relative_error` accumulated over batches: the squared norms are summed, so the
    result over all batches equals the error over all samples at once."""

    def __init__(self):
        self.num = self.den = 0.0
        self.infinite = False

    def add(self, reference: list, got: list) -> "ErrorSum":
        for r, g in zip(reference, got):
            if not counted(r):
                continue
            r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
            finite = np.isfinite(r)
            same = (g == r) | (np.isnan(r) & np.isnan(g))
            if not (same | finite).all() or not np.isfinite(g[finite]).all():
                self.infinite = True
                continue
            self.num += float(np.square(g[finite] - r[finite]).sum())
            self.den += float(np.square(r[finite]).sum())
        return self

    @property
    def value(self) -> float:
        if self.infinite:
            return float("inf")
        if self.den == 0:
            return 0.0 if self.num == 0 else float("inf")
        return float(np.sqrt(self.num / self.den))


def _like(value: np.ndarray) -> tuple[np.dtype, tuple[int, ...]]:
    return value.dtype, value.shape


def _stored_like(site: Site) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape of the site's weight as the node reads it (known after the weight was
    let go: sites.release_weights)."""
    k, n = site.shape
    return site.weight_dtype, ((n, k) if site.trans_b else (k, n))


def _stored(site: Site, weight: np.ndarray) -> np.ndarray:
    """``weight`` (x @ W orientation) as the node reads its second input."""
    return np.ascontiguousarray(weight.T if site.trans_b else weight)


def reference_model(model: onnx.ModelProto, sites: list[Site], weights: dict[int, np.ndarray],
                    biases: dict[int, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` (the original, or an unchanged copy) whose sites ``weights`` read the
    given [K, N] weights (x @ W orientation), and whose Gemm sites ``biases`` read the given C (as
    stored: the site's ``bias_value`` shape).

    Each value is a new initializer of the site's own graph, so the rest of the model, including
    other readers of the original tensors, is unchanged.
    """
    return _with_weights(model, sites, weights, biases or {}, as_inputs=False)


def pruned_model(model: onnx.ModelProto, sites: list[Site], masks: dict[int, np.ndarray]) -> onnx.ModelProto:
    """``reference_model`` with W * mask at the sites of ``masks``."""
    return reference_model(model, sites, {i: masked(sites[i].weight, masks[i]) for i in masks})


def masked(weight: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, weight, np.zeros((), dtype=weight.dtype)).astype(weight.dtype)


def has_constant_bias(site: Site) -> bool:
    """A Gemm site whose C is a constant (a refit may change it)."""
    return site.bias is not None and site.bias_value is not None


def _with_weights(model: onnx.ModelProto, sites: list[Site], weights: dict[int, np.ndarray | None],
                  biases: dict[int, np.ndarray | None], as_inputs: bool,
                  outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Copy of ``model`` (the original, or an unchanged copy of it) whose sites ``weights`` (and
    ``biases``) read a new tensor: an initializer of the site's graph holding the value, or
    (``as_inputs``) a main-graph input to be fed (values None). ``outputs``: main-graph tensors
    made graph outputs as well. Sites are found by scope and node position.

    The main graph's weights are copied once, after the sites are redirected, and only those
    something still reads (the initializers a site no longer reads are never copied; removing them
    from a full copy would leave their bytes, and those of every rebuilt list, in the copy's arena)."""
    copy = without_weights(model)
    graphs = graphs_by_scope(copy)
    replaced: set[tuple[str, str]] = set()
    added: list[tuple[onnx.GraphProto, onnx.TensorProto]] = []
    for kind, position, values in (("weight", 1, weights), ("bias", 2, biases)):
        for i, value in values.items():
            site = sites[i]
            name = f"onnx_split.{kind}.{i}"
            graph = graphs[site.scope]
            replaced.add((site.scope, graph.node[site.index].input[position]))
            graph.node[site.index].input[position] = name
            dtype, shape = _stored_like(site) if kind == "weight" else _like(np.asarray(site.bias_value))
            if as_inputs:
                elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
                copy.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, list(shape)))
            else:
                stored = _stored(site, value) if kind == "weight" else np.asarray(value, dtype).reshape(shape)
                added.append((graph, numpy_helper.from_array(stored, name)))
    unread = _unread(copy, replaced)
    copy.graph.initializer.extend(t for t in model.graph.initializer if t.name not in unread.get("main", ()))
    for scope, names in unread.items():  # a subgraph's own weights came with its node: drop them in place
        if scope != "main":
            graph = graphs[scope]
            for j in reversed([j for j, t in enumerate(graph.initializer) if t.name in names]):
                del graph.initializer[j]
    for graph, tensor in added:
        graph.initializer.append(tensor)
    known = {o.name for o in copy.graph.output}
    for name in outputs:
        if name not in known:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


def _unread(model: onnx.ModelProto, replaced: set[tuple[str, str]]) -> dict[str, set[str]]:
    """{scope: the initializers a site read before ``replaced`` gave it a new tensor and nothing
    else reads any more (in any graph)}: the copy then holds each weight once, not twice."""
    if not replaced:
        return {}
    read = {name for _, g in walk_graphs(model.graph) for node in g.node for name in node.input}
    read |= {o.name for o in model.graph.output}
    found: dict[str, set[str]] = {}
    for scope, name in replaced:
        if name not in read:
            found.setdefault(scope, set()).add(name)
    return found


@dataclass(frozen=True)
class ErrorReport:
    """The relative output error ||y' - y|| / ||y|| of the model with the plans' effective weights
    against the original, over all outputs, on the samples the budget search used and on held-out ones."""

    data: str
    search: float | None
    held_out: float | None
    search_samples: int
    held_out_samples: int
    tolerance: float | None = None
    met: bool | None = None
    """with --tolerance: whether the held-out error is within it"""
    evaluations: int = 0
    """model runs the tolerance search made"""
    unseen: float | None = None
    """with --tolerance: the error on the half of the search samples the search measured on, which
    none of its refits was fitted on (``search`` includes the half they were fitted on)"""
    unseen_samples: int = 0
    fitted: bool = False
    """the written refits were fitted on all the search samples (``search`` is an in-sample figure:
    only ``held_out`` says how the refit does on data it did not see)"""


class Evaluator:
    """Runs the model with the weights (and constant Gemm biases) of ``indices`` replaced by other
    values, in one CPU session; ``capture`` names main-graph tensors (site activations) it can
    return as well. Feeds are given as lists of batches (:meth:`Calibration.batches`), so no run
    holds more than one batch of samples."""

    def __init__(self, model: onnx.ModelProto, sites: list[Site], indices: list[int], threads: int = 1,
                 capture: tuple[str, ...] = ()):
        self.sites, self.indices = sites, list(indices)
        self.bias_indices = [i for i in self.indices if has_constant_bias(sites[i])]
        inputs = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer}
        self.capture = tuple(n for n in dict.fromkeys(capture) if n not in inputs)
        self.runs = 0
        probe = _with_weights(model, sites, {i: None for i in self.indices}, {i: None for i in self.bias_indices},
                              as_inputs=True, outputs=self.capture)
        crash = crash_reason(probe, "the model with its weights as inputs", levels=("enabled",))
        if crash is not None:  # opened in a child first: a crash of ORT must not end the run
            raise InputError(f"measuring the output error needs the model to run in onnxruntime: {crash}")
        try:
            with model_source(probe) as source:
                self.session = make_session(source, CPU, "enabled", threads)
        except Exception as exc:  # ORT raises its own types
            raise InputError(f"measuring the output error needs the model to run in onnxruntime: "
                             f"{ort_error(exc)}") from None
        self.outputs = [o.name for o in model.graph.output]
        self._reference: dict[int, tuple[list, list[list[np.ndarray]]]] = {}

    def _feeds(self, feeds: dict[str, np.ndarray], weights: dict, biases: dict) -> dict[str, np.ndarray]:
        all_feeds = dict(feeds)
        for i in self.indices:
            site = self.sites[i]
            all_feeds[f"onnx_split.weight.{i}"] = _stored(site, weights.get(i, site.weight))
        for i in self.bias_indices:
            site = self.sites[i]
            value = biases.get(i, site.bias_value)
            all_feeds[f"onnx_split.bias.{i}"] = np.asarray(value, site.bias_value.dtype).reshape(site.bias_value.shape)
        return all_feeds

    def _run(self, names: list[str], feeds, weights, biases) -> list[np.ndarray]:
        self.runs += 1
        try:
            return self.session.run(names, self._feeds(feeds, weights, biases or {}))
        except Exception as exc:
            raise InputError(f"measuring the output error failed in onnxruntime: {ort_error(exc)}") from None

    def run(self, feeds: dict[str, np.ndarray], weights: dict[int, np.ndarray],
            biases: dict[int, np.ndarray] | None = None) -> list[np.ndarray]:
        """The model outputs on one batch of ``feeds`` with the sites of ``weights`` (``biases``)
        reading those [K, N] weights (stored C values)."""
        return self._run(self.outputs, feeds, weights, biases)

    def activations(self, feeds: dict[str, np.ndarray], weights: dict, biases: dict | None,
                    names: list[str]) -> dict[str, np.ndarray]:
        """The captured tensors ``names`` on one batch (graph inputs are taken from ``feeds``)."""
        wanted = [n for n in names if n not in feeds]
        values = dict(zip(wanted, self._run(wanted, feeds, weights, biases))) if wanted else {}
        return {n: feeds[n] if n in feeds else values[n] for n in names}

    def error(self, batches: list[dict[str, np.ndarray]], weights: dict[int, np.ndarray],
              biases: dict[int, np.ndarray] | None = None) -> float:
        """Relative output error of the model with ``weights`` against the original over all
        ``batches`` (a list of feeds, kept with its reference outputs)."""
        key = id(batches)  # the batches are kept with their reference, so the id stays theirs
        if key not in self._reference:
            self._reference[key] = (batches, [self.run(b, {}) for b in batches])
        total = ErrorSum()
        for feeds, reference in zip(batches, self._reference[key][1]):
            total.add(reference, self.run(feeds, weights, biases))
        return total.value
