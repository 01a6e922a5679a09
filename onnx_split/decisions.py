"""What each stage decides about a site, as immutable values.

Stages return new decisions instead of editing a shared report; the report (text, JSON, model
metadata) is built once, at the end, from the last decision of every site.

- :class:`Kept`: the site stays as it is; ``stage`` says which step decided and ``reason`` why.
- :class:`Planned`: a plan was chosen for the site (one layer of a :class:`Unit` later).
- :class:`Split`: the site was written as layer ``layer`` of a unit, in ``form``.

``facts`` carry what the analysis found about the site whatever became of it (components,
unused inputs, dead outputs; partitioner and score), as report field names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class Kept:
    stage: str  # sites | where | plan | budget | tune | rewrite | whole-model
    reason: str
    facts: Mapping = field(default_factory=lambda: _EMPTY)
    undone: "Split | None" = None
    """A split that was written and then undone (the whole model was not faster): the report still
    shows what it was."""


@dataclass(frozen=True)
class Planned:
    plan: object  # a WeightPlan of one layer
    reason: str  # the plan's summary, shown for the split site
    facts: Mapping = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class Unit:
    """Sites written together: one site, or a chain of layers split as one set of sub-networks."""

    sites: tuple[int, ...]  # site indices, in chain order
    chain: object  # chains.Chain (its sites carry the weights the rewrite multiplies by)
    plan: object  # a WeightPlan over all the unit's layers
    reasons: tuple[str, ...]  # per layer: the summary shown for the split site


@dataclass(frozen=True)
class Split:
    unit: int  # index of the unit this site was written in
    layer: int
    form: str  # the concrete form (parallel, parallel-rows, batched)
    layout: str  # as written: the form, or "function"
    reason: str
    facts: Mapping = field(default_factory=lambda: _EMPTY)


Decision = Kept | Planned | Split


def after_forms(decisions: dict[int, Decision], units: list[Unit], forms: dict[int, str],
                reasons: dict[int, str]) -> dict[int, Decision]:
    """New decisions: the sites of every unit the tuner kept dense are kept, with its reason."""
    new = dict(decisions)
    for u, form in forms.items():
        if form == "dense":
            for i in units[u].sites:
                new[i] = Kept("tune", f"--layout auto {reasons[u]}", decisions[i].facts)
    return new


def after_rewrite(decisions: dict[int, Decision], units: list[Unit], written: dict[int, tuple[str, str]],
                  refused: dict[int, str]) -> dict[int, Decision]:
    """New decisions: the sites of written units are split (``written``: unit -> (form, layout)),
    those of refused units kept with the form's reason."""
    new = dict(decisions)
    for u, unit in enumerate(units):
        for layer, i in enumerate(unit.sites):
            if u in refused:
                new[i] = Kept("rewrite", refused[u], decisions[i].facts)
            elif u in written:
                new[i] = Split(u, layer, *written[u], unit.reasons[layer], decisions[i].facts)
    return new


def undone(decisions: dict[int, Decision], why: str) -> dict[int, Decision]:
    """New decisions when the original is written after all: every split undone, with why."""
    return {i: Kept("whole-model", why, d.facts, undone=d) if isinstance(d, Split) else d for i, d in decisions.items()}
