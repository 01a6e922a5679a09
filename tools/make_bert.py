"""A BERT-style encoder built with onnx.helper (no torch): the lossy path's scale benchmark.

Each of the ``layers`` layers is exporter-shaped: Q, K and V projections (MatMul + Add), the
attention MatMuls between activations (Q·K^T and softmax·V, not candidates), the output
projection, a residual Add and LayerNormalization, then the FFN (MatMul + Add, Gelu written as
0.5·x·(1 + erf(x/√2)), MatMul + Add), a residual and LayerNormalization. The input is the
embedded sequence ``x`` float32 [batch, seq, hidden] (batch and seq dynamic). Weights are seeded
random (scaled 1/√fan-in), so nothing in them is near zero on purpose: what the budget search finds
is what a dense model offers.

BERT-base: ``--layers 12 --hidden 768 --heads 12 --ffn 3072`` (72 MatMul sites with constant
weights, 85 M parameters, 340 MB). Usage:

    .venv/bin/python tools/make_bert.py build/bert_base.onnx [--layers 12 --hidden 768 ...]
        [--calibration build/bert_cal.npz --samples 32 --seq 32]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def bert_model(layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072, seed: int = 0,
               opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def linear(prefix, x, k, n):
        w = const(f"{prefix}.weight", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
        b = const(f"{prefix}.bias", (0.02 * rng.standard_normal(n)).astype(np.float32))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{prefix}/MatMul_out"], name=f"{prefix}/MatMul"))
        nodes.append(helper.make_node("Add", [f"{prefix}/MatMul_out", b], [f"{prefix}/Add_out"], name=f"{prefix}/Add"))
        return f"{prefix}/Add_out"

    def layer_norm(prefix, x):
        g = const(f"{prefix}.weight", np.ones(hidden, np.float32))
        b = const(f"{prefix}.bias", np.zeros(hidden, np.float32))
        nodes.append(helper.make_node("LayerNormalization", [x, g, b], [f"{prefix}_out"], name=prefix, axis=-1,
                                      epsilon=1e-12))
        return f"{prefix}_out"

    head = hidden // heads
    split_shape = const("shape.heads", np.array([0, 0, heads, head], np.int64))
    merge_shape = const("shape.merged", np.array([0, 0, hidden], np.int64))
    scale = const("attention.scale", np.array(1 / np.sqrt(head), np.float32))
    half, one, root2 = (const("gelu.half", np.array(0.5, np.float32)), const("gelu.one", np.array(1.0, np.float32)),
                        const("gelu.sqrt2", np.array(np.sqrt(2.0), np.float32)))
    h = "x"
    for i in range(layers):
        p = f"encoder.layer.{i}"
        qkv = []
        for part in ("query", "key", "value"):
            y = linear(f"{p}.attention.self.{part}", h, hidden, hidden)
            nodes.append(helper.make_node("Reshape", [y, split_shape], [f"{y}/heads"], name=f"{p}/{part}/Reshape"))
            perm = [0, 2, 3, 1] if part == "key" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [f"{y}/heads"], [f"{y}/t"], name=f"{p}/{part}/Transpose",
                                          perm=perm))
            qkv.append(f"{y}/t")
        q, k, v = qkv
        nodes.append(helper.make_node("MatMul", [q, k], [f"{p}/scores"], name=f"{p}/attention/MatMul_qk"))
        nodes.append(helper.make_node("Mul", [f"{p}/scores", scale], [f"{p}/scaled"], name=f"{p}/attention/Mul"))
        nodes.append(helper.make_node("Softmax", [f"{p}/scaled"], [f"{p}/probs"], name=f"{p}/attention/Softmax",
                                      axis=-1))
        nodes.append(helper.make_node("MatMul", [f"{p}/probs", v], [f"{p}/context"], name=f"{p}/attention/MatMul_pv"))
        nodes.append(helper.make_node("Transpose", [f"{p}/context"], [f"{p}/context_t"], name=f"{p}/context/Transpose",
                                      perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"{p}/context_t", merge_shape], [f"{p}/merged"],
                                      name=f"{p}/context/Reshape"))
        o = linear(f"{p}.attention.output.dense", f"{p}/merged", hidden, hidden)
        nodes.append(helper.make_node("Add", [o, h], [f"{p}/residual1"], name=f"{p}/attention/residual"))
        h1 = layer_norm(f"{p}.attention.output.LayerNorm", f"{p}/residual1")
        f = linear(f"{p}.intermediate.dense", h1, hidden, ffn)
        nodes.append(helper.make_node("Div", [f, root2], [f"{f}/div"], name=f"{p}/gelu/Div"))
        nodes.append(helper.make_node("Erf", [f"{f}/div"], [f"{f}/erf"], name=f"{p}/gelu/Erf"))
        nodes.append(helper.make_node("Add", [f"{f}/erf", one], [f"{f}/erf1"], name=f"{p}/gelu/Add"))
        nodes.append(helper.make_node("Mul", [f, f"{f}/erf1"], [f"{f}/mul"], name=f"{p}/gelu/Mul"))
        nodes.append(helper.make_node("Mul", [f"{f}/mul", half], [f"{f}/gelu"], name=f"{p}/gelu/Mul_half"))
        d = linear(f"{p}.output.dense", f"{f}/gelu", ffn, hidden)
        nodes.append(helper.make_node("Add", [d, h1], [f"{p}/residual2"], name=f"{p}/output/residual"))
        h = layer_norm(f"{p}.output.LayerNorm", f"{p}/residual2")
    nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="output"))
    graph = helper.make_graph(
        nodes, "bert_encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", default=None, help="also write seeded calibration samples here (.npz)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    model = bert_model(args.layers, args.hidden, args.heads, args.ffn, args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, args.output)
    if args.calibration:
        rng = np.random.default_rng(args.seed + 1)
        np.savez(args.calibration, x=rng.standard_normal((args.samples, args.seq, args.hidden)).astype(np.float32))


if __name__ == "__main__":
    main()
