"""Tiny seeded models built in code for the tests."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ONNX_DTYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.float64): TensorProto.DOUBLE}


def planted(rng: np.random.Generator, k: int, n: int, parts: int, permute: bool = True, dtype=np.float32):
    """W[k, n] with ``parts`` dense blocks under hidden row/column permutations, and the true blocks
    as (rows, cols) index sets of the permuted matrix."""
    w = np.zeros((k, n), dtype=np.float64)
    rows = np.array_split(np.arange(k), parts)
    cols = np.array_split(np.arange(n), parts)
    for r, c in zip(rows, cols):
        w[np.ix_(r, c)] = rng.standard_normal((r.size, c.size)) / np.sqrt(max(r.size, 1))
    pr = rng.permutation(k) if permute else np.arange(k)
    pc = rng.permutation(n) if permute else np.arange(n)
    w = w[pr][:, pc]
    inv_r, inv_c = np.argsort(pr), np.argsort(pc)
    blocks = [(np.sort(inv_r[r]), np.sort(inv_c[c])) for r, c in zip(rows, cols)]
    return w.astype(dtype), blocks


def matmul_model(w: np.ndarray, x_shape, *, opset: int = 17, ir_version: int = 8, name: str = "fc1",
                 weight_as_constant_node: bool = False) -> onnx.ModelProto:
    dt = ONNX_DTYPE.get(w.dtype, None) or helper.np_dtype_to_tensor_dtype(w.dtype)
    x = helper.make_tensor_value_info("x", dt, list(x_shape))
    y = helper.make_tensor_value_info("y", dt, list(x_shape[:-1]) + [w.shape[1]])
    nodes, inits = [], []
    if weight_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], name="W_const", value=numpy_helper.from_array(w, "W")))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name=name))
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def gemm_model(w_kn: np.ndarray, m: int, *, trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=None,
               opset: int = 17, c_is_input: bool = False, rng=None) -> onnx.ModelProto:
    """Gemm over a [K, N] weight (stored transposed when trans_b)."""
    rng = rng or np.random.default_rng(1)
    k, n = w_kn.shape
    dt = ONNX_DTYPE[w_kn.dtype]
    a_shape = [k, m] if trans_a else [m, k]
    inputs = [helper.make_tensor_value_info("a", dt, a_shape)]
    b = np.ascontiguousarray(w_kn.T) if trans_b else w_kn
    inits = [numpy_helper.from_array(b, "B")]
    node_inputs = ["a", "B"]
    if c_shape is not None:
        if c_is_input:
            inputs.append(helper.make_tensor_value_info("c", dt, list(c_shape)))
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(w_kn.dtype), "c"))
        node_inputs.append("c")
    attrs = dict(transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    node = helper.make_node("Gemm", node_inputs, ["y"], name="gemm", **attrs)
    y = helper.make_tensor_value_info("y", dt, [m, n])
    graph = helper.make_graph([node], "g", inputs, [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def ort_run(model: onnx.ModelProto, feeds: dict, optimization: str = "disabled"):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimization == "disabled"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def if_model(w: np.ndarray, m: int, else_scale: float) -> onnx.ModelProto:
    """If(cond): then-branch x @ W with W from the outer graph, else-branch x @ V with V = else_scale * W
    an initializer of the branch itself."""
    k, n = w.shape
    f = TensorProto.FLOAT
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_fc")], "then", [],
                               [helper.make_tensor_value_info("t", f, [m, n])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "V"], ["e"], name="else_fc")], "else", [],
                               [helper.make_tensor_value_info("e", f, [m, n])],
                               [numpy_helper.from_array((else_scale * w).astype(np.float32), "V")])
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                        helper.make_tensor_value_info("x", f, [m, k])],
                          [helper.make_tensor_value_info("y", f, [m, n])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
