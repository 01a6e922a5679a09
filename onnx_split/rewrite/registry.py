"""The rewrite forms and the ``--layout`` choices, in one registry.

A *form* is one way of writing a plan as nodes (``parallel``, ``parallel-rows``, ``batched``): it
declares its name, the plan kinds it accepts, why it refuses a given chain (a reason, or None),
what it costs per activation row, and how it emits. A *layout* is what ``--layout`` names: which
form it writes for a chain without measuring, which form's cost a budget counts, and whether the
nodes are wrapped (``function``). ``--layout auto`` measures every form that accepts the plan.

Adding a form: one module that registers a :class:`Form` (and, if users may name it, a
:class:`Layout`) with :func:`register`, plus its import line in ``rewrite/__init__.py`` (the
import order is the tuner's order). The CLI's choices, the config's check, the tuner's candidates
and the budgets' cost rule all read these tables; this module imports no form, so every stage
can read it.
"""
from __future__ import annotations

from typing import Callable

from .form import Form, Layout

FORMS: dict[str, Form] = {}
"""Concrete forms, in the order the tuner measures them."""

LAYOUTS: dict[str, Layout] = {}
"""``--layout`` choices besides ``auto``."""

AUTO = "auto"
FALLBACK = "parallel"
"""The layout whose rule writes a unit where nothing could be measured, and whose cost budgets
count under ``--layout auto`` (the form is chosen later by timing)."""


def register(*entries: Form | Layout) -> None:
    """Add forms and layouts (a name registered twice is a bug)."""
    for entry in entries:
        table = FORMS if isinstance(entry, Form) else LAYOUTS
        if entry.name in table or entry.name == AUTO:
            raise ValueError(f"rewrite form or layout {entry.name!r} is registered twice")
        table[entry.name] = entry


def layout_names() -> tuple[str, ...]:
    """``auto``, then every registered layout: the ``--layout`` choices."""
    return (AUTO, *LAYOUTS)


def cost_form(layout: str) -> Form:
    """The form whose cost a budget counts under ``--layout layout``."""
    return FORMS[LAYOUTS[layout if layout in LAYOUTS else FALLBACK].cost_form]


def cost_rule(layout: str) -> Callable:
    form = cost_form(layout)
    return lambda plan: form.cost(plan, None)


def refusal(form: str, chain, plan) -> str | None:
    """Why ``form`` cannot write ``plan`` for ``chain`` (None if it can)."""
    f = FORMS[form]
    if plan.kind not in f.accepts:
        return f"the {form} form does not take {plan.kind} plans"
    return f.refuse(chain, plan)


__all__ = ["AUTO", "FALLBACK", "FORMS", "Form", "LAYOUTS", "Layout", "cost_form", "cost_rule", "layout_names",
           "refusal", "register"]
