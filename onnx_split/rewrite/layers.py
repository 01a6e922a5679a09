"""Run a chain's layers on one lane: a part of the parallel layout, or all parts of the batched one.

A lane knows how its weights and per-feature constants are laid out; this module walks the layers
(MatMul, the Gemm's alpha and bias, then the feature-wise region up to the next layer) so every
layout runs the same sequence and only the layout differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..chains import PASS_THROUGH, RESHAPE, Chain, Link, feature_vector
from .emit import Emitter


@dataclass
class Lane:
    tag: str  # "part3", or "parts" for the batched layout
    weight: Callable[[int], np.ndarray]  # layer -> the constant operand of that layer's MatMul
    vector: Callable[[np.ndarray, int, float], np.ndarray]  # (per-feature values, level, pad) -> constant
    weight_left: bool  # W^T @ x^T (rows forms) instead of x @ W
    doc: Callable[[int], str]  # layer -> what this lane computes there


def run_layers(em: Emitter, chain: Chain, lane: Lane, h: str) -> str:
    """All layers of ``chain`` on ``h``; the last layer's alpha and bias are left to the caller."""
    for layer, site in enumerate(chain.sites):
        em.at(site.name, site.node)
        doc = lane.doc(layer)
        w = em.const(f"{lane.tag}/W" + ("t" if lane.weight_left else ""), lane.weight(layer))
        h = em.node("MatMul", [w, h] if lane.weight_left else [h, w], f"{lane.tag}/MatMul", doc)
        if layer + 1 < len(chain.sites):
            h = _inner_gemm(em, site, lane, layer + 1, h)
            h = _region(em, chain.links[layer], site, lane, layer + 1, h)
    return h


def _inner_gemm(em: Emitter, site, lane: Lane, level: int, h: str) -> str:
    """alpha and beta * C of a Gemm inside a chain, on this lane's features."""
    dtype = site.weight.dtype
    if site.alpha != 1.0:
        alpha = em.const(f"{lane.tag}/alpha", np.asarray(site.alpha, dtype=dtype))
        h = em.node("Mul", [h, alpha], f"{lane.tag}/alpha/Mul", f"alpha = {site.alpha} of Gemm '{site.name}'")
    if site.bias is not None and site.beta != 0.0:
        bias = feature_vector(site.bias_value, site.weight.shape[1], 2) * np.asarray(site.beta, dtype=dtype)
        bias = em.const(f"{lane.tag}/bias", lane.vector(bias.astype(dtype), level, 0.0))
        h = em.node("Add", [h, bias], f"{lane.tag}/bias/Add", f"beta * C of Gemm '{site.name}', this lane's features")
    return h


def _region(em: Emitter, link: Link, site, lane: Lane, level: int, h: str) -> str:
    """The feature-wise nodes between two layers, cloned for this lane with constants cut to it."""
    graph = site.graph
    names = {link.start: h}
    for index in link.nodes:
        node = graph.node[index]
        if node.op_type in PASS_THROUGH or node.op_type == RESHAPE:
            # a feature-wise Reshape only merges or splits leading axes: a lane keeps the rows of the
            # chain's input (x as it is, or x^T's columns), and rewrite/shapes.py restores the
            # output's shape and every Shape read on the way
            names[node.output[0]] = names[node.input[0]]
            continue
        em.at(node.name or node.output[0], node)
        inputs = []
        for position, name in enumerate(node.input):
            if not name or name in names:
                inputs.append(names.get(name, ""))
                continue
            pad = 1.0 if node.op_type == "Div" and position == 1 else 0.0  # padding lanes never divide by 0
            value = link.constants[name]
            inputs.append(em.const(f"{lane.tag}/{name.rsplit('/', 1)[-1]}", lane.vector(value, level, pad)))
        names[node.output[0]] = em.node(node.op_type, inputs, lane.tag,
                                        f"{node.op_type} '{node.name or node.output[0]}' on this lane's features",
                                        attributes=node.attribute)
    return names[link.end]


def vector_for(values: np.ndarray, index: np.ndarray, column: bool) -> np.ndarray:
    """A scalar as it is; per-feature values cut to ``index``, as [n] or as a column [n, 1]."""
    if values.ndim == 0:
        return values
    cut = values[index]
    return cut[:, None] if column else cut
