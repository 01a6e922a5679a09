"""The ``compressed`` form on factorized plans, on the rewrite contract's cases: the checker
passes, ONNX Runtime gives the model with W replaced by the factors' product (optimizations off
and on), the new nodes carry their provenance, a rerun changes nothing, and with optimizations on
ORT folds the decoder into one dense MatMul/Gemm."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders import matmul_model, ort_run
from test_forms_contract import CASES, CONFIG, _feeds
from onnx_split import split_model
from onnx_split.chains import Chain
from onnx_split.factorize import fit
from onnx_split.plans.factorized import make_plan
from onnx_split.pruned import reference_model
from onnx_split.rewrite import LAYOUTS, Job, refusal, rewrite_model
from onnx_split.rewrite.compressed import stored_bytes, written_bytes
from onnx_split.sites import find_sites, walk_graphs

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _plans(sites, method: str, density: float):
    plans = {}
    for i, site in enumerate(sites):
        if site.reason is None:
            k = site.weight.shape[0]
            fitted = fit(method, site.weight, np.eye(k) * 4.0 + 1.0, density)
            plans[i] = make_plan(fitted, site.weight.dtype)
    return plans


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "function"])
@pytest.mark.parametrize("method", ["dsf", "magnitude"])
@pytest.mark.parametrize("case", list(CASES))
def test_compressed_computes_the_product(case, method, wrap):
    model, shapes = CASES[case]()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sites = find_sites(out, min_elements=0)
    plans = _plans(sites, method, 0.3)
    assert plans
    jobs = [Job(Chain([sites[i]], []), plan, "compressed", LAYOUTS["function"] if wrap else None)
            for i, plan in plans.items()]
    assert all(refusal("compressed", j.chain, j.plan) is None for j in jobs)
    before = {n.name for _, g in walk_graphs(model.graph) for n in g.node}
    refused, _ = rewrite_model(out, jobs)
    assert not refused, refused
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == model.ir_version
    assert [o for o in out.opset_import if o.domain == ""] == [o for o in model.opset_import if o.domain == ""]
    reference = reference_model(model, find_sites(model, min_elements=0),
                                {i: p.effective_weight(0, sites[i].weight) for i, p in plans.items()})
    for feeds in _feeds(model, shapes):
        for optimization in ("disabled", "enabled"):
            (want,) = ort_run(reference, feeds, optimization)
            (got,) = ort_run(out, feeds, optimization)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    new = [n for _, g in walk_graphs(out.graph) for n in g.node if n.name not in before]
    new += [n for f in out.functions for n in f.node]
    for node in new:
        if node.op_type == "Constant" and node.domain == "":
            continue
        assert node.doc_string.startswith("onnx_split "), node.name
    assert not split_model(out, CONFIG).report.modified


def test_refuses_chains_and_integer_weights_with_a_reason():
    model, _ = CASES["matmul"]()
    sites = find_sites(model, min_elements=0)
    (i, plan), = _plans(sites, "magnitude", 0.5).items()
    assert refusal("compressed", Chain([sites[i], sites[i]], []), plan) == "factorized plans are made per site"


def test_ort_folds_the_decoder_into_one_matmul(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 96)).astype(np.float32)
    model = matmul_model(w, ["batch", 128], ir_version=8)
    sites = find_sites(model, min_elements=0)
    plans = _plans(sites, "dsf", 0.5)
    (plan,) = plans.values()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    assert not rewrite_model(out, [Job(Chain([sites[0]], []), plan, "compressed")])[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]
    assert out.ByteSize() < 0.6 * model.ByteSize()
    assert written_bytes(plan) == sum(stored_bytes(f) for f in plan.factors)
