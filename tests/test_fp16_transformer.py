"""An fp16 transformer encoder layer, built with onnx helpers in the form torch's legacy exporter
writes it, split with every layout: the written model must open and run in ONNX Runtime at every
optimization level (in a child process, so a native crash fails the test instead of ending it) and
match the original at ORT_ENABLE_ALL, the level users run."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import ort_run, planted
from onnx import TensorProto, helper, numpy_helper

from onnx_split import SplitConfig, split_model
from onnx_split.isolate import LEVELS, Probe, probe_models

D, HEADS, FFN, BATCH, SEQ, PARTS = 32, 2, 64, 2, 4, 2


def encoder_layer_fp16(seed: int = 0) -> onnx.ModelProto:
    """x [B, S, D] -> self-attention (packed in_proj MatMul, heads by Reshape/Transpose, Softmax,
    out_proj Gemm with transB) + residual -> LayerNorm -> Linear-Relu-Linear + residual ->
    LayerNorm, all float16. Every projection holds PARTS exact blocks under hidden permutations."""
    rng = np.random.default_rng(seed)
    f16 = np.float16
    dh = D // HEADS
    w_in = planted(rng, D, 3 * D, PARTS, dtype=f16)[0]
    w_out = planted(rng, D, D, PARTS, dtype=f16)[0]
    w1 = planted(rng, D, FFN, PARTS, permute=False, dtype=f16)[0]
    w2 = planted(rng, FFN, D, PARTS, permute=False, dtype=f16)[0]
    init = {
        "in_proj.weight": w_in, "in_proj.bias": (rng.standard_normal(3 * D) * 0.1).astype(f16),
        "out_proj.weight": np.ascontiguousarray(w_out.T), "out_proj.bias": (rng.standard_normal(D) * 0.1).astype(f16),
        "linear1.weight": w1, "linear1.bias": (rng.standard_normal(FFN) * 0.1).astype(f16),
        "linear2.weight": w2, "linear2.bias": (rng.standard_normal(D) * 0.1).astype(f16),
        "norm.scale": np.ones(D, f16), "norm.bias": np.zeros(D, f16),
        "heads_shape": np.array([BATCH, SEQ, HEADS, dh], np.int64), "flat_shape": np.array([BATCH * SEQ, D], np.int64),
        "seq_shape": np.array([BATCH, SEQ, D], np.int64), "inv_sqrt_dh": np.array(1 / np.sqrt(dh), f16),
        "split_sizes": np.array([D, D, D], np.int64),
    }
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "in_proj.weight"], ["qkv0"], name="/self_attn/MatMul"),
        n("Add", ["qkv0", "in_proj.bias"], ["qkv"], name="/self_attn/Add"),
        n("Split", ["qkv", "split_sizes"], ["q0", "k0", "v0"], name="/self_attn/Split", axis=-1),
    ]
    for t in "qkv":
        nodes += [n("Reshape", [f"{t}0", "heads_shape"], [f"{t}1"], name=f"/self_attn/Reshape_{t}"),
                  n("Transpose", [f"{t}1"], [f"{t}h"], name=f"/self_attn/Transpose_{t}", perm=[0, 2, 1, 3])]
    nodes += [
        n("Transpose", ["kh"], ["kt"], name="/self_attn/Transpose_kt", perm=[0, 1, 3, 2]),
        n("MatMul", ["qh", "kt"], ["scores0"], name="/self_attn/MatMul_1"),
        n("Mul", ["scores0", "inv_sqrt_dh"], ["scores"], name="/self_attn/Mul"),
        n("Softmax", ["scores"], ["attn"], name="/self_attn/Softmax", axis=-1),
        n("MatMul", ["attn", "vh"], ["ctx0"], name="/self_attn/MatMul_2"),
        n("Transpose", ["ctx0"], ["ctx1"], name="/self_attn/Transpose_ctx", perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx1", "flat_shape"], ["ctx"], name="/self_attn/Reshape_ctx"),
        n("Gemm", ["ctx", "out_proj.weight", "out_proj.bias"], ["proj0"], name="/self_attn/Gemm", transB=1),
        n("Reshape", ["proj0", "seq_shape"], ["proj"], name="/self_attn/Reshape_out"),
        n("Add", ["x", "proj"], ["res1"], name="/Add"),
        n("LayerNormalization", ["res1", "norm.scale", "norm.bias"], ["h1"], name="/norm1/LayerNormalization", axis=-1),
        n("MatMul", ["h1", "linear1.weight"], ["f0"], name="/linear1/MatMul"),
        n("Add", ["f0", "linear1.bias"], ["f1"], name="/linear1/Add"),
        n("Relu", ["f1"], ["f2"], name="/Relu"),
        n("MatMul", ["f2", "linear2.weight"], ["f3"], name="/linear2/MatMul"),
        n("Add", ["f3", "linear2.bias"], ["f4"], name="/linear2/Add"),
        n("Add", ["h1", "f4"], ["res2"], name="/Add_1"),
        n("LayerNormalization", ["res2", "norm.scale", "norm.bias"], ["y"], name="/norm2/LayerNormalization", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "encoder_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [BATCH, SEQ, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [BATCH, SEQ, D])],
        [numpy_helper.from_array(v, k) for k, v in init.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("layout", ["parallel", "batched", "function"])
def test_fp16_encoder_split_opens_and_runs_at_every_level(layout):
    original = encoder_layer_fp16()
    onnx.checker.check_model(original, full_check=True)
    result = split_model(original, SplitConfig(layout=layout, verify=False, bench=False, min_elements=0))
    assert {r.node for r in result.report.sites if r.decision == "split"} >= {
        "/self_attn/MatMul", "/self_attn/Gemm", "/linear1/MatMul", "/linear2/MatMul"}
    x = np.random.default_rng(1).standard_normal((BATCH, SEQ, D)).astype(np.float16)
    results = probe_models([Probe(result.model.SerializeToString(), "the rewritten encoder", optimization=level,
                                  feeds={"x": x}) for level in LEVELS])
    assert [r.reason for r in results] == [None] * len(LEVELS)
    want = ort_run(original, {"x": x}, "enabled")[0].astype(np.float32)
    got = ort_run(result.model, {"x": x}, "enabled")[0].astype(np.float32)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
