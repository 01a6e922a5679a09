"""A split's end permutations folded into the dense layers next to it (rewrite/neighbours.py).

dense fc0 -> feature-wise -> split fc1 -> feature-wise -> dense fc2: fc0 computes its outputs in the
order fc1's parts read them and fc2 reads fc1's outputs in the order its parts write them, so the
two Gathers go. Every test checks the outputs in ORT with optimizations off and on.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import chain_model, feature_wise, ort_run, planted
from onnx_split import SplitConfig, split_model
from onnx_split.cli import main
from onnx_split.html_report import run_html

WIDTH, PARTS = 64, 4


def _config(layout="batched", **kw) -> SplitConfig:
    kw.setdefault("min_elements", 0)
    kw.setdefault("input_shapes", {"x": kw.pop("x_shape", (8, WIDTH))})
    return SplitConfig(layout=layout, bench=False, providers=("cpu",), **kw)


def _sandwich(seed: int, parts: int = PARTS, between=None, **kw) -> onnx.ModelProto:
    """fc0 dense random, fc1 planted blocks under hidden permutations, fc2 dense random."""
    rng = np.random.default_rng(seed)
    dense = lambda k, n: (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    middle, _ = planted(rng, WIDTH, WIDTH, parts)
    between = between or [[feature_wise("Mul", rng), feature_wise("Relu", rng)],
                          [feature_wise("Add", rng), feature_wise("Relu", rng)]]
    return chain_model([dense(32, WIDTH), middle, dense(WIDTH, 10)], between, kw.pop("x_shape", (8, 32)), **kw)


def _same_outputs(original, rewritten, shape=(8, 32), rtol=1e-4, atol=1e-5):
    feeds = {"x": np.random.default_rng(5).standard_normal(shape).astype(np.float32)}
    for optimization in ("disabled", "enabled"):
        for a, b in zip(ort_run(original, feeds, optimization), ort_run(rewritten, feeds, optimization)):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"optimization {optimization}")


def _init(model, name) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _gathers(model) -> int:
    return Counter(n.op_type for n in model.graph.node)["Gather"]


def test_both_gathers_fold_into_the_dense_neighbours():
    model = _sandwich(1)
    result = split_model(model, _config("batched", x_shape=(8, 32)))
    report = result.report
    assert [(s.node, s.decision) for s in report.sites] == [("fc0", "kept"), ("fc1", "split"), ("fc2", "kept")]
    (chain,) = report.chains
    assert chain.folded == ["input order into 'fc0'", "output order into 'fc2'"]
    assert chain.boundary_gathers == 0 and _gathers(result.model) == 0
    assert [(v.optimization, v.status) for v in report.verification] == [("disabled", "passed"),
                                                                         ("enabled", "passed")]
    _same_outputs(model, result.model)
    # the neighbours keep their names and shapes; their weights, bias and constants are permuted
    for name in ("W0", "W2", "b0", "l0s0_c", "b1", "l1s0_c"):
        before, after = _init(model, name), _init(result.model, name)
        assert after.shape == before.shape and not np.array_equal(after, before)
        np.testing.assert_array_equal(np.sort(after, axis=None), np.sort(before, axis=None))
    fc0 = next(n for n in result.model.graph.node if n.name == "fc0")
    assert "reordered to the input order of the split 'fc1'" in fc0.doc_string
    assert "folded: input order into 'fc0', output order into 'fc2'" in report.to_text()
    assert "input order into &#x27;fc0&#x27;, output order into &#x27;fc2&#x27;" in run_html(report)

    unfolded = split_model(model, _config("batched", x_shape=(8, 32), fold=False))
    assert unfolded.report.chains[0].folded == [] and unfolded.report.chains[0].boundary_gathers == 2
    assert _gathers(unfolded.model) == 2
    for name in ("W0", "W2", "b0"):
        np.testing.assert_array_equal(_init(unfolded.model, name), _init(model, name))


def test_folding_reads_the_neighbours_weights_from_a_spilled_input(monkeypatch):
    """A large input's weights are references to its spill until the rewrite is verified: the fold
    reads the neighbours' values from there and writes the same model as in memory."""
    from onnx_split import spill

    model = _sandwich(1)
    in_memory = split_model(model, _config("batched", x_shape=(8, 32)))
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    spilled = split_model(model, _config("batched", x_shape=(8, 32)))
    assert spilled.report.chains[0].folded == ["input order into 'fc0'", "output order into 'fc2'"]
    assert not spill.refers_outside(spilled.model)
    assert spilled.model.SerializeToString() == in_memory.model.SerializeToString()
    _same_outputs(model, spilled.model)


