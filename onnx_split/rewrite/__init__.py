"""Graph surgery: one form per module (parallel.py, batched.py; function.py wraps any of them),
listed in registry.py, all fed by a chain of sites and its plan."""
from .apply import Job, emit_chain, rewrite_model
from .emit import Unsupported
from .registry import AUTO, FORMS, LAYOUT_NAMES, LAYOUTS, cost_form, cost_rule, layout_macs, refusal

__all__ = ["AUTO", "FORMS", "Job", "LAYOUTS", "LAYOUT_NAMES", "Unsupported", "cost_form", "cost_rule", "emit_chain",
           "layout_macs", "refusal", "rewrite_model"]
