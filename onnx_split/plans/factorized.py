"""``factorized`` plans: a site's weight replaced by a product of sparse factors fitted on
calibration data (``--factorize``, factorize/): one sparse matrix W' (magnitude, Wanda, SparseGPT,
ADMM) or two, W' = A·B (DSF).

The rewrite still multiplies by one dense matrix (the form stores the factors compressed and
ORT folds their product at load), so the plan saves bytes, not multiply-adds: ``flops`` is 1.
It approximates on purpose: verified against :meth:`FactorPlan.effective_weight`, the product.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import reduce
from typing import ClassVar

import numpy as np

from ..text import percent


@dataclass(frozen=True, eq=False)
class FactorPlan:
    kind: ClassVar[str] = "factorized"
    method: str
    density: float
    """The fraction of the weight's K·N entries kept as non-zeros, over all factors."""
    factors: tuple[np.ndarray, ...] = field(repr=False)
    """In the ``x @ W`` orientation and the weight's dtype; their product is what the node multiplies by."""
    error: float | None = None
    """||X(W − W')|| / ||XW|| on the calibration samples the factors were fitted on."""
    held_out: float | None = None
    """The same on the held-out samples (None without any)."""
    stored_bytes: int | None = None
    """What the rewrite form stores for the factors (set by the planner, which knows the form)."""
    fit_seconds: float | None = None
    """Wall-clock seconds of the fit (fit_pool.py), where it ran."""
    estimated_seconds: float | None = None
    """What the fit was estimated to take before it started (fit_pool.Estimator)."""
    approximates: bool = True
    retained: float | None = None
    flops: float = 1.0

    @property
    def nonzeros(self) -> int:
        return int(sum(np.count_nonzero(f) for f in self.factors))

    @property
    def label(self) -> str:
        shapes = " · ".join("x".join(map(str, f.shape)) for f in self.factors)
        return f"{self.method} at {percent(self.density)} density ({self.nonzeros} non-zeros in {shapes})"

    @property
    def n_layers(self) -> int:
        return 1

    def layer_shape(self, layer: int) -> tuple[int, int]:
        return int(self.factors[0].shape[0]), int(self.factors[-1].shape[1])

    def macs_dense(self, layer: int | None = None) -> int:
        k, n = self.layer_shape(0)
        return k * n

    def with_bytes(self, stored: int) -> "FactorPlan":
        return dataclasses.replace(self, stored_bytes=int(stored))

    def effective_weight(self, layer: int, weight: np.ndarray) -> np.ndarray:
        product = reduce(np.matmul, [f.astype(np.float64) for f in self.factors])
        return product.astype(weight.dtype)

    def effective_bias(self, layer: int, bias):
        return bias

    def summary(self, layer: int) -> dict:
        k, n = self.layer_shape(0)
        return {"parts": None, "factorized": {
            "method": self.method, "density": self.density, "nonzeros": self.nonzeros,
            "factors": [list(f.shape) for f in self.factors], "error": self.error, "held_out": self.held_out,
            "bytes_before": k * n * self.factors[0].dtype.itemsize, "bytes_after": self.stored_bytes,
            "fit_seconds": self.fit_seconds, "estimated_seconds": self.estimated_seconds}}


def make_plan(fitted, dtype, error: float | None = None, held_out: float | None = None) -> FactorPlan:
    """The plan of a :class:`~onnx_split.factorize.Fitted`, its factors stored in ``dtype``."""
    factors = tuple(np.ascontiguousarray(f.astype(dtype)) for f in fitted.factors)
    return FactorPlan(fitted.method, fitted.density, factors, error, held_out)


__all__ = ["FactorPlan", "make_plan"]
