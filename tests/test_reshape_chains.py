"""Chains through Reshapes that keep the feature axis (issue 11, item 6).

HF GPT-2's FFN (Conv1D as Gemm between Reshapes [B,S,H] -> [B*S,H] and back, with Shape readers
of the activation in between) is one chain: both Gemms split as one set of sub-networks, Gathers
only at the chain's ends, outputs equal to the original in ORT with optimizations off and on, at
two batch/sequence shapes. A Reshape whose target does not provably keep the last axis stops the
chain.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import chain_model, chained_blocks, gpt2_ffn_model, ort_run
from onnx_split import SplitConfig, split_model
from onnx_split.chains import FEATURE_WISE, find_links
from onnx_split.sites import find_sites

H, INNER, PARTS = 64, 256, 4
SHAPES = [(2, 3, H), (5, 1, H)]  # two batch and sequence sizes of the same model
LAYOUTS = ["parallel", "batched", "function"]


def _weights(seed: int = 0):
    return chained_blocks(np.random.default_rng(seed), [H, INNER, H], PARTS)


def _config(layout: str, **kw) -> SplitConfig:
    kw.setdefault("input_shapes", {"x": SHAPES[0]})
    return SplitConfig(min_elements=0, layout=layout, bench=False, providers=("cpu",), **kw)


def _assert_same_outputs(original, rewritten, shapes=SHAPES):
    for shape in shapes:
        x = {"x": np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)}
        for level in ("disabled", "enabled"):
            ref, got = ort_run(original, x, level), ort_run(rewritten, x, level)
            assert len(ref) == len(got)
            for a, b in zip(ref, got):
                assert a.shape == b.shape, (shape, level)
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=f"{shape}, opt {level}")


def _links(model):
    sites = find_sites(model, min_elements=0)
    return [(sites[l.a].name, sites[l.b].name) for l in find_links(sites, [i for i, s in enumerate(sites)
                                                                          if s.reason is None])]


def _body(result) -> list[onnx.NodeProto]:
    return list(result.model.functions[0].node) if result.model.functions else list(result.model.graph.node)


def _lanes(nodes: list[onnx.NodeProto], second: str) -> dict[str, set[str]]:
    """For every MatMul of the layer ``second``: the MatMuls its activation comes from through
    feature-wise nodes only (``<op>`` for the first other node: a Gather, Reshape, ...)."""
    producer = {o: n for n in nodes for o in n.output}

    def origins(tensor: str) -> set[str]:
        node = producer.get(tensor)
        if node is None or node.op_type == "Constant":
            return set()
        if node.op_type == "MatMul":
            return {node.name}
        if node.op_type in FEATURE_WISE:
            return set().union(*(origins(i) for i in node.input if i))
        return {f"<{node.op_type}>"}

    return {n.name: origins(n.input[0]) | origins(n.input[1]) for n in nodes
            if n.op_type == "MatMul" and n.name.startswith(second)}


@pytest.mark.parametrize("fold", [False, True], ids=["runtime shapes", "folded shapes"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpt2_ffn_is_one_chain(layout, fold):
    model = gpt2_ffn_model(*_weights(), fold_flat_shapes=fold)
    assert _links(model) == [("/mlp/c_fc/Gemm", "/mlp/c_proj/Gemm")]
    result = split_model(model, _config(layout))
    report = result.report
    (chain,) = report.chains
    assert chain.sites == ["/mlp/c_fc/Gemm", "/mlp/c_proj/Gemm"] and chain.parts == PARTS
    assert [(s.decision, s.chain) for s in report.sites] == [("split", "/mlp/c_fc/Gemm -> /mlp/c_proj/Gemm")] * 2
    assert "/mlp/c_fc/Gemm -> /mlp/c_proj/Gemm: 2 layers split as 4 independent sub-networks" in report.to_text()
    assert report.verification_passed is True

    # every MatMul of c_proj reads exactly one of c_fc's through feature-wise nodes: no Gather,
    # Concat or Reshape between the layers, and no two lanes share one
    body = _body(result)
    lanes = _lanes(body, "/mlp/c_proj/Gemm/split")
    assert len(lanes) == (1 if layout == "batched" else PARTS)
    assert all(len(o) == 1 and not next(iter(o)).startswith("<") for o in lanes.values()), lanes
    assert len({next(iter(o)) for o in lanes.values()}) == len(lanes)
    gathers = [n for n in body if n.op_type == "Gather" and n.name.split("/split/")[0] in ("/mlp/c_fc/Gemm",
                                                                                             "/mlp/c_proj/Gemm")]
    assert len(gathers) == chain.boundary_gathers
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert "Gemm" not in ops
    # the Shape reader of the activation between the layers was replaced, the one of x stays
    assert [n.input[0] for n in result.model.graph.node if n.op_type == "Shape" and not n.doc_string] == ["x"]
    _assert_same_outputs(model, result.model)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shape_readers_inside_the_chain_keep_their_values(layout):
    """Shape(gelu) as a graph output: its value, at two shapes, is the original's."""
    model = gpt2_ffn_model(*_weights(1), expose_shape=True)
    result = split_model(model, _config(layout))
    assert [c.sites for c in result.report.chains] == [["/mlp/c_fc/Gemm", "/mlp/c_proj/Gemm"]]
    for shape in SHAPES:
        x = {"x": np.zeros(shape, np.float32)}
        assert list(ort_run(result.model, x)[1]) == [shape[0], shape[1], INNER]
    _assert_same_outputs(model, result.model)


