"""A large input's weights kept on disk for the length of a run, not in memory.

``split_model`` reads the input from its first step (the sites' weights) to its last (the
verification against it, the timing against it, and writing it back where the rewrite does not
pay), and builds the rewritten model beside it. Held in memory, the input alone is one copy of its
weights for the whole run, on top of the sites' weight arrays, the rewrite and the ONNX Runtime
sessions. For a model above :data:`SPILL_BYTES`, :func:`spilled` writes the input's main-graph
weights once, a tensor at a time, to a private temporary directory and gives the run a copy that
refers to them (external data).

While a spill is active every model handed to ONNX Runtime is written into that directory
(``model_io.model_source``), so the references resolve there; :func:`array` reads one tensor's
value from it, :func:`load_weights` puts the data back into a model (the rewrite's working copy,
and the input itself where it is written unchanged).
"""
from __future__ import annotations

import contextvars
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

SPILL_BYTES = 64 * 2**20
"""Inputs serializing to more than this have their weights kept on disk during a run."""
DATA = "weights.data"

_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("onnx_split_spill", default=None)


def directory() -> Path | None:
    """The active spill's directory, or None."""
    return _DIR.get()


@contextmanager
def spilled(model: onnx.ModelProto, limit: int | None = None) -> Iterator[onnx.ModelProto]:
    """``model`` itself when it serializes to at most ``limit`` bytes (:data:`SPILL_BYTES`), else a
    copy of it whose main-graph weights of 1 KB or more are external data in a temporary directory
    (removed on exit). ``model`` is not changed, and not referred to from here once the copy is
    made: where the caller lets go of it too, its memory is free for the run."""
    from .model_io import _write_external, serialized_bytes

    if serialized_bytes(model) <= (SPILL_BYTES if limit is None else limit):
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="onnx_split-run-") as tmp:
        fd = os.open(Path(tmp) / DATA, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            header = _write_external(model, fd, DATA)
        finally:
            os.close(fd)
        del model
        token = _DIR.set(Path(tmp))
        try:
            yield header
        finally:
            _DIR.reset(token)


def to_disk(model: onnx.ModelProto) -> onnx.ModelProto:
    """With a spill active, a copy of ``model`` whose main-graph weights held in memory (1 KB or
    more) are written to a new file in the spill's directory, so that ``model`` can be let go; else,
    or where it holds no such weight, ``model`` itself."""
    from .model_io import EXTERNAL_MIN_BYTES, _write_external

    folder = directory()
    if folder is None or not any(t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES
                                 for t in model.graph.initializer):
        return model
    fd, name = tempfile.mkstemp(dir=folder, prefix="held-", suffix=".data")
    try:
        return _write_external(model, fd, Path(name).name)
    finally:
        os.close(fd)


def refers_outside(model: onnx.ModelProto) -> bool:
    """Whether a main-graph tensor of ``model`` is external data (a spilled model's weights)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's value, read from the active spill where it is external data there."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        folder = directory()
        if folder is None:
            raise ValueError(f"tensor '{tensor.name}' is external data and no spill is active")
        return numpy_helper.to_array(tensor, str(folder))
    return numpy_helper.to_array(tensor)


def load_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Read the main-graph tensors that are external data in the active spill into ``model``
    itself (a tensor at a time); ``model`` is returned."""
    if refers_outside(model):
        folder = directory()
        if folder is None:
            raise ValueError("the model refers to external data and no spill is active")
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
                tensor.ClearField("data_location")  # as the input stored it
                del tensor.external_data[:]
    return model


def loaded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` where it holds its weights, else a copy of it with them read in."""
    if not refers_outside(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return load_weights(copy)
