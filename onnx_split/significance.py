"""Significance of each weight: how much the model's outputs depend on the connection it makes.

Two scores, both K x N for a weight used as ``y = x @ W``:

- ``magnitude``: |w_ij|. Needs no data, but treats every input feature as equally loud.
- ``activation``: |w_ij| * ||x_i||_2, with ||x_i|| the norm of input feature i of that very node
  over the calibration samples (all axes but the feature axis). A large weight on a feature that is
  always near zero moves the output little; this score sees that. The feature norms come from one
  ONNX Runtime run of the original model with the nodes' activations exposed as outputs.

Scores are float64 and finite: a NaN or infinite weight is the most significant one there is, so it
is scored above every finite weight and is never dropped by choice.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from .errors import InputError
from .runtime import capture, ort_error
from .sites import Site

log = logging.getLogger(__name__)


def magnitude(weight: np.ndarray) -> np.ndarray:
    w = np.abs(np.asarray(weight).astype(np.float64))
    bad = ~np.isfinite(w)
    if bad.any():
        w[bad] = 2 * float(w[~bad].max(initial=0.0)) + 1.0
    return w


def activation_aware(weight: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """|w_ij| * ||x_i||; ``norms`` has one entry per input feature (row of W)."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.shape != (weight.shape[0],):
        raise ValueError(f"norms must have shape ({weight.shape[0]},), got {norms.shape}")
    return magnitude(weight) * norms[:, None]


def feature_norms(model: onnx.ModelProto, sites: list[Site], feeds: dict[str, np.ndarray],
                  threads: int = 1) -> dict[int, np.ndarray]:
    """{position in ``sites``: ||x_i||_2 per input feature} over the samples in ``feeds``.

    Sites inside If/Loop/Scan bodies are left out (their activations are not visible from the main
    graph); the caller scores them by magnitude.
    """
    main = [i for i, s in enumerate(sites) if s.scope == "main"]
    names = list(dict.fromkeys(sites[i].activation for i in main))
    if not names:
        return {}
    try:
        values = capture(model, names, [feeds], threads)[0]
    except Exception as exc:  # ORT raises its own types
        raise InputError(f"activation-aware significance needs the model to run in onnxruntime: "
                         f"{ort_error(exc)}") from None
    norms = {}
    for i in main:
        site = sites[i]
        x = np.asarray(values[site.activation], dtype=np.float64)
        axis = 0 if site.trans_a else x.ndim - 1
        x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
        norms[i] = np.sqrt(np.square(x).sum(axis=0))
    return norms


def site_scores(sites: list[Site], indices: list[int], score: str, norms: dict[int, np.ndarray]
                ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """{site index: K x N scores} and {site index: the score actually used} for ``indices``."""
    scores, used = {}, {}
    for i in indices:
        weight = sites[i].weight
        if score == "activation" and i in norms:
            scores[i], used[i] = activation_aware(weight, norms[i]), "activation"
        else:
            scores[i], used[i] = magnitude(weight), "magnitude"
            if score == "activation":
                log.info("%s: scored by magnitude (activations inside subgraphs are not captured)", sites[i].name)
    return scores, used