@pytest.mark.parametrize("rows", [8, 1])
def test_parallel_layout_folds_its_output_order(rows):
    """Its parts pick their own inputs (a Gather each, of rows of x^T or of x's last axis): only the
    one Gather that restores the output order goes."""
    model = _sandwich(1, x_shape=(rows, 32))
    result = split_model(model, _config("parallel", x_shape=(rows, 32)))
    (chain,) = result.report.chains
    assert chain.layout == ("parallel-rows" if rows > 1 else "parallel")
    assert chain.folded == ["output order into 'fc2'"]
    assert chain.boundary_gathers == _gathers(result.model) == PARTS
    assert any(n.output[0] == "mm1" for n in result.model.graph.node)  # the split's output keeps its name
    _same_outputs(model, result.model, shape=(rows, 32))


def test_a_weight_read_elsewhere_too_is_copied_not_changed():
    model = _sandwich(2)
    # a second reader of fc0's weight, on a graph output of its own
    model.graph.node.append(helper.make_node("MatMul", ["x", "W0"], ["y2"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [8, WIDTH]))
    result = split_model(model, _config(x_shape=(8, 32)))
    assert result.report.chains[0].folded[0] == "input order into 'fc0'"
    np.testing.assert_array_equal(_init(result.model, "W0"), _init(model, "W0"))  # still what `other` reads
    fc0 = next(n for n in result.model.graph.node if n.name == "fc0")
    assert fc0.input[1] != "W0" and fc0.input[1].startswith("W0/onnx_split_order")
    _same_outputs(model, result.model)


def test_a_three_dimensional_activation_folds_through_the_flatten():
    model = _sandwich(3, x_shape=(2, 4, 32))
    result = split_model(model, _config(x_shape=(2, 4, 32)))
    assert result.report.chains[0].folded == ["input order into 'fc0'", "output order into 'fc2'"]
    assert _gathers(result.model) == 0
    _same_outputs(model, result.model, shape=(2, 4, 32))


def test_gemm_neighbours_with_transposed_weights():
    """The digits MLP's form: three Gemms with transB=1 and their own bias."""
    rng = np.random.default_rng(4)
    middle, _ = planted(rng, WIDTH, WIDTH, PARTS)
    weights = [(rng.standard_normal((32, WIDTH)) / 6).astype(np.float32), middle,
               (rng.standard_normal((WIDTH, 10)) / 8).astype(np.float32)]
    nodes, inits, h = [], [], "x"
    for i, w in enumerate(weights):
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(w.shape[1]).astype(np.float32), f"b{i}")]
        out = "y" if i == 2 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [h, f"W{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            h = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = split_model(model, _config(x_shape=(8, 32)))
    assert result.report.chains[0].folded == ["input order into 'fc0'", "output order into 'fc2'"]
    assert _gathers(result.model) == 0
    _same_outputs(model, result.model)


def test_no_fold_where_the_way_is_read_or_the_parts_are_padded():
    # the tensor between fc0 and fc1 is a graph output: no link, fc0 stays as it is
    model = _sandwich(5, output_between=0)
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.FLOAT
    result = split_model(model, _config(x_shape=(8, 32)))
    assert result.report.chains[0].folded == ["output order into 'fc2'"]
    np.testing.assert_array_equal(_init(result.model, "W0"), _init(model, "W0"))
    _same_outputs(model, result.model)
    # 3 parts of 64 are padded to 22 rows each: the batched Gathers read some inputs twice (kept)
    model = _sandwich(6, parts=3)
    result = split_model(model, _config(x_shape=(8, 32)))
    assert result.report.chains[0].parts == 3
    assert result.report.chains[0].folded == [] and _gathers(result.model) == 2
    _same_outputs(model, result.model)


def test_cli_no_fold(tmp_path, capsys):
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_sandwich(7), source)
    assert main([str(source), str(out), "--layout", "batched", "--min-elements", "0", "--no-bench"]) == 0
    assert "(folded: input order into 'fc0', output order into 'fc2')" in capsys.readouterr().out
    assert _gathers(onnx.load(out)) == 0
    assert main([str(source), str(out), "--layout", "batched", "--min-elements", "0", "--no-bench", "--force",
                 "--no-fold"]) == 0
    assert "folded" not in capsys.readouterr().out
    assert _gathers(onnx.load(out)) == 2


