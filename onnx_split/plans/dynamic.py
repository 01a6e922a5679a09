"""``dynamic`` plans: keep every weight, and per call skip the input blocks that matter least.

A site y = x @ W (W [K, N] constant) has its K inputs cut into blocks of ``block`` features. Per
call, block b scores ``||x_b||_2 * S_b`` over every row of the call (so one set of blocks serves the
whole batch), with ``S_b = ||W_b||_F`` (``score="xw"``: an upper bound of the block's contribution)
or 1 (``score="x"``). Two selection rules: ``topk`` keeps the ``keep_blocks`` best blocks (ties: the
lower index), ``threshold`` keeps every block scoring above ``threshold`` (calibrated per site so
that it keeps a fraction of the blocks on average). y = sum over the kept blocks of x_b @ W_b.

What the rewrite computes depends on the input, so a dynamic plan has no effective weight: it is
verified against :func:`onnx_split.dynamic_reference.reference_model`, the original with each
dynamic site's input masked by the same selection written in standard ONNX ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from ..text import percent

RULES = ("topk", "threshold")
SCORES = ("xw", "x")


@dataclass(frozen=True, eq=False)
class DynamicPlan:
    kind: ClassVar[str] = "dynamic"
    k: int
    n: int
    block: int
    rule: str
    keep: float
    """The fraction of blocks kept (top-k: exactly, rounded up; threshold: on average over calibration)."""
    scales: np.ndarray = field(repr=False)
    """S_b per block, float32."""
    score: str = "xw"
    threshold: float = 0.0
    fill: np.ndarray | None = field(default=None, repr=False)
    """``--dynamic-compensate``: [K] float32, what a skipped block's inputs count as (their mean over
    the calibration calls that skipped the block); None: zero."""
    approximates: bool = True
    input_dependent: ClassVar[bool] = True
    retained: float | None = None

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.k / self.block)

    @property
    def keep_blocks(self) -> int:
        """Top-k: the blocks kept per call (at least one)."""
        return max(1, min(self.n_blocks, math.ceil(self.keep * self.n_blocks - 1e-9)))

    @property
    def flops(self) -> float:
        kept = self.keep_blocks / self.n_blocks if self.rule == "topk" else self.keep
        return float(kept)

    @property
    def label(self) -> str:
        compensated = ", skipped blocks compensated" if self.fill is not None else ""
        if self.rule == "topk":
            return f"dynamic top-{self.keep_blocks} of {self.n_blocks} blocks of {self.block}{compensated}"
        return (f"dynamic threshold keeping {percent(self.keep)} of {self.n_blocks} blocks of {self.block} on "
                f"average{compensated}")

    @property
    def n_layers(self) -> int:
        return 1

    def layer_shape(self, layer: int) -> tuple[int, int]:
        return self.k, self.n

    def macs_dense(self, layer: int | None = None) -> int:
        return self.k * self.n

    def macs_kept(self) -> int:
        """Multiply-adds per row of the kept blocks (top-k: exact, threshold: the calibrated average)."""
        if self.rule == "topk":
            return min(self.k, self.keep_blocks * self.block) * self.n
        return int(round(self.keep * self.k * self.n))

    def effective_weight(self, layer: int, weight: np.ndarray) -> np.ndarray:
        raise TypeError("a dynamic plan's weight depends on the input: verify against dynamic_reference")

    def effective_bias(self, layer: int, bias):
        return bias

    def summary(self, layer: int) -> dict:
        return {"parts": None, "dynamic": {"block": self.block, "rule": self.rule, "keep": self.keep,
                                           "keep_blocks": self.keep_blocks if self.rule == "topk" else None,
                                           "threshold": self.threshold if self.rule == "threshold" else None,
                                           "score": self.score, "blocks": self.n_blocks,
                                           "compensated": self.fill is not None}}

    def compensation(self, weight: np.ndarray) -> np.ndarray | None:
        """[n_blocks, N] float32: what each skipped block adds, fill_b @ W_b (None: nothing)."""
        if self.fill is None:
            return None
        fill, w = np.asarray(self.fill, np.float64), np.asarray(weight, np.float64)
        return np.stack([fill[b * self.block:(b + 1) * self.block] @ w[b * self.block:(b + 1) * self.block]
                         for b in range(self.n_blocks)]).astype(np.float32)

    # -- the selection, in numpy (tests and calibration use it; the forms write it as nodes) ----

    def block_scores(self, x: np.ndarray) -> np.ndarray:
        """[n_blocks] scores of one call's activation ``x`` [..., K] (float64)."""
        return block_scores(x, self.block, self.scales)

    def kept_blocks(self, x: np.ndarray) -> np.ndarray:
        """Indices of the blocks one call with activation ``x`` keeps, ascending."""
        return select(self.block_scores(x), self.rule, self.keep_blocks, self.threshold)


