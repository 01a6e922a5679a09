"""The two protocols every plan kind and every lossy planner implement.

A *plan* says what one rewrite computes: the weights of its layers (one layer for a site, several
for a chain), what that costs, and what the rewritten nodes multiply by. A *planner* makes the
candidate plans of one weight from its significance, for the budgets to choose from.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Protocol

import numpy as np

from ..text import percent


class WeightPlan(Protocol):
    kind: ClassVar[str]
    """The plan kind; rewrite forms declare which kinds they accept."""
    approximates: bool
    """True when the plan changes what the node computes on purpose (a budget chose it): the
    rewrite is verified against :meth:`effective_weight` and its output error is measured. False
    for a plan that claims to compute the original weight (verified against the original)."""
    label: str
    """What was chosen, in a few words ("8 metis parts")."""
    retained: float | None
    """Lossy plans: the fraction of the weight's significance kept (None where that means nothing)."""
    flops: float
    """Lossy plans: the fraction of the dense multiply-adds in the form the budget counts."""

    @property
    def n_layers(self) -> int: ...

    def layer_shape(self, layer: int) -> tuple[int, int]:
        """[K, N] of the weight of ``layer`` as used in ``x @ W``."""

    def macs_dense(self, layer: int | None = None) -> int:
        """Multiply-adds per activation row of the original weights."""

    def effective_weight(self, layer: int, weight: np.ndarray) -> np.ndarray:
        """What the rewritten node of ``layer`` multiplies by, given the original ``weight``."""

    def effective_bias(self, layer: int, bias):
        """The Gemm's C (as stored) the rewritten node of ``layer`` adds, given the original one
        (the original, unless the plan refits it)."""

    def summary(self, layer: int) -> dict:
        """Report fields of one layer (parts, part shapes, components, retained, ...)."""


Cost = Callable[[WeightPlan], int]
"""Multiply-adds per activation row a plan costs in the form it will be written in."""


class Planner(Protocol):
    """The candidate plans of one weight. Budgets call only these methods."""

    max_parts: int

    def ladder(self) -> list[WeightPlan]:
        """Plans of increasing saving (the ``--tolerance`` search steps down it)."""

    def step(self, level: int) -> WeightPlan | None:
        """The plan at one of the dry run's levels (2/4/8/16), None where that is no split."""

    def for_parts(self, parts: int) -> WeightPlan | None: ...

    def for_keep(self, keep: float) -> WeightPlan | None: ...

    def for_flops(self, flops: float) -> WeightPlan | None: ...

    def refusal(self, budget: str, value: float, max_parts_option: int) -> str:
        """Why no plan of this weight meets ``budget`` (``parts``, ``keep`` or ``flops``) at ``value``."""

    @staticmethod
    def level_name(level: int) -> str:
        """The dry run's column heading of ``level``."""


LEVELS = (2, 4, 8, 16)
"""The dry run's columns and the tolerance search's steps (parts, or 1/level of the tiles)."""


class LadderMixin:
    """What every planner derives from its ``step``: the ladder, and why no plan keeps enough."""

    score: str | None

    def ladder(self) -> list:
        options = [self.step(level) for level in LEVELS]
        return list({id(o): o for o in options if o is not None}.values())

    def keep_refusal(self, value: float) -> str:


        first = self.ladder()[:1]
        best = f" ({first[0].label} keep {percent(first[0].retained)})" if first else ""
        return f"no split keeps {value:g} of its {self.score} significance{best}"