def test_a_padded_output_order_is_not_folded():
    """Output parts of 22/22/20 of 64, the smaller last: the batched ordering Gather's indices are a
    permutation of the 64 outputs, but it reads 66 rows (3 parts padded to 22) and drops the padding."""
    rng = np.random.default_rng(0)
    sizes = [22, 22, 20]
    labels = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
    rows = rng.permutation(labels)
    rest = rng.permutation(np.concatenate([np.full(s - 1, i) for i, s in enumerate(sizes)]))
    cols = np.concatenate([[0, 1, 2], rest])  # parts ordered by first output: part 2 (20 outputs) last
    middle = np.zeros((WIDTH, WIDTH), np.float32)
    for p in range(3):
        r, c = np.flatnonzero(rows == p), np.flatnonzero(cols == p)
        middle[np.ix_(r, c)] = rng.standard_normal((r.size, c.size)) / 5
    dense = lambda k, n: (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    model = chain_model([dense(32, WIDTH), middle, dense(WIDTH, 10)],
                        [[feature_wise("Relu", rng)], [feature_wise("Relu", rng)]], (8, 32))
    result = split_model(model, _config(x_shape=(8, 32)))
    (chain,) = result.report.chains
    assert chain.parts == 3 and chain.folded == [] and _gathers(result.model) == 2
    onnx.checker.check_model(result.model, full_check=True)
    _same_outputs(model, result.model)


def test_nothing_is_folded_inside_a_subgraph_or_into_a_site_left_out():
    # inside an If branch a name may be bound outside it too: the branch's chain keeps its Gathers
    inner = _sandwich(8)
    branch = helper.make_graph(list(inner.graph.node), "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 10])],
                               list(inner.graph.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"], name="pass")], "else", [],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [8, 32])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=branch,
                                                else_branch=other)], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = split_model(model, SplitConfig(layout="batched", min_elements=0, bench=False, providers=("cpu",),
                                            input_shapes={"x": (8, 32), "cond": ()}))
    (chain,) = result.report.chains
    assert chain.scope != "main" and chain.folded == [] and chain.boundary_gathers == 2
    feeds = {"cond": np.array(True), "x": np.random.default_rng(5).standard_normal((8, 32)).astype(np.float32)}
    for optimization in ("disabled", "enabled"):
        np.testing.assert_allclose(ort_run(result.model, feeds, optimization)[0], ort_run(model, feeds, optimization)[0],
                                   rtol=1e-4, atol=1e-5)
    # a site --exclude leaves out keeps its weights byte for byte
    model = _sandwich(9)
    result = split_model(model, _config(x_shape=(8, 32), exclude=("fc0",)))
    assert result.report.chains[0].folded == ["output order into 'fc2'"]
    np.testing.assert_array_equal(_init(result.model, "W0"), _init(model, "W0"))
    _same_outputs(model, result.model)
