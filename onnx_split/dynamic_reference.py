"""The verification reference of dynamic sites: the original model whose dynamic sites see their
activation masked by the same block selection, written here in standard ONNX ops (with
``--dynamic-compensate``, a skipped block's features take their fill values instead of zero, so
the site adds fill_b @ W_b per skipped block, as the forms do from precomputed rows).

It is built from the plans alone and independently of the rewrite forms (another op path: ReduceL2,
the k-th best score as a cut, a feature mask multiplied into x), so the kernel and the portable form
are both checked against it at tight tolerances, with ORT optimizations off and on. (Exact ties of
two block scores, which random and real activations do not produce, would keep both blocks here.)
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .sites import default_opset


def reference_model(original: onnx.ModelProto, sites, plans: dict[int, object]) -> onnx.ModelProto:
    """A copy of ``original`` where site ``i`` of ``plans`` multiplies its activation, per call, by the
    0/1 mask of the blocks its plan keeps. Only main-graph sites (dynamic plans are made there)."""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    graph = model.graph
    opset = default_opset(model)
    by_index = {sites[i].index: (sites[i], plan) for i, plan in plans.items()}
    nodes = []
    for index, node in enumerate(graph.node):
        if index in by_index:
            site, plan = by_index[index]
            mask_nodes, inits, masked = _mask(site, plan, opset, f"{site.name}/dynamic_reference")
            nodes.extend(mask_nodes)
            graph.initializer.extend(inits)
            node = onnx.NodeProto()
            node.CopyFrom(graph.node[index])
            node.input[0] = masked
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


MIN_OPSET = 15
"""Unsqueeze with an axes input, GreaterOrEqual, Shape with start/end: dynamic sites need this opset (sites.py keeps older)."""


def _mask(site, plan, opset: int, base: str):
    k, block, n_blocks = plan.k, plan.block, plan.n_blocks
    h = onnx.helper
    inits = [numpy_helper.from_array(np.asarray(v), f"{base}/{name}") for name, v in (
        ("rows", np.array([-1, k], np.int64)), ("pads", np.array([0, 0, 0, n_blocks * block - k], np.int64)),
        ("blocks", np.array([-1, n_blocks, block], np.int64)), ("S", np.asarray(plan.scales, np.float32)),
        ("k", np.array([plan.keep_blocks], np.int64)), ("threshold", np.asarray(plan.threshold, np.float32)),
        ("spread", np.ones((n_blocks, block), np.float32)), ("flat", np.array([n_blocks * block], np.int64)),
        ("start", np.array([0], np.int64)), ("end", np.array([k], np.int64)), ("axes", np.array([0, 2], np.int64)),
        ("last", np.array([0], np.int64)), ("col", np.array([1], np.int64)))]
    n = lambda local: f"{base}/{local}"  # noqa: E731
    x = site.activation
    nodes = [h.make_node("Reshape", [x, n("rows")], [n("x2")]),
             h.make_node("Pad", [n("x2"), n("pads")], [n("xp")]),
             h.make_node("Reshape", [n("xp"), n("blocks")], [n("x3")])]
    if opset >= 18:
        nodes.append(h.make_node("ReduceL2", [n("x3"), n("axes")], [n("norms")], keepdims=0))
    else:
        nodes.append(h.make_node("ReduceL2", [n("x3")], [n("norms")], axes=[0, 2], keepdims=0))
    nodes += [h.make_node("Shape", [n("x2")], [n("count_shape")], start=0, end=1),
              h.make_node("Cast", [n("count_shape")], [n("count")], to=onnx.TensorProto.FLOAT),
              h.make_node("Sqrt", [n("count")], [n("root_rows")]),
              h.make_node("Div", [n("norms"), n("root_rows")], [n("rms")]),
              h.make_node("Mul", [n("rms"), n("S")], [n("scores")])]
    if plan.rule == "topk":
        nodes += [h.make_node("TopK", [n("scores"), n("k")], [n("best"), n("best_at")]),
                  h.make_node("ReduceMin", [n("best")], [n("cut")], keepdims=0) if opset < 18 else
                  h.make_node("ReduceMin", [n("best"), n("last")], [n("cut")], keepdims=0),
                  h.make_node("GreaterOrEqual", [n("scores"), n("cut")], [n("kept")])]
    else:
        nodes.append(h.make_node("Greater", [n("scores"), n("threshold")], [n("kept")]))
    nodes += [h.make_node("Cast", [n("kept")], [n("kept_f")], to=onnx.TensorProto.FLOAT),
              h.make_node("Unsqueeze", [n("kept_f"), n("col")], [n("kept_col")]),
              h.make_node("Mul", [n("kept_col"), n("spread")], [n("mask2")]),
              h.make_node("Reshape", [n("mask2"), n("flat")], [n("mask_pad")]),
              h.make_node("Slice", [n("mask_pad"), n("start"), n("end")], [n("mask")]),
              h.make_node("Mul", [x, n("mask")], [n("masked")])]
    if plan.fill is None:
        return nodes, inits, n("masked")
    # --dynamic-compensate: a skipped feature counts as its fill value, x * mask + fill * (1 - mask)
    inits += [numpy_helper.from_array(np.asarray(plan.fill, np.float32), n("fill")),
              numpy_helper.from_array(np.ones(1, np.float32), n("one"))]
    nodes += [h.make_node("Sub", [n("one"), n("mask")], [n("skipped")]),
              h.make_node("Mul", [n("fill"), n("skipped")], [n("filled")]),
              h.make_node("Add", [n("masked"), n("filled")], [n("compensated")])]
    return nodes, inits, n("compensated")
