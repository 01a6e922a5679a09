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


def feature_wise(op: str, rng: np.random.Generator):
    """A builder of the nodes for one feature-wise step named ``op``: (h, n, tag) -> (nodes, inits, out)."""
    def build(h: str, n: int, tag: str):
        out = f"{tag}_{op}"
        vec = lambda name: numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{tag}_{name}")
        scalar = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), f"{tag}_{name}")
        if op == "GeluErf":  # x * 0.5 * (1 + erf(x / sqrt 2)), as exporters write Gelu
            inits = [scalar("sqrt2", np.sqrt(2.0)), scalar("one", 1.0), scalar("half", 0.5)]
            nodes = [helper.make_node("Div", [h, f"{tag}_sqrt2"], [f"{tag}_d"], name=f"{tag}_div"),
                     helper.make_node("Erf", [f"{tag}_d"], [f"{tag}_e"], name=f"{tag}_erf"),
                     helper.make_node("Add", [f"{tag}_e", f"{tag}_one"], [f"{tag}_a"], name=f"{tag}_add"),
                     helper.make_node("Mul", [h, f"{tag}_a"], [f"{tag}_m"], name=f"{tag}_mul"),
                     helper.make_node("Mul", [f"{tag}_m", f"{tag}_half"], [out], name=f"{tag}_mul2")]
            return nodes, inits, out
        if op in ("Add", "Mul"):  # per-feature constant
            return [helper.make_node(op, [h, f"{tag}_c"], [out], name=f"{tag}_{op}")], [vec("c")], out
        if op in ("Sub", "Div"):  # scalar constant
            return [helper.make_node(op, [h, f"{tag}_c"], [out], name=f"{tag}_{op}")], [scalar("c", 1.5)], out
        if op == "Cast":  # to fp16 and back
            return ([helper.make_node("Cast", [h], [f"{tag}_h16"], name=f"{tag}_cast16", to=TensorProto.FLOAT16),
                     helper.make_node("Cast", [f"{tag}_h16"], [out], name=f"{tag}_cast32", to=TensorProto.FLOAT)],
                    [], out)
        if op == "Dropout":
            return [helper.make_node("Dropout", [h, f"{tag}_ratio"], [out], name=f"{tag}_drop")], [scalar("ratio", 0.5)], out
        attrs = {"LeakyRelu": {"alpha": 0.1}}.get(op, {})
        return [helper.make_node(op, [h], [out], name=f"{tag}_{op}", **attrs)], [], out
    return build