def test_the_tuner_measures_the_chain_and_keeps_a_valid_model():
    model = gpt2_ffn_model(*_weights(2))
    result = split_model(model, _config("auto", tune_seconds=1.0))
    (tuned,) = result.report.tuning
    assert tuned.chain == ["/mlp/c_fc/Gemm", "/mlp/c_proj/Gemm"]
    assert set(tuned.times_ms) == {"dense", "parallel", "parallel-rows", "batched"}
    assert result.report.verification_passed is True
    _assert_same_outputs(model, result.model)


def test_no_chains_splits_each_gemm_alone():
    model = gpt2_ffn_model(*_weights(3))
    result = split_model(model, _config("parallel", chains=False))
    assert [c.sites for c in result.report.chains] == [["/mlp/c_fc/Gemm"], ["/mlp/c_proj/Gemm"]]
    _assert_same_outputs(model, result.model)


def test_lossy_runs_chain_through_the_reshapes_too_and_verify():
    """Linked lossy splits are partitioned jointly (lossy.py), through the GPT-2 Reshapes as well;
    with --no-chains each Gemm is split alone. Both verify."""
    model = gpt2_ffn_model(*_weights(4))
    joint = split_model(model, _config("batched", parts=2))
    alone = split_model(model, _config("batched", parts=2, chains=False))
    assert [c.sites for c in joint.report.chains] == [["/mlp/c_fc/Gemm", "/mlp/c_proj/Gemm"]]
    assert [c.sites for c in alone.report.chains] == [["/mlp/c_fc/Gemm"], ["/mlp/c_proj/Gemm"]]
    for result in (joint, alone):
        assert [s.decision for s in result.report.sites] == ["split", "split"]
        assert result.report.verification_passed is True


# -- a chain of MatMuls whose leading dims change on the way ------------------------------------------


