"""``--factorize blocks`` (W ≈ B1·Π·B2, block-diagonal factors, Π the stride permutation) and
``--factorize lowrank`` (W ≈ U·V): the fits, and the two run-time MatMuls written for them,
verified against the model with each weight replaced by the factors' product."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import scipy.linalg

from builders import chain_model, feature_wise, ort_run
from onnx_split import SplitConfig, split_model
from onnx_split.cli import main
from onnx_split.errors import InputError
from onnx_split.factorize import fit_structured
from onnx_split.factorize.structured import DAMPING, _fit_output_block, blocks, lowrank, pair_rank, product
from onnx_split.factorize.sparse import layer_error

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _gram(k: int, rows: int = 600, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) @ (rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k))
    return x.T @ x


def _dense_factors(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B1 [K, M] and B2 [M, N] block-diagonal, and Π [M, M], built one entry at a time as the
    module describes them: hidden feature j of input block s goes to block j // r, position s·r + j % r."""
    g, kg, mg = first.shape
    r, ng = mg // g, second.shape[2]
    b1, b2 = scipy.linalg.block_diag(*first), scipy.linalg.block_diag(*second)
    perm = np.zeros((g * mg, g * mg))
    for s in range(g):
        for j in range(mg):
            perm[s * mg + j, (j // r) * mg + s * r + j % r] = 1.0
    return b1, perm, b2


def test_the_product_is_b1_times_the_stride_permutation_times_b2():
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((4, 6, 8)), rng.standard_normal((4, 8, 5))   # G=4, r=2
    b1, perm, b2 = _dense_factors(first, second)
    assert np.allclose(product(first, second), b1 @ perm @ b2)
    assert np.count_nonzero(product(first, second)) == 24 * 20   # every input block reaches every output block


def test_blocks_recover_a_weight_of_that_structure_and_lowrank_one_of_low_rank():
    rng = np.random.default_rng(2)
    k, n, g = 32, 24, 4
    gram = _gram(k)
    density = 2 * g * (k + n) / (k * n)          # r = 2 per block pair
    assert pair_rank((k, n), density, g) == 2
    structured = product(rng.standard_normal((g, k // g, 2 * g)), rng.standard_normal((g, 2 * g, n // g)))
    assert blocks(structured, gram, density, g).error(structured, gram) < 1e-3
    low = rng.standard_normal((k, 5)) @ rng.standard_normal((5, n))
    assert lowrank(low, gram, 5 * (k + n) / (k * n)).error(low, gram) < 1e-3
    # and each is worse on the other's structure at the same parameter count (neither is a superset)
    assert lowrank(structured, gram, density).error(structured, gram) > 0.05


def test_lowrank_is_the_optimum_of_the_layer_error():
    """||X(W − UV)|| / ||XW|| equals the discarded singular values of LᵀW (H = LLᵀ): the optimum."""
    rng = np.random.default_rng(3)
    w, gram = rng.standard_normal((40, 30)), _gram(40)
    found = lowrank(w, gram, 10 * 70 / 1200)
    assert found.rank == 10 and found.first.shape == (1, 40, 10) and found.second.shape == (1, 10, 30)
    damped = gram + (DAMPING * np.mean(np.diag(gram)) + 1e-12) * np.eye(40)
    s = np.linalg.svd(np.linalg.cholesky(damped).T @ w, compute_uv=False)
    optimum = np.sqrt(np.sum(s[10:] ** 2) / np.sum(s ** 2))
    assert found.error(w, damped) == pytest.approx(optimum, rel=1e-6)


def test_alternating_fit_improves_on_its_start_and_meets_the_budget():
    rng = np.random.default_rng(4)
    k, g, density = 64, 4, 0.5
    w, gram = rng.standard_normal((k, k)), _gram(k)
    found = blocks(w, gram, density, g)
    r = pair_rank((k, k), density, g)
    assert found.first.shape == (g, k // g, g * r) and found.second.shape == (g, g * r, k // g)
    assert found.params <= density * w.size and found.density == pytest.approx(found.params / w.size)
    start = blocks(w, gram, density, g, rounds=0)      # the pairs' whitened SVDs, Q refitted once
    assert found.error(w, gram) < start.error(w, gram)
    p, q = _fit_output_block(w[:, :16], gram, g, r, 0)
    assert len(p) == g and p[0].shape == (16, r) and q[0].shape == (r, 16)


@pytest.mark.parametrize("shape, density, groups, message", [
    ((30, 32), 0.5, 4, "divisible by 4"),
    ((32, 32), 0.01, 4, "density 0.01 is below"),
])
def test_refusals(shape, density, groups, message):
    with pytest.raises(ValueError, match=message):
        fit_structured("blocks", np.ones(shape), np.eye(shape[0]), density, groups)


def _mlp():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((48, 64)).astype(np.float32) / 7, rng.standard_normal((64, 30)).astype(np.float32) / 8]
    return chain_model(weights, [[feature_wise("Relu", rng)]], ["N", 48], ir_version=8), weights


def _calibration(tmp_path, n: int = 400):
    rng = np.random.default_rng(1)
    path = tmp_path / "cal.npz"
    np.savez(path, x=(rng.standard_normal((n, 48)) @ (rng.standard_normal((48, 48)) / 7 + np.eye(48))).astype(np.float32))
    return path


def _matmuls_of(model: onnx.ModelProto, site: str) -> int:
    return sum(n.op_type == "MatMul" and n.name.startswith(f"{site}/split/") for n in model.graph.node)


@pytest.mark.parametrize("method, layout", [("blocks", "batched"), ("lowrank", "parallel")])
def test_factor_forms_are_verified_reported_and_cheaper(tmp_path, method, layout):
    model, weights = _mlp()
    config = SplitConfig(factorize=method, density=0.5, calibration=str(_calibration(tmp_path)), min_elements=0,
                         bench=False, layout=layout, input_shapes={"x": (3, 48)})
    result = split_model(model, config)
    report = result.report
    by_name = {s.node: s for s in report.sites}
    split = [s for s in report.sites if s.decision == "split"]
    if method == "blocks":   # the 64x30 layer: 30 outputs do not split into 4 blocks
        assert [s.node for s in split] == ["fc0"]
        assert "divisible by 4" in by_name["fc1"].reason
    else:
        assert [s.node for s in split] == ["fc0", "fc1"]
    for s in split:
        facts = s.details["factorized"]
        k, n = s.shape
        assert facts["method"] == method and facts["blocks"] == (4 if method == "blocks" else 1)
        assert facts["density"] <= 0.5 and 0 < facts["error"] < 1 and 0 < facts["held_out"] < 1
        assert facts["bytes_after"] <= 0.5 * facts["bytes_before"]
        assert s.flops_after <= 0.5 * s.flops_before
        assert s.layout == "factor-parallel"        # the first form that takes block-factor plans
        assert _matmuls_of(result.model, s.node) == (2 if method == "lowrank" else 8)   # per block of each factor
    assert not any(n.op_type == "Gather" for n in result.model.graph.node)
    assert report.verified_against.startswith("the factorized original")
    assert {v.optimization for v in report.verification} == {"disabled", "enabled"}
    assert all(v.passed for v in report.verification)
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["onnx_split.factorize"].startswith(f"--factorize {method} --density 0.5")
    assert "two MatMuls" in meta["onnx_split.factorize"]
    assert result.model.ir_version == model.ir_version
    assert [o.version for o in result.model.opset_import] == [o.version for o in model.opset_import]


@pytest.mark.parametrize("opset", [11, 17, 18])
@pytest.mark.parametrize("batched", [True, False])
def test_both_forms_compute_the_product_on_3d_activations_and_gemm(batched, opset):
    """Either form, on a [B, T, K] activation (flattened and restored) and on a Gemm with transA,
    alpha and bias, equals x @ W' with W' the factors' product, at both ORT optimization levels."""
    from onnx_split.chains import Chain
    from onnx_split.plans.block_factor import make_block_plan
    from onnx_split.rewrite import Job, rewrite_model
    from onnx_split.sites import find_sites
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(6)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    fitted = blocks(w.astype(np.float64), _gram(48), 0.5, 4)
    assert fitted.rank == 2
    plan = make_block_plan(fitted, np.float32)
    want_w = product(fitted.first, fitted.second)
    x3 = rng.standard_normal((2, 3, 48)).astype(np.float32)
    matmul = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "T", 48])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "T", 40])], [numpy_helper.from_array(w, "W")]),
        opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    bias = rng.standard_normal(40).astype(np.float32)
    xt = rng.standard_normal((48, 5)).astype(np.float32)
    gemm = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gm", transA=1, transB=1, alpha=0.5, beta=2.0)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [48, "M"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["M", 40])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "W"), numpy_helper.from_array(bias, "C")]),
        opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    for model, x, want in ((matmul, x3, x3 @ want_w), (gemm, xt, 0.5 * xt.T @ want_w + 2.0 * bias)):
        site = find_sites(model, min_elements=0)[0]
        refused, _ = rewrite_model(model, [Job(Chain([site], []), plan, "factor-batched" if batched else "factor-parallel")])
        assert refused == {}
        onnx.checker.check_model(model, full_check=True)
        for level in ("disabled", "enabled"):
            (got,) = ort_run(model, {"x": x}, level)
            assert got.shape == want.shape and np.allclose(got, want, atol=1e-4)


