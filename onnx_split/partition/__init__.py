"""Partitioners: pure numpy/scipy, each returning a :class:`Plan`."""
from .components import exact_components
from .plan import Part, Plan

__all__ = ["Part", "Plan", "exact_components"]
