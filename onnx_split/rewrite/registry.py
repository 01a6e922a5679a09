"""The rewrite forms and the ``--layout`` choices, in one registry.

A *form* is one way of writing a plan as nodes (``parallel``, ``parallel-rows``, ``batched``): it
declares its name, the plan kinds it accepts, why it refuses a given chain (a reason, or None),
what it costs per activation row, and how it emits. A *layout* is what ``--layout`` names: which
form it writes for a chain without measuring, which form's cost a budget counts, and whether the
nodes are wrapped (``function``). ``--layout auto`` measures every form that accepts the plan.

Adding a form: one module that defines a :class:`Form` (and, if users may name it, a
:class:`Layout`), plus its entry below. The CLI's choices, the config's check, the tuner's
candidates and the budgets' cost rule all read these tables.
"""
from __future__ import annotations

from typing import Callable

from . import batched, function, parallel
from .form import Form, Layout

FORMS: dict[str, Form] = {f.name: f for f in (*parallel.FORMS, *batched.FORMS)}
"""Concrete forms, in the order the tuner measures them."""

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (parallel.LAYOUT, batched.LAYOUT, function.LAYOUT)}
"""``--layout`` choices besides ``auto``."""

AUTO = "auto"
AUTO_COST_FORM = "parallel"
"""With ``--layout auto`` the form is chosen later by timing; budgets count the parts' blocks."""

LAYOUT_NAMES = (AUTO, *LAYOUTS)


def cost_form(layout: str) -> Form:
    """The form whose cost a budget counts under ``--layout layout``."""
    return FORMS[LAYOUTS[layout].cost_form if layout in LAYOUTS else AUTO_COST_FORM]


def layout_macs(plan, form: str, layer: int | None = None) -> int:
    """Multiply-accumulates per activation row that ``form`` executes for ``plan`` (padding
    included), for one ``layer`` or for all."""
    return FORMS[form].cost(plan, layer)


def cost_rule(layout: str) -> Callable:
    form = cost_form(layout)
    return lambda plan: form.cost(plan, None)


def refusal(form: str, chain, plan) -> str | None:
    """Why ``form`` cannot write ``plan`` for ``chain`` (None if it can)."""
    f = FORMS[form]
    if plan.kind not in f.accepts:
        return f"the {form} form does not take {plan.kind} plans"
    return f.refuse(chain, plan)


__all__ = ["AUTO", "FORMS", "Form", "LAYOUTS", "LAYOUT_NAMES", "Layout", "cost_form", "cost_rule", "layout_macs",
           "refusal"]
