"""Plan kinds: what a rewritten site computes, and how budgets choose one.

Every plan kind implements :class:`~onnx_split.plans.base.WeightPlan` (its shapes, what it costs
in a rewrite form, the weight the rewritten node multiplies by, and a summary for the report);
every lossy family implements :class:`~onnx_split.plans.base.Planner` (the plans of one weight
that budgets choose from). The budgets, the error evaluator, the verification reference and the
report use only those two protocols.

``PLANNERS`` maps ``--partitioner`` to its planner. A new plan kind arrives as a module here plus
its entry.
"""
from __future__ import annotations

from .balanced import BalancedPlanner
from .base import Planner, WeightPlan
from .blocks import BlockPlan, exact_plan
from .tiles import TilePlanner

PLANNERS: dict[str, type] = {
    "metis": BalancedPlanner,
    "spectral": BalancedPlanner,
    "tiles": TilePlanner,
    "random": BalancedPlanner,
}
"""``--partitioner`` (lossy) -> the planner class; each is built as ``cls(scores, partitioner, ...)``."""

__all__ = ["BalancedPlanner", "BlockPlan", "PLANNERS", "Planner", "TilePlanner", "WeightPlan", "exact_plan",
           "planner_for"]


def planner_for(scores, partitioner: str, *, cost=None, score: str | None = None, seed: int = 0,
                max_parts: int = 16, tile: int = 64) -> Planner:
    """The planner of ``partitioner`` for one weight's significance ``scores``; ``cost`` (plan ->
    multiply-adds per row) defaults to the parts' blocks, as the parallel forms compute them."""
    cost = cost or (lambda plan: plan.partition.macs_split)
    return PLANNERS[partitioner](scores, partitioner, cost=cost, score=score, seed=seed, max_parts=max_parts,
                                 tile=tile)
