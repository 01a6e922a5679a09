"""What a model holds, for the before/after summary: op counts by type, parameters and bytes.

Counted over the main graph, every subgraph (If/Loop/Scan bodies) and every model-local function
body, so a rewrite that moves nodes into a function (``--layout function``) is counted the same
way as one that does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .protos import without_weights
from .sites import walk_graphs


@dataclass
class ModelStats:
    ops: dict[str, int] = field(default_factory=dict)
    """node count per op type (``domain:op`` outside the default domain), every graph and function body"""
    nodes: int = 0
    parameters: int = 0
    """elements of every initializer and Constant node value"""
    weight_bytes: int = 0
    """bytes of those tensors' data"""
    bytes: int = 0
    """the serialized model, external data included (what the written files hold, give or take the
    external data's alignment)"""


def model_stats(model: onnx.ModelProto) -> ModelStats:
    stats = ModelStats()
    graphs = [g for _, g in walk_graphs(model.graph)]
    bodies = [list(f.node) for f in model.functions]
    tensors: list[onnx.TensorProto] = []
    for graph in graphs:
        tensors += list(graph.initializer)
        bodies.append(list(graph.node))
    for nodes in bodies:
        for node in nodes:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
            stats.ops[key] = stats.ops.get(key, 0) + 1
            stats.nodes += 1
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        stats.parameters += int(np.prod(tensor.dims, dtype=np.int64))
        stats.weight_bytes += tensor_bytes(tensor)
    stats.bytes = serialized_bytes(model)
    return stats


def serialized_bytes(model: onnx.ModelProto) -> int:
    """The size of ``model`` serialized, its external data included, summed field by field so that a
    model above protobuf's 2 GB limit is measured too (it is written with external data)."""
    header = without_weights(model)
    graph = header.graph.ByteSize()
    for tensor in model.graph.initializer:  # repeated field 5 of GraphProto: a tag byte, a length, the tensor
        size = tensor.ByteSize()
        graph += 1 + _varint(size) + size
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            graph += tensor_bytes(tensor)
    header.ClearField("graph")
    return header.ByteSize() + 1 + _varint(graph) + graph  # ModelProto.graph is field 7: one tag byte


def _varint(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of a tensor's data, wherever it is stored (raw, typed fields or external)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    elements = int(np.prod(tensor.dims, dtype=np.int64))
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return elements * itemsize