def test_auto_layout_keeps_dense_where_the_factors_are_slower(tmp_path):
    """``--layout auto`` times the factor forms against the dense node: a site written is one that
    was measured faster, and a site kept says what was measured."""
    model, _ = _mlp()
    config = SplitConfig(factorize="lowrank", density=0.5, calibration=str(_calibration(tmp_path)), min_elements=0,
                         tune_seconds=0.5, input_shapes={"x": (1, 48)}, bench=False)
    report = split_model(model, config).report  # (no whole-model timing: a site split is one the tuner chose)
    assert report.tuning and all({"dense", "factor-batched", "factor-parallel"} <= set(t.times_ms) for t in report.tuning)
    for s in report.sites:
        assert s.decision == "split" or "kept dense" in s.reason


def test_cli_blocks_with_a_block_count(tmp_path, capsys):
    model, _ = _mlp()
    path, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, str(path))
    code = main([str(path), str(out), "--factorize", "blocks", "--blocks", "2", "--density", "0.5", "--min-elements",
                 "0", "--layout", "parallel", "--calibration", str(_calibration(tmp_path)), "--no-bench",
                 "--report", str(report)])
    text, _ = capsys.readouterr()
    assert code == 0, text
    assert "PASSED" in text and "FAILED" not in text
    data = json.loads(report.read_text())
    assert [s["details"]["factorized"]["blocks"] for s in data["sites"]] == [2, 2]
    assert "2 blocks x 2" in data["chains"][0]["label"]


