import itertools

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import gemm_model, if_model, matmul_model, op_counts, ort_run, planted
from onnx_split import SplitConfig, split_model

LAYOUTS = ["parallel", "batched"]


def _config(layout="parallel", **kw):
    kw.setdefault("min_elements", 0)
    return SplitConfig(layout=layout, bench=False, providers=("cpu",), **kw)


def _assert_equivalent(original, rewritten, feeds, rtol=1e-5, atol=1e-5):
    for optimization in ("disabled", "enabled"):
        ref = ort_run(original, feeds, optimization)
        got = ort_run(rewritten, feeds, optimization)
        for a, b in zip(ref, got):
            scale = max(float(np.sqrt(np.mean(np.square(a.astype(np.float64))))), 1e-30)
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol * scale)


def _assert_verified(report):
    assert report.checker == {"passed": True, "error": None}
    assert report.verification, "verification did not run"
    assert [(v.provider, v.optimization, v.status) for v in report.verification] == [
        ("CPUExecutionProvider", "disabled", "passed"), ("CPUExecutionProvider", "enabled", "passed")]


GEMM_CASES = [
    (ta, tb, alpha, beta, c)
    for ta, tb, alpha, beta, c in itertools.product(
        [0, 1], [0, 1], [1.0, 0.5], [1.0, 0.0, 2.0], [None, (), (1,), "N", (1, "N"), ("M", 1), ("M", "N")])
    if not (c is None and beta != 1.0)
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ta,tb,alpha,beta,c", GEMM_CASES)
def test_gemm_every_attribute_combination(layout, ta, tb, alpha, beta, c):
    rng = np.random.default_rng(3)
    m, k, n = 5, 24, 18
    w, _ = planted(rng, k, n, 3)
    c_shape = None if c is None else tuple({"M": m, "N": n}.get(d, d) for d in c)
    model = gemm_model(w, m, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, c_shape=c_shape, opset=13)
    result = split_model(model, _config(layout))
    (site,) = result.report.sites
    assert site.decision == "split" and site.parts == 3, site.reason
    _assert_verified(result.report)
    counts = op_counts(result.model)
    assert "Gemm" not in counts
    assert counts["MatMul"] == (3 if layout == "parallel" else 1)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    _assert_equivalent(model, result.model, {"a": a})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemm_bias_as_graph_input(layout):
    rng = np.random.default_rng(4)
    w, _ = planted(rng, 16, 12, 2)
    model = gemm_model(w, 3, beta=0.5, c_shape=(12,), c_is_input=True)
    result = split_model(model, _config(layout))
    _assert_verified(result.report)
    feeds = {"a": rng.standard_normal((3, 16)).astype(np.float32), "c": rng.standard_normal(12).astype(np.float32)}
    _assert_equivalent(model, result.model, feeds)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("x_shape", [[2, 3, 5, 40], [7, 40], [40], ["batch", "seq", 40]])
def test_matmul_nd_activations(layout, x_shape):
    rng = np.random.default_rng(5)
    w, _ = planted(rng, 40, 30, 4)
    model = matmul_model(w, x_shape)
    result = split_model(model, _config(layout, input_shapes={"x": (2, 3, 40)} if "batch" in x_shape else {}))
    assert result.report.sites[0].decision == "split"
    _assert_verified(result.report)
    shape = [2, 3, 40] if "batch" in x_shape else x_shape
    _assert_equivalent(model, result.model, {"x": rng.standard_normal(shape).astype(np.float32)})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_names_doc_strings_metadata_and_compatibility(layout):
    rng = np.random.default_rng(6)
    w, _ = planted(rng, 32, 32, 4)
    model = matmul_model(w, ["N", 32], opset=13, ir_version=7)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="act"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 32]))
    result = split_model(model, _config(layout))
    out = result.model
    assert out.ir_version == 7 and [(o.domain, o.version) for o in out.opset_import] == [("", 13)]
    new_nodes = [n for n in out.graph.node if n.name != "act"]
    assert new_nodes and all(n.name.startswith("fc1/split/") for n in new_nodes)
    assert all(n.doc_string.startswith("onnx_split 0.1.0") for n in new_nodes)
    assert all(t.name.startswith("fc1/split/") for t in out.graph.initializer)
    assert "W" not in {t.name for t in out.graph.initializer}  # the old weight is gone
    producers = {o for n in out.graph.node for o in n.output}
    assert "y" in producers and out.graph.node[-1].input[0] == "y"  # consumer untouched
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["onnx_split.version"] == "0.1.0" and f'"layout": "{layout}"' in meta["onnx_split.options"]
    assert model.graph.node[0].op_type == "MatMul" and len(model.graph.node) == 2  # input not modified
    _assert_verified(result.report)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opset", [7, 9, 10, 11, 13, 21])
