"""``block-factor`` plans: a site's weight replaced by W' = B₁·Π·B₂ (``--factorize blocks``: B₁, B₂
block-diagonal with G blocks, Π the stride permutation) or by W' = U·V (``--factorize lowrank``,
G = 1), fitted on calibration data (factorize/structured.py).

Unlike the compressed factorizations, the rewrite computes the two factors at run time (two
MatMuls, rewrite/block_factor.py), so the plan saves multiply-adds: ``flops`` is the factors'
parameters over K·N. It approximates on purpose: verified against :meth:`BlockFactorPlan.effective_weight`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..factorize.structured import product
from ..text import percent


@dataclass(frozen=True, eq=False)
class BlockFactorPlan:
    kind: ClassVar[str] = "block-factor"
    method: str
    density: float
    """The factors' parameters as a fraction of the weight's K·N."""
    first: np.ndarray = field(repr=False)
    """B₁'s blocks [G, K/G, M/G] in the weight's dtype (``x @ W`` orientation)."""
    second: np.ndarray = field(repr=False)
    """B₂'s blocks [G, M/G, N/G]."""
    error: float | None = None
    """||X(W − W')|| / ||XW|| on the calibration samples the factors were fitted on."""
    held_out: float | None = None
    stored_bytes: int | None = None
    approximates: bool = True
    retained: float | None = None

    @property
    def groups(self) -> int:
        return int(self.first.shape[0])

    @property
    def rank(self) -> int:
        return int(self.first.shape[2] // self.groups)

    @property
    def hidden(self) -> int:
        return int(self.groups * self.first.shape[2])

    @property
    def flops(self) -> float:
        k, n = self.layer_shape(0)
        return (self.first.size + self.second.size) / (k * n)

    @property
    def label(self) -> str:
        k, n = self.layer_shape(0)
        if self.groups == 1:
            return f"rank {self.rank} ({k}x{self.rank} · {self.rank}x{n}), {percent(self.flops)} of the parameters"
        return (f"{self.groups} blocks x 2 through {self.hidden} features (rank {self.rank} per block pair), "
                f"{percent(self.flops)} of the parameters")

    @property
    def n_layers(self) -> int:
        return 1

    def layer_shape(self, layer: int) -> tuple[int, int]:
        g = self.groups
        return int(g * self.first.shape[1]), int(g * self.second.shape[2])

    def macs_dense(self, layer: int | None = None) -> int:
        k, n = self.layer_shape(0)
        return k * n

    def macs_factors(self) -> int:
        """Multiply-adds per activation row of the two MatMuls."""
        return int(self.first.size + self.second.size)

    def with_bytes(self, stored: int) -> "BlockFactorPlan":
        return dataclasses.replace(self, stored_bytes=int(stored))

    def effective_weight(self, layer: int, weight: np.ndarray) -> np.ndarray:
        return product(self.first.astype(np.float64), self.second.astype(np.float64)).astype(weight.dtype)

    def effective_bias(self, layer: int, bias):
        return bias

    def summary(self, layer: int) -> dict:
        k, n = self.layer_shape(0)
        return {"parts": self.groups, "factorized": {
            "method": self.method, "density": self.flops, "blocks": self.groups, "rank": self.rank,
            "hidden": self.hidden, "factors": [list(self.first.shape), list(self.second.shape)],
            "error": self.error, "held_out": self.held_out,
            "bytes_before": k * n * self.first.dtype.itemsize, "bytes_after": self.stored_bytes}}


def make_block_plan(fitted, dtype, error: float | None = None, held_out: float | None = None) -> BlockFactorPlan:
    """The plan of a :class:`~onnx_split.factorize.structured.Structured`, its factors stored in ``dtype``."""
    first, second = (np.ascontiguousarray(f.astype(dtype)) for f in (fitted.first, fitted.second))
    plan = BlockFactorPlan(fitted.method, fitted.density, first, second, error, held_out)
    return plan.with_bytes(first.nbytes + second.nbytes)


__all__ = ["BlockFactorPlan", "make_block_plan"]
