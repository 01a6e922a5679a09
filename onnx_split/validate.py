"""Input-model validation beyond onnx's checker: shapes and types that cannot hold.

onnx's checker (without ``full_check``) checks the graph's structure, not that its shapes agree: a
Gemm with a 3-D weight, or a value_info dim of 1e15 where the producer gives 2, pass it and would
only surface later as a "verification failed" or a huge allocation. Strict shape inference (type
checks on) finds them; the model is refused as bad input with the inference's reason.

Inference runs on a copy in which every main-graph initializer of more than
:data:`STUB_BYTES` bytes keeps its name, type and dims but not its data (inference reads the values
of small tensors only: Reshape shapes, Slice starts, ...), so a model of any size is checked in
little memory and never serialized whole.
"""
from __future__ import annotations

import onnx

from .errors import ModelLoadError, first_line
from .protos import without_weights

STUB_BYTES = 1 << 16


_KNOWN_TYPES = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}


def check_shapes(model: onnx.ModelProto, source: str = "the model") -> None:
    """Raise :class:`ModelLoadError` (one line) if a tensor has an unknown data type or strict shape
    inference rejects ``model``."""
    from onnx.external_data_helper import _get_all_tensors

    try:
        _decode_strings(model)
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{source} is not a valid ONNX model: a name or string in it is not valid UTF-8 "
                             f"({first_line(exc, 100)})") from None
    if not model.graph.output:
        raise ModelLoadError(f"{source} is not a usable ONNX model: its graph has no outputs, so it computes "
                             f"nothing (ONNX Runtime refuses it)")
    for tensor in _get_all_tensors(model):  # initializers and Constant values, subgraphs included
        if tensor.data_type not in _KNOWN_TYPES:
            raise ModelLoadError(f"{source} is not a valid ONNX model: tensor {tensor.name!r} has data type "
                                 f"{tensor.data_type}, which ONNX does not define")

    light = without_weights(model)
    for t in model.graph.initializer:
        if t.ByteSize() <= STUB_BYTES:
            light.graph.initializer.append(t)
        else:
            light.graph.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ModelLoadError(f"{source} is not a valid ONNX model: its shapes or types do not agree: "
                             f"{_reason(exc)}") from None
    except (ValueError, RuntimeError) as exc:  # e.g. a copy still past protobuf's limit: not checked here
        import logging

        logging.getLogger(__name__).info("shape check skipped: %s", first_line(exc))


def _decode_strings(message) -> None:
    """Raise UnicodeDecodeError if a string field of ``message`` or of its sub-messages is not UTF-8
    (protobuf reads it back as bytes, and copying or printing it fails wherever that happens first).
    Bytes fields (weights) are not read."""
    for f in message.DESCRIPTOR.fields:
        repeated = f.is_repeated
        if f.type == f.TYPE_STRING:
            value = getattr(message, f.name)
            for text in (value if repeated else [value]):
                if isinstance(text, bytes):  # protobuf hands back invalid UTF-8 as bytes, and fails on copy
                    text.decode("utf-8")
        elif f.type == f.TYPE_MESSAGE:
            if repeated:
                for sub in getattr(message, f.name):
                    _decode_strings(sub)
            elif message.HasField(f.name):
                _decode_strings(getattr(message, f.name))


def _reason(exc: BaseException) -> str:
    """The first error of onnx's message (one per line), without its "[ShapeInferenceError]" tags."""
    line = first_line(exc, 1000).replace("Inference error(s): ", "")
    for tag in ("[ShapeInferenceError] ", "[TypeInferenceError] "):
        line = line.replace(tag, "")
    return line[:300]