def test_old_and_new_opsets_use_their_own_op_forms(layout, opset):
    rng = np.random.default_rng(7)
    w, _ = planted(rng, 24, 20, 3)
    model = matmul_model(w, [4, 24], opset=opset, ir_version=4 if opset < 9 else 7)
    result = split_model(model, _config(layout))
    assert result.report.sites[0].decision == "split", result.report.sites[0].reason
    assert result.model.opset_import[0].version == opset and result.model.ir_version == model.ir_version
    slices = [n for n in result.model.graph.node if n.op_type == "Slice"]
    for s in slices:
        assert (len(s.input) == 1) == (opset < 10)
    _assert_verified(result.report)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_inside_if_subgraph(layout):
    rng = np.random.default_rng(8)
    w, _ = planted(rng, 16, 12, 2)
    model = if_model(w, 3, else_scale=-2.0)
    result = split_model(model, _config(layout))
    assert [s.decision for s in result.report.sites] == ["split", "split"]
    _assert_verified(result.report)
    xv = rng.standard_normal((3, 16)).astype(np.float32)
    for c in (True, False):
        _assert_equivalent(model, result.model, {"x": xv, "cond": np.array(c)})
    assert not result.model.graph.initializer  # W moved into the then-branch parts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_weight_and_constant_node_weight(layout):
    rng = np.random.default_rng(9)
    w, _ = planted(rng, 20, 20, 4)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 20])
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 20]) for n in ("y1", "y2")]
    nodes = [helper.make_node("Constant", [], ["W"], name="W_const", value=numpy_helper.from_array(w, "W")),
             helper.make_node("MatMul", ["x", "W"], ["y1"], name="a"),
             helper.make_node("MatMul", ["y1", "W"], ["y2"], name="b")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], ys), opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    result = split_model(model, _config(layout))
    assert [s.decision for s in result.report.sites] == ["split", "split"]
    assert "Constant" not in op_counts(result.model)  # the folded producer went with its last reader
    _assert_verified(result.report)
    _assert_equivalent(model, result.model, {"x": rng.standard_normal((2, 20)).astype(np.float32)})


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_fp16_and_fp64(layout, dtype):
    rng = np.random.default_rng(10)
    w, _ = planted(rng, 32, 24, 4, dtype=dtype)
    model = matmul_model(w, [4, 32])
    result = split_model(model, _config(layout))
    assert result.report.sites[0].decision == "split" and result.report.sites[0].dtype == np.dtype(dtype).name
    _assert_verified(result.report)
    assert {t.data_type for t in result.model.graph.initializer if "/W" in t.name} == {
        helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_is_verified_with_the_reference_evaluator(layout):
    rng = np.random.default_rng(11)
    w, _ = planted(rng, 16, 16, 2)
    w = w.astype(ml_dtypes.bfloat16)
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 16])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 16])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g", [x], [y],
                          [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = split_model(model, _config(layout))
    assert result.report.sites[0].decision == "split"
    (entry,) = [v for v in result.report.verification if v.passed is not None]
    assert entry.provider == "onnx.reference" and entry.passed
    assert "ONNX Runtime cannot run the original" in entry.detail
    assert result.report.checker["passed"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unused_inputs_and_dead_outputs_become_bias(layout):
    rng = np.random.default_rng(12)
    w = np.zeros((30, 20), np.float32)
    w[0:10, 0:8] = rng.standard_normal((10, 8))
    w[12:20, 10:16] = rng.standard_normal((8, 6))  # rows 10,11,20.. unused; cols 8,9,16.. dead
    model = gemm_model(w, 4, c_shape=(20,), opset=13)
    result = split_model(model, _config(layout))
    site = result.report.sites[0]
    assert site.decision == "split" and site.unused_inputs == 12 and site.dead_outputs == 6
    _assert_verified(result.report)
    _assert_equivalent(model, result.model, {"a": rng.standard_normal((4, 30)).astype(np.float32)})


def test_fully_connected_weight_is_kept_and_model_unchanged():
    w = np.random.default_rng(13).standard_normal((16, 16)).astype(np.float32)
    model = matmul_model(w, [2, 16])
    result = split_model(model, _config())
    site = result.report.sites[0]
    assert site.decision == "kept" and "fully connected" in site.reason
    assert not result.report.modified
    assert [n.op_type for n in result.model.graph.node] == ["MatMul"]


def test_all_zero_weight_is_kept_with_reason():
    model = matmul_model(np.zeros((16, 16), np.float32), [2, 16])
    site = split_model(model, _config()).report.sites[0]
    assert site.decision == "kept" and "does not depend on the input" in site.reason


def test_threshold_splits_near_zero_weights_within_budget():
    rng = np.random.default_rng(14)
    w, _ = planted(rng, 64, 64, 4)
    noisy = w + (rng.standard_normal(w.shape) * 1e-9).astype(np.float32) * (w == 0)
    model = matmul_model(noisy.astype(np.float32), [3, 64])
    assert split_model(model, _config()).report.sites[0].decision == "kept"
    result = split_model(model, _config(threshold=1e-7))
    assert result.report.sites[0].decision == "split" and result.report.sites[0].parts == 4
    assert result.report.verification_passed


def test_split_is_exact_on_block_identity_permutations():
    rng = np.random.default_rng(15)
    w, _ = planted(rng, 48, 48, 4, permute=False)
    result = split_model(matmul_model(w, [2, 48]), _config())
    counts = op_counts(result.model)
    assert counts.get("Gather", 0) == 0 and counts["Slice"] == 4  # contiguous blocks: no Gather at all


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_inside_loop_and_scan_bodies(layout):
    """A Loop body that applies an outer-scope weight 3 times, and a Scan body with its own weight."""
    rng = np.random.default_rng(16)
    w, _ = planted(rng, 24, 24, 3)
    v, _ = planted(rng, 24, 24, 4)
    f = TensorProto.FLOAT
    loop_body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "W"], ["h_out"], name="loop_fc")],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", f, [2, 24])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", f, [2, 24])])
    scan_body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "V"], ["proj"], name="scan_fc"),
         helper.make_node("Add", ["acc_in", "proj"], ["acc_out"])],
        "scan_body",
        [helper.make_tensor_value_info("acc_in", f, [24]), helper.make_tensor_value_info("row", f, [24])],
        [helper.make_tensor_value_info("acc_out", f, [24])],
        [numpy_helper.from_array(v, "V")])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["h"], name="loop", body=loop_body),
             helper.make_node("Scan", ["acc0", "h"], ["acc"], name="scan", body=scan_body, num_scan_inputs=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", f, [2, 24])], [helper.make_tensor_value_info("acc", f, [24])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(3, np.int64), "trips"),
         numpy_helper.from_array(np.zeros(24, np.float32), "acc0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    result = split_model(model, _config(layout))
    assert [(s.node, s.scope, s.decision) for s in result.report.sites] == [
        ("loop_fc", "main/loop/body", "split"), ("scan_fc", "main/scan/body", "split")]
    _assert_verified(result.report)
    _assert_equivalent(model, result.model, {"x": rng.standard_normal((2, 24)).astype(np.float32)})


@pytest.mark.parametrize("ir_version", [8, 10])
def test_node_metadata_tags_the_rewrite_where_the_ir_version_has_it(ir_version):
    w, _ = planted(np.random.default_rng(17), 32, 32, 4)
    result = split_model(matmul_model(w, [2, 32], opset=21, ir_version=ir_version), _config())
    tags = [{p.key: p.value for p in n.metadata_props} for n in result.model.graph.node]
    if ir_version >= 10:
        assert all(t["onnx_split.site"] == "fc1" and t["onnx_split.layout"].startswith("parallel") for t in tags)
    else:
        assert tags and not any(tags)
    _assert_verified(result.report)


def test_without_verification_the_output_is_still_loaded_in_ort():
    w, _ = planted(np.random.default_rng(18), 32, 32, 4)
    report = split_model(matmul_model(w, [2, 32]), _config(verify=False)).report
    assert report.checker["ort_loads"] == "yes" and report.verification == []
    too_new = matmul_model(w, [2, 32], ir_version=14)  # onnx 1.23's default; ORT 1.31 reads up to 13
    report = split_model(too_new, _config(verify=False)).report
    assert "IR version" in report.checker["ort_loads"]


@pytest.mark.parametrize("shape,transposes", [([1, 40], 0), (["N", 40], 2), ([3, 40], 2), ([1, 1, 40], 0)])
def test_permuted_parallel_form_follows_the_static_row_count(shape, transposes):
    """One static row: gather elements of x directly; otherwise work on x^T (row copies)."""
    rng = np.random.default_rng(19)
    w, _ = planted(rng, 40, 32, 4)  # permuted
    result = split_model(matmul_model(w, shape), _config())
    assert op_counts(result.model).get("Transpose", 0) == transposes
    _assert_verified(result.report)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_square_weight_shared_by_gemms_in_both_orientations(layout):
    rng = np.random.default_rng(20)
    w = np.zeros((24, 24), np.float32)
    w[:8, :12] = rng.standard_normal((8, 12))  # not symmetric: W and W^T split differently
    w[8:, 12:] = rng.standard_normal((16, 12))
    w = w[rng.permutation(24)]
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Gemm", ["a", "W"], ["y1"], name="plain"),
             helper.make_node("Gemm", ["a", "W"], ["y2"], name="transposed", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", f, [3, 24])],
                          [helper.make_tensor_value_info(n, f, [3, 24]) for n in ("y1", "y2")],
                          [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    result = split_model(model, _config(layout))
    assert [s.decision for s in result.report.sites] == ["split", "split"]
    assert [s.part_shapes for s in result.report.sites][0] != [s.part_shapes for s in result.report.sites][1]
    _assert_verified(result.report)
    _assert_equivalent(model, result.model, {"a": rng.standard_normal((3, 24)).astype(np.float32)})


def test_kept_sites_still_report_their_dense_flops():
    report = split_model(matmul_model(np.ones((8, 4), np.float32), [2, 8]), _config(min_elements=100)).report
    assert report.sites[0].decision == "kept" and report.sites[0].flops_before == 2 * 8 * 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ir3_model_lists_new_weights_as_graph_inputs(layout):
    """Before IR 4 every initializer must also be a graph input."""
    w, _ = planted(np.random.default_rng(21), 32, 32, 4)
    model = matmul_model(w, [2, 32], opset=7, ir_version=3, weight_as_constant_node=True)
    result = split_model(model, _config(layout))
    assert result.report.sites[0].decision == "split"
    inputs = {i.name for i in result.model.graph.input}
    assert result.model.ir_version == 3 and all(t.name in inputs for t in result.model.graph.initializer)
    _assert_verified(result.report)


def _branch(name: str, w: np.ndarray, x: str, out: str, m: int) -> onnx.GraphProto:
    f = TensorProto.FLOAT
    return helper.make_graph([helper.make_node("MatMul", [x, f"{name}_W"], [out], name=name)], name, [],
                             [helper.make_tensor_value_info(out, f, [m, w.shape[1]])],
                             [numpy_helper.from_array(w, f"{name}_W")])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("w0_source", ["initializer", "constant_node"])
def test_subgraph_rewrite_survives_a_split_site_in_the_parent(layout, w0_source):
    """The parent graph is rebuilt too (and, with a Constant-node weight, rebuilt again when the
    Constant is dropped): the subgraph's rewrite and cleanup must land in the graph that is kept."""
    rng = np.random.default_rng(22)
    w0, _ = planted(rng, 16, 16, 2)
    w1, _ = planted(rng, 16, 16, 4)
    f = TensorProto.FLOAT
    constant = [helper.make_node("Constant", [], ["W0"], value=numpy_helper.from_array(w0, "W0"))]
    nodes = (constant if w0_source == "constant_node" else []) + [
             helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"),
             helper.make_node("If", ["cond"], ["y"], name="br", then_branch=_branch("then_fc", w1, "h", "t", 3),
                              else_branch=_branch("else_fc", -w1, "h", "e", 3))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                       helper.make_tensor_value_info("x", f, [3, 16])],
                          [helper.make_tensor_value_info("y", f, [3, 16])],
                          [numpy_helper.from_array(w0, "W0")] if w0_source == "initializer" else [])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = split_model(model, _config(layout))
    assert [s.decision for s in result.report.sites] == ["split"] * 3
    assert "Constant" not in op_counts(result.model)
    if_node = next(n for n in result.model.graph.node if n.op_type == "If")
    for attr in if_node.attribute:
        body = [n.op_type for n in attr.g.node]
        assert "MatMul" in body and len(body) > 1, (attr.name, body)  # rewritten, not the original node
        assert not any(t.name.endswith("_W") for t in attr.g.initializer)  # the old weight went away
    _assert_verified(result.report)
    xv = rng.standard_normal((3, 16)).astype(np.float32)
    for c in (True, False):
        _assert_equivalent(model, result.model, {"x": xv, "cond": np.array(c)})


def test_unnamed_control_flow_nodes_get_distinct_scopes():
    rng = np.random.default_rng(23)
    a, _ = planted(rng, 16, 16, 2)
    b, _ = planted(rng, 16, 16, 4)
    f = TensorProto.FLOAT
    nodes = [helper.make_node("If", ["cond"], ["y1"], then_branch=_branch("t1", a, "x", "o1", 2),
                              else_branch=_branch("e1", a, "x", "p1", 2)),
             helper.make_node("If", ["cond"], ["y2"], then_branch=_branch("t2", b, "x", "o2", 2),
                              else_branch=_branch("e2", b, "x", "p2", 2))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                       helper.make_tensor_value_info("x", f, [2, 16])],
                          [helper.make_tensor_value_info(n, f, [2, 16]) for n in ("y1", "y2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = split_model(model, _config())
    scopes = [s.scope for s in result.report.sites]
    assert len(set(scopes)) == 4 and all(s.startswith("main/If#") for s in scopes)
    assert sorted(s.parts for s in result.report.sites) == [2, 2, 4, 4]
    _assert_verified(result.report)
    xv = rng.standard_normal((2, 16)).astype(np.float32)
    for c in (True, False):
        _assert_equivalent(model, result.model, {"x": xv, "cond": np.array(c)})
