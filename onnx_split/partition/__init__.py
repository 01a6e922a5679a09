"""Partitioners: pure numpy/scipy. One layer gets a :class:`Plan`, a chain of layers a :class:`ChainPlan`."""
from .chain import ChainPart, ChainPlan, joint_components
from .components import exact_components
from .plan import Part, Plan

__all__ = ["ChainPart", "ChainPlan", "Part", "Plan", "exact_components", "joint_components"]
