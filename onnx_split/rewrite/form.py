"""The two types of the registry: a rewrite form, and a ``--layout`` choice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _never(chain, plan) -> str | None:
    return None


@dataclass(frozen=True)
class Form:
    name: str
    accepts: frozenset[str]
    """Plan kinds (``WeightPlan.kind``) this form can write."""
    emit: Callable
    """(emitter, chain, plan) -> the name of the tensor holding the chain's output."""
    cost: Callable
    """(plan, layer or None) -> multiply-adds per activation row this form executes."""
    refuse: Callable = _never
    """(chain, plan) -> why this form cannot write it, or None."""
    doc: str = ""


@dataclass(frozen=True)
class Layout:
    name: str
    pick: Callable
    """(chain, plan) -> the form written without measuring."""
    cost_form: str
    """The form whose cost a budget counts under this layout."""
    wrap: Callable | None = None
    """(emitter, chain, output, opset, index, written ids) -> a FunctionProto: wraps any form's nodes
    in one call of a model-local function (``function``); None writes the nodes as they are."""
    help: str = ""
