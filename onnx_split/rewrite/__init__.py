"""Graph surgery: one layout per module, all fed by a chain of sites and its plan."""
from .apply import FORMS, emit_chain, layout_macs, rewrite_model, static_form
from .emit import Unsupported

__all__ = ["FORMS", "Unsupported", "emit_chain", "layout_macs", "rewrite_model", "static_form"]
