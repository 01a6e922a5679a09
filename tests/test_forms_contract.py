"""The contract every registered rewrite form keeps, checked for every form in the registry (and
wrapped in a function call) on a few representative plans. A new form gets these tests by its
registry entry alone.

For each form x case: the full onnx checker passes; ONNX Runtime gives the original's outputs with
graph optimizations disabled and enabled; every new node carries its provenance (doc string, and
node metadata from IR 10 on); what the form cannot write it refuses with a reason, leaving the
model untouched; and running the pass again on its output changes nothing.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import chain_model, chained_blocks, feature_wise, gemm_model, if_model, matmul_model, ort_run, planted
from onnx_split import SplitConfig, split_model
from onnx_split.planning import exact_units, plan_exact
from onnx_split.rewrite import FORMS, LAYOUTS, Job, refusal, rewrite_model
from onnx_split.sites import find_sites, walk_graphs

CONFIG = SplitConfig(min_elements=0, layout="parallel", verify=False, bench=False)


def _ir10(model: onnx.ModelProto) -> onnx.ModelProto:
    model.ir_version = 10  # node metadata (provenance) exists from IR 10 on
    return model


def _matmul():
    w, _ = planted(np.random.default_rng(0), 48, 40, 4)
    return _ir10(matmul_model(w, ["batch", 48], ir_version=10)), {"x": (5, 48)}


def _matmul_3d():
    w, _ = planted(np.random.default_rng(1), 32, 24, 4)
    return _ir10(matmul_model(w, [2, "seq", 32], ir_version=10)), {"x": (2, 3, 32)}


def _gemm(trans_a: int, trans_b: int):
    def build():
        w, _ = planted(np.random.default_rng(2 + 2 * trans_a + trans_b), 32, 36, 4)
        model = gemm_model(w, 6, trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=2.0, c_shape=(36,))
        return _ir10(model), {"a": (32, 6) if trans_a else (6, 32)}
    return build


def _chain():
    rng = np.random.default_rng(5)
    weights = chained_blocks(rng, [32, 32, 32], 4)
    return _ir10(chain_model(weights, [[feature_wise("Relu", rng)]], ["N", 32], ir_version=10)), {"x": (3, 32)}


def _subgraph():
    w, _ = planted(np.random.default_rng(6), 24, 24, 3)
    return _ir10(if_model(w, 4, else_scale=2.0)), {"x": (4, 24), "cond": ()}


CASES = {"matmul": _matmul, "matmul 3-D": _matmul_3d, "gemm": _gemm(0, 0), "gemm transB": _gemm(0, 1),
         "gemm transA": _gemm(1, 0), "gemm transA transB": _gemm(1, 1), "chain": _chain, "subgraph": _subgraph}


def _feeds(model: onnx.ModelProto, shapes: dict, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    sets = []
    for cond in (True, False):  # both branches of the If case
        feeds = {}
        for name, shape in shapes.items():
            feeds[name] = np.array(cond) if name == "cond" else rng.standard_normal(shape).astype(np.float32)
        sets.append(feeds)
        if "cond" not in shapes:
            break
    return sets


def _rewritten(model: onnx.ModelProto, form: str, wrap: bool):
    """The model with every unit written in ``form``; the refusals, and the units."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    sites = find_sites(copy, min_elements=0)
    units = exact_units(sites, plan_exact(sites, CONFIG), CONFIG)
    assert units, "every case has something to split"
    jobs = [Job(u.chain, u.plan, form, LAYOUTS["function"] if wrap else None) for u in units]
    refused, _ = rewrite_model(copy, jobs)
    return copy, refused, units


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "function"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_form_keeps_the_contract(case, form, wrap):
    model, shapes = CASES[case]()
    before = {n.name for _, g in walk_graphs(model.graph) for n in g.node}
    out, refused, units = _rewritten(model, form, wrap)
    reasons = [refusal(form, u.chain, u.plan) for u in units]
    if any(reasons):
        # what a form cannot write, it refuses with a reason, and the site is left as it was
        assert set(refused) == {j for j, r in enumerate(reasons) if r}
        assert all(isinstance(refused[j], str) and refused[j] for j in refused)
        if len(refused) == len(units):
            assert out.SerializeToString() == model.SerializeToString()
            return
    assert not refused, refused
    onnx.checker.check_model(out, full_check=True)
    for feeds in _feeds(model, shapes):
        for optimization in ("disabled", "enabled"):
            (want,) = ort_run(model, feeds, optimization)
            (got,) = ort_run(out, feeds, optimization)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    new = [n for _, g in walk_graphs(out.graph) for n in g.node if n.name not in before]
    new += [n for f in out.functions for n in f.node]
    assert new
    for node in new:
        if node.op_type == "Constant" and node.domain == "":
            continue  # small constants of a function body
        assert node.doc_string.startswith("onnx_split "), node.name
        if node.domain != "onnx_split" or out.ir_version >= 10:
            meta = {p.key: p.value for p in node.metadata_props}
            assert meta.get("onnx_split.site") and meta.get("onnx_split.layout") == ("function" if wrap else form), \
                node.name
    again = split_model(out, CONFIG)
    assert not again.report.modified, [(s.node, s.reason) for s in again.report.sites]