def _reshaping_chain(constant_target: bool) -> onnx.ModelProto:
    """x [B, S, 64] -> MatMul -> Reshape [-1, 64] -> Relu -> Reshape back to [B, S, 64] (from Shape(x),
    or the constant [3, -1, 64] when ``constant_target``) -> MatMul -> y."""
    w0, w1 = chained_blocks(np.random.default_rng(9), [H, H, H], PARTS)
    inits = [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(w1, "W1"),
             numpy_helper.from_array(np.array([-1, H], np.int64), "flat"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([H], np.int64), "width"),
             numpy_helper.from_array(np.array([3, -1, H], np.int64), "three_rows")]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="fc0"),
             helper.make_node("Reshape", ["h0", "flat"], ["h1"], name="to_2d"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu")]
    if constant_target:
        nodes.append(helper.make_node("Reshape", ["h2", "three_rows"], ["h3"], name="to_3d"))
    else:
        nodes += [helper.make_node("Shape", ["x"], ["xs"], name="shape_x"),
                  helper.make_node("Slice", ["xs", "zero", "two"], ["lead"], name="lead"),
                  helper.make_node("Concat", ["lead", "width"], ["size"], name="size", axis=0),
                  helper.make_node("Reshape", ["h2", "size"], ["h3"], name="to_3d")]
    nodes.append(helper.make_node("MatMul", ["h3", "W1"], ["y"], name="fc1"))
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["B", "S", H])],
                              [helper.make_tensor_value_info("y", f, [None, None, H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("constant_target", [False, True], ids=["Shape-computed target", "constant target"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_shape_is_restored_when_the_leading_dims_change(layout, constant_target):
    model = _reshaping_chain(constant_target)
    shapes = [(3, 4, H), (6, 2, H)] if constant_target else SHAPES  # [3, -1, 64] needs 3 | B*S
    result = split_model(model, _config(layout, input_shapes={"x": shapes[0]}))
    assert [c.sites for c in result.report.chains] == [["fc0", "fc1"]]
    assert result.report.verification_passed is True
    _assert_same_outputs(model, result.model, shapes)


# -- what stops a chain ----------------------------------------------------------------------------


def _one(op_nodes, inits=()):
    def build(h, n, tag):
        nodes = op_nodes(h, n, tag)
        return nodes, [numpy_helper.from_array(v, f"{tag}_{k}") for k, v in dict(inits).items()], nodes[-1].output[0]
    return build


def _reshaped_and_not(h, n, tag):
    """Add(Reshape(h, [1, -1, n]), h): two region inputs whose leading dims differ."""
    return [helper.make_node("Reshape", [h, f"{tag}_r3"], [f"{tag}_3d"], name=f"{tag}_reshape"),
            helper.make_node("Add", [f"{tag}_3d", h], [f"{tag}_sum"], name=f"{tag}_add"),
            helper.make_node("Reshape", [f"{tag}_sum", f"{tag}_r2"], [f"{tag}_out"], name=f"{tag}_back")]


STOPS = {
    "Reshape to a shape only known at run time": (
        _one(lambda h, n, tag: [helper.make_node("Reshape", [h, "shape_in"], [f"{tag}_r"], name=f"{tag}_reshape")]),
        True),
    "Pow with a fractional exponent": (  # sqrt(|h|): padding lanes could be negative after a Sub
        _one(lambda h, n, tag: [helper.make_node("Abs", [h], [f"{tag}_a"], name=f"{tag}_abs"),
                                helper.make_node("Pow", [f"{tag}_a", f"{tag}_e"], [f"{tag}_p"], name=f"{tag}_pow")],
             {"e": np.array(0.5, np.float32)}), False),
    "inputs through different Reshapes": (_one(_reshaped_and_not, {"r3": np.array([1, -1, H], np.int64),
                                                                   "r2": np.array([-1, H], np.int64)}), False),
}


@pytest.mark.parametrize("case", list(STOPS))
def test_chain_stops(case, tmp_path):
    build, shape_input = STOPS[case]
    model = chain_model(chained_blocks(np.random.default_rng(11), [H, H, H], PARTS), [[build]], (4, H))
    if shape_input:
        model.graph.input.append(helper.make_tensor_value_info("shape_in", TensorProto.INT64, [2]))
    assert _links(model) == []
    config = _config("parallel", input_shapes={"x": (4, H)})
    if shape_input:
        path = tmp_path / "inputs.npz"
        np.savez(path, x=np.ones((4, H), np.float32), shape_in=np.array([4, H], np.int64))
        config = _config("parallel", input_shapes={"x": (4, H)}, inputs_path=str(path))
    result = split_model(model, config)
    assert [c.sites for c in result.report.chains] == [["fc0"], ["fc1"]]
    assert result.report.verification_passed is True


def test_pow_with_a_whole_exponent_is_feature_wise():
    build = _one(lambda h, n, tag: [helper.make_node("Pow", [h, f"{tag}_e"], [f"{tag}_p"], name=f"{tag}_pow")],
                 {"e": np.array(2.0, np.float32)})
    model = chain_model(chained_blocks(np.random.default_rng(12), [H, H, H], PARTS), [[build]], (4, H))
    assert _links(model) == [("fc0", "fc1")]
    result = split_model(model, _config("batched", input_shapes={"x": (4, H)}))
    assert [c.sites for c in result.report.chains] == [["fc0", "fc1"]]
    _assert_same_outputs(model, result.model, [(4, H)])


def test_a_reshape_that_keeps_the_last_axis_links_and_a_shape_range_reader_keeps_its_value():
    """Shape(h, start=1) (opset 15+) of a tensor inside the chain, as a graph output."""
    def build(h, n, tag):
        nodes = [helper.make_node("Reshape", [h, f"{tag}_t"], [f"{tag}_r"], name=f"{tag}_reshape"),
                 helper.make_node("Shape", [f"{tag}_r"], ["lead_shape"], name=f"{tag}_shape", start=1),
                 helper.make_node("Relu", [f"{tag}_r"], [f"{tag}_relu"], name=f"{tag}_relu")]
        return nodes, [numpy_helper.from_array(np.array([2, -1, n], np.int64), f"{tag}_t")], f"{tag}_relu"
    model = chain_model(chained_blocks(np.random.default_rng(13), [H, H, H], PARTS), [[build]], ("N", H))
    model.graph.output.append(helper.make_tensor_value_info("lead_shape", TensorProto.INT64, [2]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None, H]))
    assert _links(model) == [("fc0", "fc1")]
    for layout in LAYOUTS:
        result = split_model(model, _config(layout, input_shapes={"x": (4, H)}))
        assert [c.sites for c in result.report.chains] == [["fc0", "fc1"]], layout
        assert result.report.verification_passed is True
        assert list(ort_run(result.model, {"x": np.zeros((4, H), np.float32)})[1]) == [2, H]
        _assert_same_outputs(model, result.model, [(4, H), (8, H)])
