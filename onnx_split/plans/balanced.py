"""Budgets' candidates of the balanced partitioners (metis, spectral, random): G parts of equal
size under row/column permutations, keeping the most significance."""
from __future__ import annotations

import math

from ..partition import BALANCED
from ..significance import values
from .base import LEVELS, LadderMixin
from .blocks import BlockPlan, lossy_plan


class BalancedPlanner(LadderMixin):
    def __init__(self, scores, partitioner: str, *, cost, score: str | None = None, seed: int = 0,
                 max_parts: int = 16, tile: int = 64):
        """``scores``: an array, or a significance.Significance made when read; ``cost``: multiply-adds
        per row a plan costs in the form it will be written in."""
        self.significance, self.partitioner, self.seed, self.cost, self.score = scores, partitioner, seed, cost, score
        k, n = scores.shape
        self.max_parts = max(1, min(max_parts, k, n))
        self._cache: dict[int, BlockPlan] = {}
        self.ahead = None
        """A callable giving {parts: Plan} made elsewhere (partition/ahead.py), asked once; None: none."""
        self._made: dict = {}

    @property
    def scores(self):
        """The K x N scores (made now where they are made when read)."""
        return values(self.significance)

    def levels(self) -> tuple[int, ...]:
        """The part counts :meth:`step` plans at."""
        return tuple(level for level in LEVELS if 1 < level <= self.max_parts)

    def at(self, parts: int) -> BlockPlan:
        if parts not in self._cache:
            if self.ahead is not None:
                fetch, self.ahead = self.ahead, None
                self._made = fetch() or {}
            plan, scores = self._made.pop(parts, None), self.scores
            if plan is None:
                plan = BALANCED[self.partitioner](scores, parts, seed=self.seed)
            self._cache[parts] = lossy_plan(plan, scores, f"{len(plan.parts)} {self.partitioner} parts",
                                            self.score, self.cost)
        return self._cache[parts]

    def step(self, level: int) -> BlockPlan | None:
        return self.at(level) if 1 < level <= self.max_parts else None

    @staticmethod
    def level_name(level: int) -> str:
        return f"{level} parts"

    def for_parts(self, parts: int) -> BlockPlan | None:
        return self.at(min(parts, self.max_parts)) if min(parts, self.max_parts) > 1 else None

    def for_keep(self, keep: float) -> BlockPlan | None:
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

    def for_flops(self, flops: float) -> BlockPlan | None:
        if flops >= 1:  # the dense weight fits and keeps everything
            return None
        # more parts cost less but usually keep less; blocks that fit the budget exactly are often a
        # power of two (8 trained blocks fit 8 parts, not 5): the fewest parts that fit, the next
        # count, and every power of two up to --max-parts are tried; the one keeping most wins
        first = next((g for g in range(max(2, math.ceil(1 / flops)), self.max_parts + 1)
                      if self.at(g).flops <= flops), None)  # in the form's cost, padding included
        if first is None:
            return None
        counts = {first, min(first + 1, self.max_parts)} | {g for g in (2, 4, 8, 16, 32, 64)
                                                            if first < g <= self.max_parts}
        fits = [self.at(g) for g in sorted(counts) if self.at(g).flops <= flops]
        return max(fits, key=lambda o: o.retained)  # ties: the fewest parts (max keeps the first)

    def refusal(self, budget: str, value: float, max_parts_option: int) -> str:
        if budget == "parts":
            return (f"--parts {value:g} is capped to 1 here (by --max-parts {max_parts_option} or the "
                    f"weight's smaller side): nothing to split")
        if budget == "keep":
            return self.keep_refusal(value)
        return (f"no plan of at most {self.max_parts} parts (--max-parts {max_parts_option}, or the weight's "
                f"smaller side) costs at most {value:g} of the dense FLOPs")

