"""Budgets: which plan each site gets, through the :class:`~onnx_split.plans.Planner` protocol only.

- ``--parts G``: the planner's plan of G parts;
- ``--keep F``: the cheapest plan that keeps at least F of the site's significance;
- ``--flops F``: the plan that keeps the most significance at most F of the dense FLOPs;
- ``--tolerance E``: :func:`search` over every site's ladder of plans (2/4/8/16 parts, or 1/2 ..
  1/16 of the tiles), for the largest saving whose model output error stays within E.

Pure numpy: the error of a choice is measured by the caller's function (pruned.Evaluator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .plans import Planner, WeightPlan, planner_for
from .plans.base import LEVELS

__all__ = ["LEVELS", "SearchResult", "by_budget", "make_planner", "refusal", "search"]


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


@dataclass
class SearchResult:
    choice: dict[int, WeightPlan]  # site -> its plan (sites left dense are absent)
    error: float  # of the choice, on the search samples
    evaluations: int
    stopped: dict[int, tuple[WeightPlan, float, tuple[int, ...]]]
    """site -> the next step that broke the budget, its error, and the other sites whose plans were
    in that trial (empty when the step was tried alone)"""


def search(ladders: dict[int, list[WeightPlan]], error: Callable[[dict[int, WeightPlan]], float], tolerance: float
           ) -> SearchResult:
    """Greedy descent: start dense; at each step try moving each site one rung down its ladder and
    take the move with the most FLOPs saved per unit of added error among those that keep the
    error within ``tolerance``; a site whose next rung breaks the budget stops there."""
    choice: dict[int, WeightPlan] = {}
    stopped: dict[int, tuple[WeightPlan, float, tuple[int, ...]]] = {}
    rung = {i: 0 for i in ladders if ladders[i]}
    now, evaluations = 0.0, 0
    while rung:
        best = None
        for i in list(rung):
            option = ladders[i][rung[i]]
            trial = {**choice, i: option}
            err = error(trial)
            evaluations += 1
            if not err <= tolerance:  # NaN breaks the budget too
                stopped[i] = (option, err, tuple(sorted(j for j in choice if j != i)))
                del rung[i]
                continue
            before = choice[i].flops if i in choice else 1.0
            gain = (before - option.flops) * option.macs_dense()
            added = err - now
            key = (added <= 0, gain / max(added, 1e-12))
            if best is None or key > best[0]:
                best = (key, i, option, err)
        if best is None:
            break
        _, i, option, now = best
        choice[i] = option
        rung[i] += 1
        if rung[i] >= len(ladders[i]):
            del rung[i]
    return SearchResult(choice, now, evaluations, stopped)