def block_scores(x: np.ndarray, block: int, scales: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    n_blocks = math.ceil(k / block)
    padded = np.zeros((flat.shape[0], n_blocks * block))
    padded[:, :k] = flat
    sums = (padded.reshape(flat.shape[0], n_blocks, block) ** 2).sum(axis=(0, 2))
    return np.sqrt(sums / max(1, flat.shape[0])) * np.asarray(scales, dtype=np.float64)


def select(scores: np.ndarray, rule: str, keep_blocks: int, threshold: float) -> np.ndarray:
    if rule == "topk":
        return np.sort(np.argsort(-scores, kind="stable")[:keep_blocks])
    return np.flatnonzero(scores > threshold)


def weight_scales(weight: np.ndarray, block: int, score: str) -> np.ndarray:
    """S_b: the Frobenius norm of each block of rows of ``weight`` (``xw``), or ones (``x``)."""
    k = weight.shape[0]
    n_blocks = math.ceil(k / block)
    if score == "x":
        return np.ones(n_blocks, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float64)
    return np.array([np.linalg.norm(w[b * block:(b + 1) * block]) for b in range(n_blocks)], dtype=np.float32)


def calibrated_threshold(activations: list[np.ndarray], block: int, scales: np.ndarray, keep: float) -> float:
    """The score threshold that keeps ``keep`` of the blocks on average over ``activations`` (one
    array per call; each call's blocks scored over its rows, as the kernel does)."""
    scores = np.concatenate([block_scores(x, block, scales) for x in activations])
    if keep >= 1.0:
        return float(np.nextafter(np.float32(scores.min()), np.float32(-np.inf))) if scores.size else 0.0
    return float(np.float32(np.quantile(scores, 1.0 - keep)))


def skipped_means(plan: DynamicPlan, activations: list[np.ndarray]) -> np.ndarray:
    """[K] float32: per feature, the mean of its value over the rows of the calibration calls whose
    selection skipped its block (0 for blocks never skipped)."""
    sums, counts = np.zeros(plan.n_blocks * plan.block), np.zeros(plan.n_blocks)
    for x in activations:
        flat = np.asarray(x, np.float64).reshape(-1, plan.k)
        skipped = np.ones(plan.n_blocks, bool)
        skipped[plan.kept_blocks(flat)] = False
        padded = np.zeros(plan.n_blocks * plan.block)
        padded[:plan.k] = flat.sum(axis=0)
        sums += np.repeat(skipped, plan.block) * padded
        counts += skipped * flat.shape[0]
    means = sums / np.maximum(np.repeat(counts, plan.block), 1)
    return means[:plan.k].astype(np.float32)


def make_plan(weight: np.ndarray, *, block: int, keep: float, rule: str = "topk", score: str = "xw",
              activations: list[np.ndarray] | None = None, compensate: bool = False) -> DynamicPlan:
    """The dynamic plan of one weight [K, N]; the threshold rule and ``compensate`` calibrate on
    ``activations`` (one array per call)."""
    k, n = weight.shape
    scales = weight_scales(weight, block, score)
    threshold = 0.0
    if (rule == "threshold" or compensate) and not activations:
        raise ValueError("the threshold rule and compensation need calibration activations")
    if rule == "threshold":
        threshold = calibrated_threshold(activations, block, scales, keep)
    plan = DynamicPlan(k, n, block, rule, keep, scales, score, threshold)
    if compensate:
        plan = replace(plan, fill=skipped_means(plan, activations))
    return plan


MIN_OPSET = 15
"""The dynamic forms and their verification reference use ops of opset 15 (Shape with start/end)."""


def dynamic_reason(site, block: int, opset: int = MIN_OPSET) -> str | None:
    """Why ``site`` cannot be made dynamic (None if it can)."""
    if site.reason is not None:
        return site.reason
    if site.scope != "main":
        return "inside a subgraph: dynamic sites are made in the main graph"
    if opset < MIN_OPSET:
        return f"dynamic sites need opset >= {MIN_OPSET} (this model has {opset})"
    if site.weight.dtype != np.float32:
        return f"dynamic sites are float32 only (this weight is {site.weight.dtype}; the kernel computes float32)"
    if site.trans_a:
        return "Gemm with transA: the dynamic forms take the activation as rows"
    if site.weight.shape[0] < 2 * block:
        return f"fewer than 2 blocks of {block} inputs (K = {site.weight.shape[0]})"
    return None


__all__ = ["DynamicPlan", "RULES", "SCORES", "block_scores", "calibrated_threshold", "dynamic_reason", "make_plan",
           "select", "skipped_means", "weight_scales"]
