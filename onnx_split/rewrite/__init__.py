"""Graph surgery: one layout per module, all fed by a site and its plan."""
from .apply import LAYOUT_EMITTERS, layout_macs, rewrite_model
from .emit import Unsupported

__all__ = ["LAYOUT_EMITTERS", "Unsupported", "layout_macs", "rewrite_model"]
