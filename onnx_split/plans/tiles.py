"""Budgets' candidates of static tiles: the most significant ``tile x tile`` tiles of W kept."""
from __future__ import annotations

import math

import numpy as np

from ..partition import static_tiles
from ..significance import values
from .base import LadderMixin
from .blocks import BlockPlan, lossy_plan


class TilePlanner(LadderMixin):
    def __init__(self, scores, partitioner: str = "tiles", *, cost, score: str | None = None, seed: int = 0,
                 max_parts: int = 16, tile: int = 64):
        self.significance, self.tile, self.cost, self.score = scores, tile, cost, score
        k, n = self.shape = tuple(scores.shape)
        scores = values(scores)
        self.max_parts = max(1, min(max_parts, k, n))
        rows, cols = -(-k // tile), -(-n // tile)
        sums = np.add.reduceat(np.add.reduceat(scores, np.arange(0, k, tile), axis=0),
                               np.arange(0, n, tile), axis=1)
        areas = np.outer(np.minimum(tile, k - np.arange(0, k, tile)), np.minimum(tile, n - np.arange(0, n, tile)))
        order = np.argsort(-sums.ravel(), kind="stable")  # the order static_tiles keeps them in
        self.n_tiles = rows * cols
        self._tile_score = np.cumsum(sums.ravel()[order])
        self._tile_area = np.cumsum(areas.ravel()[order])
        self._cache: dict[int, BlockPlan] = {}

    @property
    def scores(self):
        """The K x N scores (made now where they are made when read)."""
        return values(self.significance)

    def at(self, count: int) -> BlockPlan:
        """The best ``count`` tiles."""
        count = int(count)
        if count not in self._cache:
            # static_tiles keeps ceil(keep * n) tiles: aim between counts so rounding cannot add one
            scores = self.scores
            plan = static_tiles(scores, self.tile, (count - 0.5) / self.n_tiles)
            label = f"{count} of {self.n_tiles} {self.tile}x{self.tile} tiles"
            self._cache[count] = lossy_plan(plan, scores, label, self.score, self.cost)
        return self._cache[count]

    def step(self, level: int) -> BlockPlan | None:
        """1/``level`` of the tiles; None where that is all of them."""
        count = max(1, math.ceil(self.n_tiles / level))
        return self.at(count) if count < self.n_tiles else None

    @staticmethod
    def level_name(level: int) -> str:
        return f"1/{level} of tiles"

    def for_parts(self, parts: int) -> BlockPlan | None:
        return None  # config refuses --parts with tiles

    def for_keep(self, keep: float) -> BlockPlan | None:
        """The fewest tiles, best first, that keep at least ``keep``."""
        count = int(np.searchsorted(self._tile_score, keep * self._tile_score[-1] * (1 - 1e-12))) + 1
        return self.at(count) if count < self.n_tiles else None

    def for_flops(self, flops: float) -> BlockPlan | None:
        """The most tiles whose cost fits ``flops``."""
        k, n = self.shape
        if flops >= 1:
            return None
        count = int(np.searchsorted(self._tile_area, flops * k * n, side="right"))
        while 0 < count < self.n_tiles and self.at(count).flops > flops:
            count -= 1  # the form's padding, or outputs no kept tile feeds (one multiply-add each)
        return self.at(count) if 0 < count < self.n_tiles else None

    def refusal(self, budget: str, value: float, max_parts_option: int) -> str:
        if budget == "keep":
            return self.keep_refusal(value)
        return (f"no set of {self.tile}x{self.tile} tiles costs at most {value:g} of the dense FLOPs "
                f"(the best tile alone costs {self.at(1).flops:.1%})")