def test_the_direct_parallel_form_refuses_transposed_activations_with_a_reason():
    model, _ = _gemm(1, 0)()
    sites = find_sites(model, min_elements=0)
    (unit,) = exact_units(sites, plan_exact(sites, CONFIG), CONFIG)
    assert "transA" in refusal("parallel", unit.chain, unit.plan)
    assert refusal("parallel-rows", unit.chain, unit.plan) is None


def test_a_form_refuses_plan_kinds_it_does_not_accept():
    model, _ = _matmul()
    sites = find_sites(model, min_elements=0)
    (unit,) = exact_units(sites, plan_exact(sites, CONFIG), CONFIG)

    class OtherPlan:
        kind = "factors"

    for form in FORMS:
        assert refusal(form, unit.chain, OtherPlan()) == f"the {form} form does not take factors plans"


def test_a_rerun_keeps_nodes_the_pass_wrote_with_the_reason():
    model, _ = _matmul()
    out = split_model(model, CONFIG).model
    report = split_model(out, CONFIG).report
    assert report.sites and not report.modified
    assert all(s.reason.startswith("written by onnx_split") for s in report.sites if s.op_type == "MatMul")


def _noisy():
    rng = np.random.default_rng(7)
    w, _ = planted(rng, 64, 48, 4)
    w = w + 0.05 * rng.standard_normal(w.shape).astype(np.float32)  # small weights outside the blocks
    return _ir10(matmul_model(w, ["batch", 64], ir_version=10)), {"x": (5, 64)}


LOSSY = {"metis parts": SplitConfig(min_elements=0, parts=4, verify=False, bench=False, layout="parallel"),
         "tiles": SplitConfig(min_elements=0, partitioner="tiles", tile=16, flops=0.3, verify=False, bench=False,
                              layout="parallel")}


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "function"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("budget", list(LOSSY))
def test_every_form_computes_an_approximating_plans_effective_weight(budget, form, wrap):
    """A lossy plan's rewrite equals the model with the plan's effective weight (not the original)."""
    from onnx_split.lossy import lossy_units, plan_lossy
    from onnx_split.pruned import reference_model, relative_error

    model, shapes = _noisy()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sites = find_sites(out, min_elements=0)
    lossy = plan_lossy(out, sites, LOSSY[budget])
    (unit,) = lossy_units(sites, lossy.decisions)
    assert unit.plan.approximates
    refused, _ = rewrite_model(out, [Job(unit.chain, unit.plan, form, LAYOUTS["function"] if wrap else None)])
    if unit.plan.kind not in FORMS[form].accepts:  # e.g. the dynamic forms: refused with the reason
        assert refused == {0: f"the {form} form does not take {unit.plan.kind} plans"}
        return
    assert not refused
    onnx.checker.check_model(out, full_check=True)
    (i,) = unit.sites
    reference = reference_model(model, find_sites(model, min_elements=0),
                                {i: unit.plan.effective_weight(0, sites[i].weight)})
    (feeds,) = _feeds(model, shapes)
    for optimization in ("disabled", "enabled"):
        (got,) = ort_run(out, feeds, optimization)
        np.testing.assert_allclose(got, ort_run(reference, feeds, optimization)[0], rtol=1e-4, atol=1e-5)
        assert relative_error([ort_run(model, feeds, optimization)[0]], [got]) > 1e-3  # it did drop weights


@pytest.mark.parametrize("ir_version", [8, 9])
def test_function_wrap_before_ir_10_names_one_op_per_site(ir_version):
    w1, _ = planted(np.random.default_rng(8), 32, 32, 4)
    model = matmul_model(w1, ["batch", 32], ir_version=ir_version)
    out, refused, _ = _rewritten(model, "parallel", True)
    assert not refused
    onnx.checker.check_model(out, full_check=True)
    (node,) = [n for n in out.graph.node if n.domain == "onnx_split"]
    assert node.op_type == "BlockMatMul_0" and not node.overload  # overloads need IR 10
    x = {"x": np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(out, x, "enabled")[0], ort_run(model, x)[0], rtol=1e-4, atol=1e-5)


def test_function_wrap_refuses_ir_below_8_with_the_reason():
    w, _ = planted(np.random.default_rng(9), 32, 32, 4)
    model = matmul_model(w, ["batch", 32], ir_version=7)
    out, refused, _ = _rewritten(model, "parallel", True)
    assert list(refused.values()) == ["the function layout needs IR version >= 8 (this model has 7)"]
    assert out.SerializeToString() == model.SerializeToString()
