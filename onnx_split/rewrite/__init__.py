"""Graph surgery: one form per module, each registering itself in registry.py; function.py wraps
any form. A new form is one module plus its import line here (the order is the tuner's)."""
from . import parallel, batched, function, dynamic_kernel, dynamic_portable, dynamic_fallback, compressed, block_factor  # noqa: F401  (isort: skip) registration order
from .apply import Job, emit_chain, rewrite_model
from .emit import Unsupported
from .registry import AUTO, FALLBACK, FORMS, LAYOUTS, cost_form, cost_rule, layout_names, refusal

__all__ = ["AUTO", "FALLBACK", "FORMS", "Job", "LAYOUTS", "Unsupported", "cost_form", "cost_rule", "emit_chain",
           "layout_names", "refusal", "rewrite_model"]
