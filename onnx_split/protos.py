"""Cheap copies of model protos (the structure without the weights' data), and a model serialized a
weight at a time."""
from __future__ import annotations

from typing import Iterator

import onnx
from google.protobuf.unknown_fields import UnknownFieldSet


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its main graph's initializers (cheap: no weight data)."""
    header = onnx.ModelProto()
    _copy_fields(model, header, lambda desc: desc.name != "graph")
    _copy_fields(model.graph, header.graph, lambda desc: desc.name != "initializer")
    return header


def _copy_fields(src, dst, wanted) -> None:
    """Copy every set field of message ``src`` whose descriptor is ``wanted`` into ``dst``."""
    for desc, value in src.ListFields():
        if not wanted(desc):
            continue
        if desc.is_repeated:
            getattr(dst, desc.name).extend(value)
        elif desc.type == desc.TYPE_MESSAGE:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def serialized_pieces(model: onnx.ModelProto) -> Iterator[bytes]:
    """``model.SerializeToString()`` in pieces, one main-graph initializer at a time: joined, the
    same bytes (the fields in number order, as protobuf writes them), with at most one weight's
    bytes held at once instead of a second copy of them all. A model or graph with fields this
    onnx does not know (kept as unknown fields) comes whole, as protobuf writes it. A model over
    :data:`MESSAGE_LIMIT` raises ValueError before the first piece, as protobuf refuses it whole."""
    graph = model.graph
    if len(UnknownFieldSet(model)) or len(UnknownFieldSet(graph)):
        yield model.SerializeToString()
        return
    first, last = _around(model, "graph")
    head, tail = _around(graph, "initializer")
    sizes = [t.ByteSize() for t in graph.initializer]
    length = len(head) + len(tail) + sum(len(_key(_INITIALIZER, n)) + n for n in sizes)
    if len(first) + len(_key(_GRAPH, length)) + length + len(last) > MESSAGE_LIMIT:
        raise ValueError("over protobuf's 2 GB limit for one message: write it with external data")
    yield first
    if model.HasField("graph"):
        yield _key(_GRAPH, length) + head
        for tensor, n in zip(graph.initializer, sizes):
            yield _key(_INITIALIZER, n)                    # (apart: a weight's bytes are not copied again)
            yield tensor.SerializeToString()
        yield tail
    yield last


MESSAGE_LIMIT = 2**31 - 1
"""The most bytes protobuf parses as one message."""
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _around(message, name: str) -> tuple[bytes, bytes]:
    """The serialized set fields of ``message`` numbered below field ``name``'s, and above it."""
    number = message.DESCRIPTOR.fields_by_name[name].number
    below, above = type(message)(), type(message)()
    _copy_fields(message, below, lambda desc: desc.number < number)
    _copy_fields(message, above, lambda desc: desc.number > number)
    return below.SerializeToString(), above.SerializeToString()


def _key(number: int, length: int) -> bytes:
    """A length-delimited field's tag and length, as protobuf's wire format writes them."""
    out = bytearray()
    for value in ((number << 3) | 2, length):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)
