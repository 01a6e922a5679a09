"""Budgets: which plan each site gets, through the :class:`~onnx_split.plans.Planner` protocol only.

- ``--parts G``: the planner's plan of G parts;
- ``--keep F``: the cheapest plan that keeps at least F of the site's significance;
- ``--flops F``: the plan that keeps the most significance at most F of the dense FLOPs;
- ``--tolerance E``: allocate.py shares E among every site's ladder of plans (2/4/8/16 parts, or
  1/2 .. 1/16 of the tiles), from measured estimates (lossy.py).
"""
from __future__ import annotations

from .plans import Planner, WeightPlan, planner_for
from .plans.base import LEVELS

__all__ = ["LEVELS", "by_budget", "make_planner", "refusal"]


def make_planner(scores, config, cost, score: str | None) -> Planner:
    """The planner of ``config.partitioner`` for one weight's significance ``scores``."""
    return planner_for(scores, config.partitioner, cost=cost, score=score, seed=config.seed,
                       max_parts=config.max_parts, tile=config.tile)


def by_budget(planner: Planner, config) -> WeightPlan | None:
    """The plan of ``--parts``, ``--keep`` or ``--flops`` (None: the site stays dense)."""
    if config.parts is not None:
        return planner.for_parts(config.parts)
    if config.keep is not None:
        return planner.for_keep(config.keep)
    return planner.for_flops(config.flops)


def refusal(planner: Planner, config) -> str:
    """Why ``--parts``, ``--keep`` or ``--flops`` left the site dense."""
    if config.flops is not None and config.flops >= 1:
        return f"--flops {config.flops:g} allows the dense cost"
    for name in ("parts", "keep", "flops"):
        if getattr(config, name) is not None:
            return planner.refusal(name, getattr(config, name), config.max_parts)
    raise ValueError("no --parts, --keep or --flops budget")
