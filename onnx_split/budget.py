"""Budgets: which lossy plan each site gets.

A :class:`Planner` makes the plans of one weight with the chosen partitioner, each an
:class:`Option` with its retained significance and FLOPs fraction:

- ``--parts G``: exactly G balanced parts;
- ``--keep F``: the cheapest plan that keeps at least F of the site's significance (balanced: the
  most parts; tiles: the fewest tiles, best first);
- ``--flops F``: the plan that keeps the most significance at most F of the dense FLOPs (balanced:
  of the fewest parts that fit, the next count and the powers of two up to --max-parts; tiles: the
  most tiles that fit);
- ``--tolerance E``: :func:`search` over every site's ladder of 2/4/8/16 parts (tiles: 1/2 .. 1/16
  of the tiles), for the largest saving whose model output error stays within E.

Pure numpy: the error of a choice is measured by the caller's function (pruned.Evaluator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .partition import BALANCED, ChainPlan, static_tiles
from .pruned import block_mask, retained

LEVELS = (2, 4, 8, 16)
"""The dry run's columns and the tolerance search's steps: parts, or 1/level of the tiles."""


@dataclass(frozen=True)
class Option:
    plan: ChainPlan  # one layer, as the rewrite takes it
    mask: np.ndarray  # K x N, the weights the parts keep (the rest is zeroed)
    retained: float  # fraction of the site's significance inside the mask
    flops: float  # fraction of the dense multiply-adds the plan costs in the layout it is written in
    label: str


class Planner:
    """The lossy plans of one weight, from its significance ``scores`` (K x N)."""

    def __init__(self, scores: np.ndarray, partitioner: str, *, tile: int = 64, seed: int = 0, max_parts: int = 16,
                 cost: Callable[[ChainPlan], int] | None = None):
        """``cost``: multiply-adds per row a plan costs in the layout it will be written in (default:
        the parts' blocks, as the parallel layout computes them)."""
        self.scores, self.partitioner, self.tile, self.seed = scores, partitioner, tile, seed
        self.cost = cost or (lambda chain: chain.macs_split)
        k, n = scores.shape
        self.max_parts = max(1, min(max_parts, k, n))
        self._cache: dict[int, Option] = {}
        if partitioner == "tiles":
            rows, cols = -(-k // tile), -(-n // tile)
            sums = np.add.reduceat(np.add.reduceat(scores, np.arange(0, k, tile), axis=0),
                                   np.arange(0, n, tile), axis=1)
            areas = np.outer(np.minimum(tile, k - np.arange(0, k, tile)), np.minimum(tile, n - np.arange(0, n, tile)))
            order = np.argsort(-sums.ravel(), kind="stable")  # the order static_tiles keeps them in
            self.n_tiles = rows * cols
            self._tile_score = np.cumsum(sums.ravel()[order])
            self._tile_area = np.cumsum(areas.ravel()[order])

    def at(self, level: int) -> Option:
        """``level`` balanced parts, or the best ``level`` tiles."""
        if level not in self._cache:
            if self.partitioner == "tiles":
                count = int(level)
                # static_tiles keeps ceil(keep * n) tiles: aim between counts so rounding cannot add one
                plan = static_tiles(self.scores, self.tile, (count - 0.5) / self.n_tiles)
                label = f"{count} of {self.n_tiles} {self.tile}x{self.tile} tiles"
            else:
                plan = BALANCED[self.partitioner](self.scores, level, seed=self.seed)
                label = f"{len(plan.parts)} {self.partitioner} parts"
            chain = ChainPlan.from_plan(plan, dead_part=True)
            mask = block_mask(plan)
            k, n = self.scores.shape
            self._cache[level] = Option(chain, mask, retained(self.scores, mask), self.cost(chain) / (k * n), label)
        return self._cache[level]

    def step(self, level: int) -> Option | None:
        """``level`` balanced parts, or 1/``level`` of the tiles; None where that is no split."""
        if self.partitioner == "tiles":
            count = max(1, math.ceil(self.n_tiles / level))
            return self.at(count) if count < self.n_tiles else None
        return self.at(level) if 1 < level <= self.max_parts else None

    def ladder(self) -> list[Option]:
        """Options of increasing saving: 2/4/8/16 parts, or 1/2 .. 1/16 of the tiles."""
        options = [self.step(level) for level in LEVELS]
        return list({id(o): o for o in options if o is not None}.values())

    def for_parts(self, parts: int) -> Option | None:
        return self.at(min(parts, self.max_parts)) if min(parts, self.max_parts) > 1 else None

    def for_keep(self, keep: float) -> Option | None:
        if self.partitioner == "tiles":
            count = int(np.searchsorted(self._tile_score, keep * self._tile_score[-1] * (1 - 1e-12))) + 1
            return self.at(count) if count < self.n_tiles else None
        # retained falls as parts grow, but not strictly (8 planted blocks fit 8 parts, not 5):
        # the largest power of two that keeps enough, then bisection up to the next power
        passing = [g for g in LEVELS if g <= self.max_parts and self.at(g).retained >= keep]
        if not passing:
            return None
        best, lo, hi = self.at(passing[-1]), passing[-1] + 1, min(2 * passing[-1] - 1, self.max_parts)
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.at(mid).retained >= keep:
                best, lo = self.at(mid), mid + 1
            else:
                hi = mid - 1
        return best

    def for_flops(self, flops: float) -> Option | None:
        k, n = self.scores.shape
        if flops >= 1:  # the dense weight fits and keeps everything
            return None
        if self.partitioner == "tiles":
            count = int(np.searchsorted(self._tile_area, flops * k * n, side="right"))
            while 0 < count < self.n_tiles and self.at(count).flops > flops:
                count -= 1  # the layout's padding, or outputs no kept tile feeds (one multiply-add each)
            return self.at(count) if 0 < count < self.n_tiles else None
        # more parts cost less but usually keep less; blocks that fit the budget exactly are often a
        # power of two (8 trained blocks fit 8 parts, not 5): the fewest parts that fit, the next
        # count, and every power of two up to --max-parts are tried; the one keeping most wins
        first = next((g for g in range(max(2, math.ceil(1 / flops)), self.max_parts + 1)
                      if self.at(g).flops <= flops), None)  # in the layout's cost, padding included
        if first is None:
            return None
        counts = {first, min(first + 1, self.max_parts)} | {g for g in (2, 4, 8, 16, 32, 64)
                                                            if first < g <= self.max_parts}
        fits = [self.at(g) for g in sorted(counts) if self.at(g).flops <= flops]
        return max(fits, key=lambda o: o.retained)  # ties: the fewest parts (max keeps the first)


@dataclass
class SearchResult:
    choice: dict[int, Option]  # site -> its option (sites left dense are absent)
    error: float  # of the choice, on the search samples
    evaluations: int
    stopped: dict[int, tuple[Option, float]]  # site -> the next step that broke the budget, and its error


def search(ladders: dict[int, list[Option]], error: Callable[[dict[int, Option]], float], tolerance: float
           ) -> SearchResult:
    """Greedy descent: start dense; at each step try moving each site one rung down its ladder and
    take the move with the most FLOPs saved per unit of added error among those that keep the
    error within ``tolerance``; a site whose next rung breaks the budget stops there.

    """
    choice: dict[int, Option] = {}
    stopped: dict[int, tuple[Option, float]] = {}
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
                stopped[i] = (option, err)
                del rung[i]
                continue
            before = choice[i].flops if i in choice else 1.0
            gain = (before - option.flops) * option.mask.size
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