def chain_model(weights: list[np.ndarray], between: list, x_shape, *, opset: int = 17, ir_version: int = 8,
                biases: bool = True, output_between: int | None = None) -> onnx.ModelProto:
    """x -> MatMul(W0) [+ b0] -> between[0] -> MatMul(W1) [+ b1] -> ... -> y.

    ``between[i]`` is a list of feature-wise builders; ``output_between`` also makes the tensor after
    layer i's feature-wise steps a graph output."""
    rng = np.random.default_rng(99)
    nodes, inits = [], []
    h = "x"
    extra_outputs = []
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"mm{i}"], name=f"fc{i}"))
        h = f"mm{i}"
        if biases:
            inits.append(numpy_helper.from_array(rng.standard_normal(w.shape[1]).astype(w.dtype), f"b{i}"))
            nodes.append(helper.make_node("Add", [h, f"b{i}"], [f"z{i}"], name=f"bias{i}"))
            h = f"z{i}"
        if i < len(weights) - 1:
            for j, build in enumerate(between[i]):
                more_nodes, more_inits, h = build(h, w.shape[1], f"l{i}s{j}")
                nodes += more_nodes
                inits += more_inits
            if output_between == i:
                extra_outputs.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, None))
    nodes[-1].output[0] = "y"
    dt = ONNX_DTYPE[weights[0].dtype]
    x = helper.make_tensor_value_info("x", dt, list(x_shape))
    y = helper.make_tensor_value_info("y", dt, list(x_shape[:-1]) + [weights[-1].shape[1]])
    graph = helper.make_graph(nodes, "mlp", [x], [y] + extra_outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def chained_blocks(rng: np.random.Generator, sizes: list[int], parts: int) -> list[np.ndarray]:
    """Weights of consecutive layers whose ``parts`` blocks line up under hidden permutations: layer
    l's column permutation is layer l+1's row permutation, so the layers form ``parts`` sub-networks."""
    perms = [rng.permutation(s) for s in sizes]
    weights = []
    for i in range(len(sizes) - 1):
        w = np.zeros((sizes[i], sizes[i + 1]))
        for r, c in zip(np.array_split(np.arange(sizes[i]), parts), np.array_split(np.arange(sizes[i + 1]), parts)):
            w[np.ix_(r, c)] = rng.standard_normal((r.size, c.size)) / np.sqrt(r.size)
        weights.append(w[perms[i]][:, perms[i + 1]].astype(np.float32))
    return weights


def two_input_model(w1: np.ndarray, w2: np.ndarray, batch="batch") -> onnx.ModelProto:
    """y = x1 @ W1 + x2 @ W2, two graph inputs with the same (dynamic) first dim."""
    f = TensorProto.FLOAT
    n = w1.shape[1]
    nodes = [helper.make_node("MatMul", ["x1", "W1"], ["h1"], name="fc1"),
             helper.make_node("MatMul", ["x2", "W2"], ["h2"], name="fc2"),
             helper.make_node("Add", ["h1", "h2"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x1", f, [batch, w1.shape[0]]),
                                             helper.make_tensor_value_info("x2", f, [batch, w2.shape[0]])],
                              [helper.make_tensor_value_info("y", f, [batch, n])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def encoder_model(rng: np.random.Generator, *, layers: int = 2, hidden: int = 256, heads: int = 4, seq: int = 8,
                  ffn: int = 512, ffn_blocks: int = 4, scopes: bool = True) -> onnx.ModelProto:
    """A BERT-style encoder as torch.onnx's dynamo exporter writes one: per layer, Q/K/V/output
    projections (MatMul + bias, dense weights), attention's two MatMuls between activations, and
    a feed-forward pair whose weights are ``ffn_blocks`` exact blocks (so they split). Nodes are
    named ``node_MatMul_<n>`` and, with ``scopes``, carry ``pkg.torch.onnx.name_scopes`` metadata:
    the repr of the cumulative module paths, then the node's FX name."""
    f = TensorProto.FLOAT
    d = hidden // heads
    nodes, inits = [], []
    count = {}

    def node(op, inputs, outputs, module, fx, **attrs):
        count[op] = count.get(op, -1) + 1
        n = helper.make_node(op, inputs, outputs, name=f"node_{op}_{len(nodes)}", **attrs)
        if scopes:
            parts = module.split(".")
            paths = [""] + [".".join(parts[:i + 1]) for i in range(len(parts))]
            n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(paths + [f"{fx}_{count[op]}"]))
        nodes.append(n)
        return outputs[0]

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def linear(h, module, w):
        y = node("MatMul", [h, const(f"{module}.weight", w)], [f"{module}.mm"], module, "linear")
        b = const(f"{module}.bias", (0.1 * rng.standard_normal(w.shape[1])).astype(np.float32))
        return node("Add", [y, b], [f"{module}.out"], module, "add")

    heads_shape = const("heads_shape", np.array([0, 0, heads, d], np.int64))
    flat_shape = const("flat_shape", np.array([0, 0, hidden], np.int64))
    scale = const("scale", np.asarray(np.sqrt(d), np.float32))
    h = "x"
    for i in range(layers):
        att = f"encoder.layer.{i}.attention"
        dense = lambda: (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        q, k, v = (linear(h, f"{att}.self.{name}", dense()) for name in ("query", "key", "value"))
        q, k, v = (node("Reshape", [t, heads_shape], [f"{t}.heads"], f"{att}.self", "view") for t in (q, k, v))
        q = node("Transpose", [q], [f"{q}.t"], f"{att}.self", "permute", perm=[0, 2, 1, 3])
        v = node("Transpose", [v], [f"{v}.t"], f"{att}.self", "permute", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], [f"{k}.t"], f"{att}.self", "permute", perm=[0, 2, 3, 1])
        s = node("MatMul", [q, k], [f"{att}.scores"], f"{att}.self", "matmul")
        s = node("Div", [s, scale], [f"{att}.scaled"], f"{att}.self", "div")
        p = node("Softmax", [s], [f"{att}.probs"], f"{att}.self", "softmax", axis=-1)
        c = node("MatMul", [p, v], [f"{att}.context"], f"{att}.self", "matmul")
        c = node("Transpose", [c], [f"{c}.t"], f"{att}.self", "permute", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, flat_shape], [f"{c}.flat"], f"{att}.self", "view")
        o = linear(c, f"{att}.output.dense", dense())
        o = node("Add", [o, h], [f"{att}.residual"], f"{att}.output", "add")
        gamma, beta = const(f"{att}.ln.weight", np.ones(hidden, np.float32)), const(f"{att}.ln.bias", np.zeros(hidden, np.float32))
        h = node("LayerNormalization", [o, gamma, beta], [f"{att}.ln"], f"{att}.output.LayerNorm", "layer_norm", axis=-1)
        w1, _ = planted(rng, hidden, ffn, ffn_blocks)
        w2, _ = planted(rng, ffn, hidden, ffn_blocks)
        m = linear(h, f"encoder.layer.{i}.intermediate.dense", w1)
        m = node("Relu", [m], [f"{m}.relu"], f"encoder.layer.{i}.intermediate", "relu")
        m = linear(m, f"encoder.layer.{i}.output.dense", w2)
        m = node("Add", [m, h], [f"encoder.layer.{i}.residual"], f"encoder.layer.{i}.output", "add")
        gamma = const(f"encoder.layer.{i}.ln.weight", np.ones(hidden, np.float32))
        beta = const(f"encoder.layer.{i}.ln.bias", np.zeros(hidden, np.float32))
        h = node("LayerNormalization", [m, gamma, beta], [f"encoder.layer.{i}.out"],
                 f"encoder.layer.{i}.output.LayerNorm", "layer_norm", axis=-1)
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info("x", f, ["batch", seq, hidden])],
                              [helper.make_tensor_value_info("y", f, ["batch", seq, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
def gpt2_ffn_model(w1: np.ndarray, w2: np.ndarray, *, rng=None, fold_flat_shapes: bool = False,
                   expose_shape: bool = False, opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """HF GPT-2's MLP as torch exports it: Conv1D is Gemm on x.view(-1, x.size(-1)), then
    .view(x.size()[:-1] + (nf,)); the activation is gelu_new (0.5 x (1 + tanh(sqrt(2/pi) (x +
    0.044715 x^3)))). x [B, S, H] -> Reshape [-1, H] -> c_fc Gemm -> Reshape [B, S, 4H] (from
    Shape(x)) -> gelu -> Reshape [-1, 4H] (x.size(-1) read from Shape(gelu)) -> c_proj Gemm ->
    Reshape [B, S, H] (from Shape(gelu)). ``fold_flat_shapes`` writes the two [-1, size] shapes as
    constants, as constant folding of a static size does; ``expose_shape`` also makes Shape(gelu) a
    graph output ``gelu_shape``."""
    rng = rng or np.random.default_rng(7)
    h, inner = w1.shape
    f = TensorProto.FLOAT
    nodes, inits = [], []
    const = lambda name, value: inits.append(numpy_helper.from_array(np.asarray(value), name)) or name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"/mlp/{output}", **attrs))
        return output

    def dims(tensor: str, tag: str) -> list[str]:
        shape = node("Shape", [tensor], f"{tag}_shape")
        axis0 = const("axis0", np.array([0], np.int64)) if "axis0" not in {t.name for t in inits} else "axis0"
        return [node("Unsqueeze", [node("Gather", [shape, const(f"{tag}_i{i}", np.array(i, np.int64))],
                                        f"{tag}_d{i}", axis=0), axis0], f"{tag}_u{i}") for i in range(3)]

    def flat(tensor: str, size: int, d: list[str], tag: str) -> str:
        if fold_flat_shapes:
            shape = const(f"{tag}_flat", np.array([-1, size], np.int64))
        else:
            shape = node("Concat", [const(f"{tag}_minus1", np.array([-1], np.int64)), d[2]], f"{tag}_flat", axis=0)
        return node("Reshape", [tensor, shape], f"{tag}_2d")

    dx = dims("x", "x")
    x2 = flat("x", h, dx, "x")
    y1 = node("Gemm", [x2, const("c_fc.weight", w1), const("c_fc.bias", rng.standard_normal(inner).astype(np.float32))],
              "c_fc")
    nodes[-1].name = "/mlp/c_fc/Gemm"
    size1 = node("Concat", [dx[0], dx[1], const("inner", np.array([inner], np.int64))], "c_fc_size", axis=0)
    a = node("Reshape", [y1, size1], "c_fc_3d")
    scalar = lambda name, v: const(name, np.asarray(v, np.float32))
    cube = node("Pow", [a, scalar("three", 3.0)], "pow")
    inner_sum = node("Add", [a, node("Mul", [cube, scalar("c", 0.044715)], "mul_c")], "add_cube")
    t = node("Tanh", [node("Mul", [inner_sum, scalar("k", np.sqrt(2 / np.pi))], "mul_k")], "tanh")
    g = node("Mul", [node("Mul", [a, node("Add", [t, scalar("one", 1.0)], "add_one")], "mul_x"),
                     scalar("half", 0.5)], "gelu")
    dg = dims(g, "g")
    g2 = flat(g, inner, dg, "g")
    y2 = node("Gemm", [g2, const("c_proj.weight", w2),
                       const("c_proj.bias", rng.standard_normal(h).astype(np.float32))], "c_proj")
    nodes[-1].name = "/mlp/c_proj/Gemm"
    size2 = node("Concat", [dg[0], dg[1], const("hidden", np.array([h], np.int64))], "c_proj_size", axis=0)
    nodes.append(helper.make_node("Reshape", [y2, size2], ["y"], name="/mlp/c_proj_3d"))
    outputs = [helper.make_tensor_value_info("y", f, ["B", "S", h])]
    if expose_shape:
        outputs.append(helper.make_tensor_value_info("g_shape", TensorProto.INT64, [3]))
    graph = helper.make_graph(nodes, "gpt2_mlp", [helper.make_tensor_value_info("x", f, ["B", "S", h])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def low_rank_case(folder, samples: int, seed: int = 1):
    """(model path, calibration path): three 128-wide layers of 8 planted blocks plus noise (Tanh
    between them), and ``samples`` calibration inputs of rank 16 plus a little noise. A refit or a
    factorization on few such samples reproduces them far better than other inputs of the model."""
    from pathlib import Path
    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(3):
        w, _ = planted(rng, 128, 128, 8)
        weights.append((w + 0.2 * rng.standard_normal(w.shape)).astype(np.float32))
    model = chain_model(weights, [[feature_wise("Tanh", rng)], [feature_wise("Tanh", rng)]], ["batch", 128])
    path, cal = Path(folder) / "low_rank.onnx", Path(folder) / "low_rank_cal.npz"
    onnx.save(model, path)
    x = rng.standard_normal((samples, 16)) @ rng.standard_normal((16, 128)) + 0.1 * rng.standard_normal((samples, 128))
    np.savez(cal, x=x.astype(np.float32))
    return path, cal
