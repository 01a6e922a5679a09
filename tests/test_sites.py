import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import if_model, matmul_model
from onnx_split.sites import find_sites


def _w(k=8, n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _one(model, **kw):
    sites = find_sites(model, **kw)
    assert len(sites) == 1
    return sites[0]


def test_initializer_weight_is_a_candidate():
    site = _one(matmul_model(_w(), [2, 8]))
    assert site.reason is None and site.shape == (8, 6) and site.activation == "x"


def test_constant_node_weight_is_a_candidate():
    w = _w()
    site = _one(matmul_model(w, [2, 8], weight_as_constant_node=True))
    assert site.reason is None
    np.testing.assert_array_equal(site.weight, w)


def test_constant_foldable_producer_chain_is_folded():
    w = _w()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])
    nodes = [helper.make_node("Transpose", ["Wt"], ["W0"], perm=[1, 0]),
             helper.make_node("Mul", ["W0", "two"], ["W"]),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "Wt"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    site = _one(model)
    assert site.reason is None
    np.testing.assert_array_equal(site.weight, 2 * w)
    assert sorted(site.weight_producers) == [0, 1]


def test_weight_graph_input_is_kept_with_reason():
    model = matmul_model(_w(), [2, 8])
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 6]))
    site = _one(model)
    assert "graph input" in site.reason and "run time" in site.reason


def test_left_constant_and_both_constant_are_kept():
    w = _w()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 2])
    g = helper.make_graph([helper.make_node("MatMul", ["W", "x"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(w, "W")])
    assert "left operand" in _one(helper.make_model(g)).reason
    g = helper.make_graph([helper.make_node("MatMul", ["W", "V"], ["y"])], "g", [], [y],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w.T.copy(), "V")])
    assert "both operands are constant" in _one(helper.make_model(g)).reason


def test_unsupported_forms_are_kept_with_reasons():
    w3 = np.zeros((2, 8, 6), np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 6])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(w3, "W")])
    assert "only 2-D weights" in _one(helper.make_model(g)).reason
    wi = np.ones((8, 6), np.int32)
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [2, 6])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(wi, "W")])
    assert "dtype int32 is not supported" in _one(helper.make_model(g)).reason


def test_min_elements_keeps_small_weights():
    model = matmul_model(_w(), [2, 8])
    assert "below --min-elements 100" in _one(model, min_elements=100).reason
    assert _one(model, min_elements=48).reason is None
    assert _one(model, min_elements=0).reason is None


def test_random_producer_is_not_constant():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])
    nodes = [helper.make_node("RandomNormal", [], ["W"], shape=[8, 6]),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    assert "random" in _one(model).reason


def test_old_opset_is_kept():
    model = matmul_model(_w(), [2, 8], opset=6, ir_version=3)
    assert "older than 7" in _one(model).reason


def test_sites_in_subgraphs_with_outer_scope_weight():
    w = _w()
    model = if_model(w, 2, else_scale=-1.0)
    sites = find_sites(model)
    assert sorted((s.name, s.scope, s.reason) for s in sites) == [
        ("else_fc", "main/branch/else_branch", None), ("then_fc", "main/branch/then_branch", None)]
    by_name = {s.name: s for s in sites}
    np.testing.assert_array_equal(by_name["then_fc"].weight, w)
    np.testing.assert_array_equal(by_name["else_fc"].weight, -w)


def test_shared_weight_gives_two_sites():
    w = _w()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 6]) for n in ("y1", "y2")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y1"], name="a"),
             helper.make_node("MatMul", ["x", "W"], ["y2"], name="b")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], ys, [numpy_helper.from_array(w, "W")]))
    sites = find_sites(model)
    assert [s.reason for s in sites] == [None, None] and [s.weight_name for s in sites] == ["W", "W"]


def test_gemm_weight_is_oriented_k_by_n():
    w = _w()
    x = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])
    g = helper.make_graph([helper.make_node("Gemm", ["a", "B"], ["y"], transB=1, alpha=0.5)], "g", [x], [y],
                          [numpy_helper.from_array(np.ascontiguousarray(w.T), "B")])
    site = _one(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert site.shape == (8, 6) and site.alpha == 0.5 and site.bias is None
    np.testing.assert_array_equal(site.weight, w)
    onnx.checker.check_model(helper.make_model(g))


def test_ir3_weights_are_graph_inputs_and_the_reason_says_how_to_split_them():
    model = matmul_model(_w(), [2, 8], opset=7, ir_version=3)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 6]))
    reason = _one(model).reason
    assert "initializer default" in reason and "IR >= 4" in reason


def test_a_deep_chain_gives_short_reasons_so_the_pass_stays_linear():
    """200 chained MatMul -> Tanh layers, then a MatMul whose right operand is the last activation:
    one short reason, the same for every such site, not one that names every layer (nested
    reasons grew with depth: O(n^2))."""
    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(200):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"W{i}"))
        nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Tanh", [f"m{i}"], [f"t{i}"], name=f"act{i}")]
        h = f"t{i}"
    nodes.append(helper.make_node("MatMul", ["x", h], ["y"], name="last"))
    g = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])], inits)
    sites = find_sites(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert len(sites) == 201 and all(s.reason is None for s in sites[:200])
    assert sites[-1].reason == "MatMul between two activations (attention-style): not a candidate"


def test_a_weight_that_is_a_graph_input_or_folds_from_a_constant_keeps_its_own_reason():
    """Only a right operand computed from a runtime input is "between two activations"."""
    f = TensorProto.FLOAT
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "W")
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], name="t"),        # folds: a candidate
             helper.make_node("MatMul", ["x", "Wt"], ["h"], name="folded"),
             helper.make_node("MatMul", ["h", "v"], ["y"], name="input")]   # a graph input
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2, 8]),
                                       helper.make_tensor_value_info("v", f, [8, 8])],
                          [helper.make_tensor_value_info("y", f, [2, 8])], [w])
    folded, graph_input = find_sites(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert folded.reason is None
    assert graph_input.reason.startswith("weight 'v' is a graph input")


def test_sites_of_a_header_read_the_weights_of_the_model_it_was_copied_from():
    """The pipeline's working copy has no main-graph weights until the rewrite: its sites are the
    same as the full model's, each node the header's own."""
    from onnx_split.protos import without_weights
    w = _w()
    x = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])
    g = helper.make_graph([helper.make_node("Gemm", ["a", "B", "C"], ["y"], transB=1)], "g", [x], [y],
                          [numpy_helper.from_array(np.ascontiguousarray(w.T), "B"),
                           numpy_helper.from_array(np.arange(6, dtype=np.float32), "C")])
    full = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    header = without_weights(full)
    assert not header.graph.initializer
    alone = _one(header)
    assert alone.reason is not None  # without the weights it has nothing to split
    site = _one(header, weights=full)
    want = _one(full)
    assert site.reason is None and site.shape == want.shape == (8, 6) and site.node is header.graph.node[0]
    np.testing.assert_array_equal(site.weight, w)
    np.testing.assert_array_equal(site.bias_value, want.bias_value)


def test_released_weights_keep_their_shape_and_dtype():
    from onnx_split.sites import release_weights
    sites = find_sites(matmul_model(_w().astype(np.float16), [2, 8]))
    site = sites[0]
    assert site.shape == (8, 6) and site.weight_dtype == np.float16
    release_weights(sites)
    assert site.weight is None and site.shape == (8, 6) and site.weight_dtype == np.float16
    assert site.constant(site.weight_name) is not None  # read again from the model on demand
