"""The compiled kernel of ``onnx_split.DynamicBlockMatMul``: where it is, and sessions that use it.

``pip install`` builds ``onnx_split/kernels/_dynamic_block_matmul.so`` (setup.py; optional: a
failed build leaves a working package without it). :func:`kernel_library` gives its path, or None
with :func:`kernel_absence` saying why; :func:`register` adds it to an ``ort.SessionOptions``.
Every session onnx_split opens (verification, tuning, benchmarks, calibration) registers it.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

DOMAIN = "onnx_split"
OP = "DynamicBlockMatMul"
ENV = "ONNX_SPLIT_KERNEL"
"""An environment variable naming another build of the library (tests, benchmarks)."""

_NAME = "_dynamic_block_matmul.so"


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent / "kernels"
    found = [Path(os.environ[ENV])] if os.environ.get(ENV) else []
    return found + [here / _NAME]


@functools.lru_cache(maxsize=None)
def _find() -> tuple[str | None, str | None]:
    for path in _candidates():
        if not path.is_file():
            continue
        try:
            library = ctypes.CDLL(str(path))
            getattr(library, "RegisterCustomOps")
        except (OSError, AttributeError) as exc:
            return None, f"{path} does not load: {exc}"
        return str(path), None
    return None, ("the compiled kernel is not installed (onnx_split/kernels/_dynamic_block_matmul.so was not built: "
                  "reinstall with `pip install -e .` where a C compiler is present)")


def kernel_library() -> str | None:
    """The path of the kernel library for ``SessionOptions.register_custom_ops_library``, or None."""
    return _find()[0]


def kernel_absence() -> str | None:
    """Why :func:`kernel_library` is None (None when it is present)."""
    return _find()[1]


def kernel_path() -> str | None:
    """Which row kernel the library runs on this CPU ("avx2+fma" or "plain C"), or None."""
    path = kernel_library()
    if path is None:
        return None
    library = ctypes.CDLL(path)
    library.onnx_split_dynamic_kernel_path.restype = ctypes.c_char_p
    return library.onnx_split_dynamic_kernel_path().decode()


def register(options) -> bool:
    """Register the kernel with an ``ort.SessionOptions``; False where the library is absent."""
    path = kernel_library()
    if path is None:
        return False
    options.register_custom_ops_library(path)
    return True


def uses_kernel(model) -> bool:
    """True when ``model`` (a ModelProto) has a DynamicBlockMatMul node outside a function body."""
    from .sites import walk_graphs

    return any(n.domain == DOMAIN and n.op_type == OP for _, g in walk_graphs(model.graph) for n in g.node)


__all__ = ["DOMAIN", "OP", "kernel_absence", "kernel_library", "kernel_path", "register", "uses_kernel"]