def test_library_rejects_blocks_without_blocks_method():
    with pytest.raises(InputError, match="--blocks"):
        SplitConfig(factorize="dsf", density=0.5, blocks=4)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "function"])
@pytest.mark.parametrize("form", ["factor-batched", "factor-parallel"])
@pytest.mark.parametrize("case", ["matmul", "matmul 3-D", "gemm", "gemm transB", "gemm transA", "gemm transA transB",
                                  "subgraph"])
def test_factor_forms_keep_the_forms_contract(case, form, wrap):
    """The contract every form keeps (test_forms_contract.py), for block-factor plans: the written
    model passes the full checker, computes x @ W' (W' the plan's product) at both optimization
    levels, and every new node carries its provenance."""
    from test_forms_contract import CASES, _feeds

    from onnx_split.chains import Chain
    from onnx_split.plans.block_factor import make_block_plan
    from onnx_split.pruned import reference_model
    from onnx_split.rewrite import LAYOUTS, Job, rewrite_model
    from onnx_split.sites import find_sites, walk_graphs

    model, shapes = CASES[case]()
    before = {n.name for _, g in walk_graphs(model.graph) for n in g.node}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sites = find_sites(out, min_elements=0)
    plans = {}
    for i, site in enumerate(sites):
        w = site.weight.astype(np.float64)
        fitted = blocks(w, _gram(w.shape[0], seed=i), 0.5, 4) if i % 2 == 0 else lowrank(w, _gram(w.shape[0]), 0.5)
        plans[i] = make_block_plan(fitted, site.weight.dtype)
    jobs = [Job(Chain([sites[i]], []), plans[i], form, LAYOUTS["function"] if wrap else None) for i in plans]
    refused, _ = rewrite_model(out, jobs)
    assert refused == {}
    onnx.checker.check_model(out, full_check=True)
    reference = reference_model(model, find_sites(model, min_elements=0),
                                {i: p.effective_weight(0, sites[i].weight) for i, p in plans.items()}, {})
    for feeds in _feeds(model, shapes):
        for optimization in ("disabled", "enabled"):
            (want,) = ort_run(reference, feeds, optimization)
            (got,) = ort_run(out, feeds, optimization)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    new = [n for _, g in walk_graphs(out.graph) for n in g.node if n.name not in before]
    new += [n for f in out.functions for n in f.node]
    per_plan = [2 if form == "factor-batched" or p.groups == 1 else 2 * p.groups for p in plans.values()]
    assert sum(n.op_type == "MatMul" for n in new) == sum(per_plan)   # one per factor, or per block of each
    for node in new:
        if node.op_type == "Constant" and node.domain == "":
            continue
        assert node.doc_string.startswith("onnx_split "), node.name
        meta = {p.key: p.value for p in node.metadata_props}
        assert meta.get("onnx_split.site") and meta.get("onnx_split.layout") == ("function" if wrap else form)
