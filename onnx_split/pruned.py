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
from .runtime import CPU, make_session, model_source, ort_error
from .sites import Site, graphs_by_scope


def relative_error(reference: list, got: list) -> float:
    """||y' - y|| / ||y|| over the floating-point outputs together (float64); 0 when both are zero.

    Integer, boolean and non-tensor outputs (indices, shapes, sequences) are left out: their
    distance means nothing here. A non-finite value counts as equal where the other side holds the
    same one (NaN against NaN, inf against inf); a non-finite value on one side only, or in the
    difference, makes the error inf.
    """
    num = den = 0.0
    for r, g in zip(reference, got):
        if not isinstance(r, np.ndarray) or r.dtype.kind != "f":
            continue
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        finite = np.isfinite(r)
        same = (g == r) | (np.isnan(r) & np.isnan(g))
        if not (same | finite).all() or not np.isfinite(g[finite]).all():
            return float("inf")
        num += float(np.square(g[finite] - r[finite]).sum())
        den += float(np.square(r[finite]).sum())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(np.sqrt(num / den))


def _stored(site: Site, weight: np.ndarray) -> np.ndarray:
    """``weight`` (x @ W orientation) as the node reads its second input."""
    return np.ascontiguousarray(weight.T if site.trans_b else weight)


def reference_model(model: onnx.ModelProto, sites: list[Site], weights: dict[int, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` (the original, or an unchanged copy) whose sites ``weights`` read the
    given [K, N] weights (x @ W orientation).

    Each weight is a new initializer of the site's own graph, so the rest of the model, including
    other readers of the original weight, is unchanged.
    """
    return _with_weights(model, sites, weights, as_inputs=False)


def pruned_model(model: onnx.ModelProto, sites: list[Site], masks: dict[int, np.ndarray]) -> onnx.ModelProto:
    """``reference_model`` with W * mask at the sites of ``masks``."""
    return reference_model(model, sites, {i: masked(sites[i].weight, masks[i]) for i in masks})


def masked(weight: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, weight, np.zeros((), dtype=weight.dtype)).astype(weight.dtype)


def _with_weights(model: onnx.ModelProto, sites: list[Site], weights: dict[int, np.ndarray | None],
                  as_inputs: bool) -> onnx.ModelProto:
    """Copy of ``model`` (the original, or an unchanged copy of it) whose sites ``weights`` read a
    new tensor: an initializer of the site's graph holding the value, or (``as_inputs``) a
    main-graph input to be fed (values None). Sites are found by scope and node position."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graphs = graphs_by_scope(copy)
    for i, value in weights.items():
        site = sites[i]
        name = f"onnx_split.weight.{i}"
        graph = graphs[site.scope]
        graph.node[site.index].input[1] = name
        if as_inputs:
            elem = onnx.helper.np_dtype_to_tensor_dtype(site.weight.dtype)
            shape = list(_stored(site, site.weight).shape)
            copy.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, shape))
        else:
            graph.initializer.append(numpy_helper.from_array(_stored(site, value), name))
    return copy


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


class Evaluator:
    """Runs the model with the weights of ``indices`` replaced by other values, in one CPU session."""

    def __init__(self, model: onnx.ModelProto, sites: list[Site], indices: list[int], threads: int = 1):
        self.sites, self.indices = sites, list(indices)
        probe = _with_weights(model, sites, {i: None for i in self.indices}, as_inputs=True)
        crash = crash_reason(probe, "the model with its weights as inputs", levels=("enabled",))
        if crash is not None:  # opened in a child first: a crash of ORT must not end the run
            raise InputError(f"measuring the output error needs the model to run in onnxruntime: {crash}")
        try:
            with model_source(probe) as source:
                self.session = make_session(source, CPU, "enabled", threads)
        except Exception as exc:  # ORT raises its own types
            raise InputError(f"measuring the output error needs the model to run in onnxruntime: "
                             f"{ort_error(exc)}") from None
        self._reference: dict[int, tuple[dict, list[np.ndarray]]] = {}

    def run(self, feeds: dict[str, np.ndarray], weights: dict[int, np.ndarray]) -> list[np.ndarray]:
        """The outputs on ``feeds`` with the sites of ``weights`` reading those [K, N] weights."""
        all_feeds = dict(feeds)
        for i in self.indices:
            site = self.sites[i]
            all_feeds[f"onnx_split.weight.{i}"] = _stored(site, weights.get(i, site.weight))
        try:
            return self.session.run(None, all_feeds)
        except Exception as exc:
            raise InputError(f"measuring the output error failed in onnxruntime: {ort_error(exc)}") from None

    def error(self, feeds: dict[str, np.ndarray], weights: dict[int, np.ndarray]) -> float:
        """Relative output error of the model with ``weights`` against the original on ``feeds``."""
        key = id(feeds)  # the feeds are kept with their reference, so the id stays theirs
        if key not in self._reference:
            self._reference[key] = (feeds, self.run(feeds, {}))
        return relative_error(self._reference[key][1], self.run(feeds, weights))
