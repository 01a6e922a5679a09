"""Cheap copies of model protos: the structure without the weights' data."""
from __future__ import annotations

import onnx


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its main graph's initializers (cheap: no weight data)."""
    header = onnx.ModelProto()
    _copy_fields(model, header, skip="graph")
    _copy_fields(model.graph, header.graph, skip="initializer")
    return header


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of message ``src`` into ``dst`` except ``skip``."""
    for desc, value in src.ListFields():
        if desc.name == skip:
            continue
        if desc.is_repeated:
            getattr(dst, desc.name).extend(value)
        elif desc.type == desc.TYPE_MESSAGE:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)
