"""Freed memory handed back to the system between stages.

glibc's allocator keeps the pages of freed heap blocks for reuse. After a stage lets go of large
arrays, a model proto or an ONNX Runtime session, the resident set therefore stays where it was;
the next stage's allocations, sized differently (ORT's own buffers, another model's weights), are
not always served from those pages and add to it. :func:`give_back` collects unreachable Python
objects and asks the allocator to return its free pages (``malloc_trim``). Elsewhere (macOS,
Windows, musl) it only collects.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim
        return None


_TRIM = _malloc_trim()


def give_back(collect: bool = True) -> bool:
    """Return the allocator's free pages to the system (after collecting garbage, with ``collect``:
    skip it where what was let go is known freed, a session deleted); whether it could."""
    if collect:
        gc.collect()
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
