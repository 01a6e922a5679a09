"""Dynamic block skipping: the plan's selection, the compiled kernel, the portable form, and the
reference they are verified against, each checked against numpy computed here independently."""
from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import gemm_model, matmul_model
from onnx_split import kernel
from onnx_split.chains import Chain
from onnx_split.dynamic_reference import reference_model
from onnx_split.plans.dynamic import make_plan
from onnx_split.rewrite import Job, rewrite_model
from onnx_split.sites import find_sites

MODELS = Path(__file__).resolve().parents[1] / "models"
HAS_KERNEL = kernel.kernel_library() is not None
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason=f"{kernel.kernel_absence()}")
FORMS = [pytest.param("dynamic-kernel", marks=needs_kernel), "dynamic-portable"]


def session(model: onnx.ModelProto, optimization: str = "enabled", library: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimization == "disabled"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.intra_op_num_threads = 1
    if library and HAS_KERNEL:
        so.register_custom_ops_library(kernel.kernel_library())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def numpy_dynamic(x: np.ndarray, w: np.ndarray, block: int, rule: str, keep_blocks: int, threshold: float,
                  use_w: bool = True, fill: np.ndarray | None = None) -> np.ndarray:
    """The dynamic product computed here from its definition, in float64 (``fill``: what a skipped
    block's features count as, --dynamic-compensate; else zero)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    k = w.shape[0]
    n_blocks = math.ceil(k / block)
    rows = x64.reshape(-1, k)
    scores = []
    for b in range(n_blocks):
        s = math.sqrt(float((rows[:, b * block:(b + 1) * block] ** 2).sum()) / max(1, rows.shape[0]))
        if use_w:
            s *= float(np.float32(np.linalg.norm(w64[b * block:(b + 1) * block])))
        scores.append(s)
    order = sorted(range(n_blocks), key=lambda b: (-scores[b], b))
    kept = order[:keep_blocks] if rule == "topk" else [b for b in range(n_blocks) if scores[b] > threshold]
    mask = np.zeros(k)
    for b in kept:
        mask[b * block:(b + 1) * block] = 1.0
    if fill is not None:
        return (x64 * mask + np.asarray(fill, np.float64) * (1 - mask)) @ w64
    return (x64 * mask) @ w64


def kernel_model(w: np.ndarray, block: int, rule: int, keep: int, threshold: float, scales, bias=None, rank=2):
    k, n = w.shape
    inputs = ["x", "W", "S"] + (["b"] if bias is not None else [])
    node = helper.make_node("DynamicBlockMatMul", inputs, ["y"], domain="onnx_split", block=block, rule=rule,
                            keep=keep, threshold=threshold)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.asarray(scales, np.float32), "S")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
    dims = ["a", "M", k][-rank:] if rank > 1 else [k]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnx_split", 1)],
                             ir_version=8)


@needs_kernel
@pytest.mark.parametrize("plain", [False, True], ids=["dispatched", "plain-C"])
@pytest.mark.parametrize("k,n,block", [(37, 11, 8), (64, 33, 16), (130, 7, 32), (96, 128, 4),
                                       (200, 2500, 8),  # several column panels and row chunks, a column tail
                                       (72, 40, 16)])  # one 24-column tile, then one of 16
@pytest.mark.parametrize("batch", [0, 1, 3, 6, 17])
def test_kernel_equals_numpy_on_odd_shapes(k, n, block, batch, plain, monkeypatch, tmp_path):
    rng = np.random.default_rng(k * 1000 + n + batch)
    w = rng.standard_normal((k, n)).astype(np.float32)
    n_blocks = math.ceil(k / block)
    scales = np.array([np.linalg.norm(w[b * block:(b + 1) * block].astype(np.float64)) for b in range(n_blocks)],
                      np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    keep = max(1, n_blocks // 2)
    if plain:
        _check_in_child(tmp_path, k, n, block, batch)
        return
    got = session(kernel_model(w, block, 0, keep, 0.0, scales, bias)).run(None, {"x": x})[0]
    want = numpy_dynamic(x, w, block, "topk", keep, 0.0) + bias
    assert got.shape == (batch, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _check_in_child(tmp_path, k, n, block, batch):
    """The plain C path (ONNX_SPLIT_KERNEL_PLAIN picks it when the library loads): in a child process,
    since the row kernel is chosen once per process."""
    import os
    import subprocess
    import sys
    script = tmp_path / "plain.py"
    script.write_text(
        "import sys, numpy as np\n"
        "sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import test_dynamic as t\n"
        "from onnx_split import kernel\n"
        "assert kernel.kernel_path() == 'plain C', kernel.kernel_path()\n"
        f"k, n, block, batch = {k}, {n}, {block}, {batch}\n"
        "rng = np.random.default_rng(5)\n"
        "w = rng.standard_normal((k, n)).astype(np.float32)\n"
        "x = rng.standard_normal((batch, k)).astype(np.float32)\n"
        "nb = -(-k // block)\n"
        "got = t.session(t.kernel_model(w, block, 0, max(1, nb // 2), 0.0, np.ones(nb))).run(None, {'x': x})[0]\n"
        "np.testing.assert_allclose(got, t.numpy_dynamic(x, w, block, 'topk', max(1, nb // 2), 0.0, False),"
        " rtol=1e-5, atol=1e-5)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ONNX_SPLIT_KERNEL_PLAIN="1")
    done = subprocess.run([sys.executable, str(script), os.path.join(root, "tests"), root], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@needs_kernel
def test_kernel_threshold_rule_3d_input_and_no_bias():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 20)).astype(np.float32)
    x = rng.standard_normal((2, 5, 48)).astype(np.float32)
    scores = [np.linalg.norm(x[..., b * 8:(b + 1) * 8]) / np.sqrt(10) for b in range(6)]
    threshold = float(np.median(scores))
    got = session(kernel_model(w, 8, 1, 0, threshold, np.ones(6), rank=3)).run(None, {"x": x})[0]
    want = numpy_dynamic(x, w, 8, "threshold", 0, threshold, use_w=False).reshape(2, 5, 20)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_is_thread_safe_under_concurrent_runs():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((256, 96)).astype(np.float32)
    s = session(kernel_model(w, 16, 0, 5, 0.0, np.ones(16)))
    inputs = [rng.standard_normal((int(rng.integers(1, 6)), 256)).astype(np.float32) for _ in range(48)]
    wants = [numpy_dynamic(x, w, 16, "topk", 5, 0.0, use_w=False) for x in inputs]
    errors = []

    def work(offset):
        for j in range(60):
            i = (offset * 7 + j) % len(inputs)
            got = s.run(None, {"x": inputs[i]})[0]
            if not np.allclose(got, wants[i], rtol=1e-5, atol=1e-5):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@needs_kernel
def test_kernel_refuses_float16_and_bad_shapes_with_a_reason():
    w = np.ones((16, 4), np.float16)
    node = helper.make_node("DynamicBlockMatMul", ["x", "W", "S"], ["y"], domain="onnx_split", block=8, rule=0,
                            keep=1, threshold=0.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.ones(2, np.float16), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnx_split", 1)],
                              ir_version=8)
    with pytest.raises(Exception, match="(?i)type"):
        session(model)
    bad = kernel_model(np.ones((16, 4), np.float32), 8, 0, 1, 0.0, np.ones(3))  # 3 scales for 2 blocks
    with pytest.raises(Exception, match="one value per block"):
        session(bad).run(None, {"x": np.ones((1, 16), np.float32)})


def test_without_the_library_a_kernel_model_fails_to_load_and_never_runs_dense():
    model = kernel_model(np.ones((16, 4), np.float32), 8, 0, 1, 0.0, np.ones(2))
    with pytest.raises(Exception, match="DynamicBlockMatMul.*not a registered"):
        session(model, library=False)


# -- the forms through the rewrite, against numpy and against the reference model -------------

def _site_model(kind: str, k: int, n: int, rng):
    w = rng.standard_normal((k, n)).astype(np.float32)
    if kind == "gemm":
        model = gemm_model(w, 4, trans_b=1, alpha=0.5, beta=2.0, c_shape=(n,), opset=17)
    else:
        model = matmul_model(w, ["batch", k], opset=17)
    return model, w


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rule", ["topk", "threshold"])
@pytest.mark.parametrize("kind", ["matmul", "gemm"])
@pytest.mark.parametrize("compensate", [False, True], ids=["", "compensated"])
def test_a_dynamic_site_equals_numpy_and_the_reference(form, rule, kind, compensate):
    rng = np.random.default_rng(11)
    model, w = _site_model(kind, 72, 30, rng)
    (site,) = find_sites(model, min_elements=0)
    name = site.activation
    samples = [(rng.standard_normal((4, 72)) + 0.5).astype(np.float32) for _ in range(8)]
    plan = make_plan(site.weight, block=16, keep=0.5, rule=rule, activations=samples, compensate=compensate)
    assert (plan.fill is not None) == compensate
    out = onnx.ModelProto()
    out.CopyFrom(model)
    (site_out,) = find_sites(out, min_elements=0)
    refused, _ = rewrite_model(out, [Job(Chain([site_out], []), plan, form)])
    assert not refused, refused
    onnx.checker.check_model(out, full_check=True)
    reference = reference_model(model, [site], {0: plan})
    dense = session(model)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((4, 72)).astype(np.float32)
        kept = plan.kept_blocks(x)
        assert 0 < kept.size < plan.n_blocks or rule == "threshold"
        want = numpy_dynamic(x, w, 16, rule, plan.keep_blocks, plan.threshold, fill=plan.fill)
        if kind == "gemm":
            c = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "c"))
            want = 0.5 * want + 2.0 * c
        for optimization in ("disabled", "enabled"):
            got = session(out, optimization).run(None, {name: x})[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            ref = session(reference, optimization).run(None, {name: x})[0]
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        assert not np.allclose(dense.run(None, {name: x})[0], want, rtol=1e-3)  # blocks were skipped


@pytest.mark.parametrize("form", FORMS)
def test_the_forms_count_what_they_write(form):
    rng = np.random.default_rng(12)
    model, _ = _site_model("matmul", 100, 8, rng)
    (site,) = find_sites(model, min_elements=0)
    plan = make_plan(site.weight, block=32, keep=0.5)
    refused, _ = rewrite_model(model, [Job(Chain([site], []), plan, form)])
    assert not refused
    ops = [n.op_type for n in model.graph.node]
    if form == "dynamic-kernel":
        assert ops == ["DynamicBlockMatMul"]
        assert any(o.domain == "onnx_split" for o in model.opset_import)
    else:
        assert ops.count("If") == plan.n_blocks == 4 and "MatMul" not in ops and "TopK" in ops
        weights = {t.name: t.dims for t in model.graph.initializer if len(t.dims) == 2}
        assert sorted(d[0] for d in weights.values()) == [4, 32, 32, 32]  # one initializer per block


# -- through the pass: split_model and the CLI ---------------------------------------------------

def _mlp(rng, k=256, h=384, n=64, ir_version=8):
    w1 = (rng.standard_normal((k, h)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((h, n)) / np.sqrt(h)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)


@pytest.mark.parametrize("form", [*FORMS, "dynamic-fallback"])
def test_split_model_writes_dynamic_sites_verified_against_the_masked_reference(form):
    from onnx_split import SplitConfig, split_model

    model = _mlp(np.random.default_rng(20), ir_version=10 if form == "dynamic-fallback" else 8)
    config = SplitConfig(dynamic_keep=0.5, dynamic_block=64, dynamic_form=form.split("-")[1], layout="parallel",
                         input_shapes={"x": (1, 256)}, bench=False)
    result = split_model(model, config)
    report = result.report
    assert [s.decision for s in report.sites] == ["split", "split"], [s.reason for s in report.sites]
    assert {s.layout for s in report.sites} == {form}
    assert report.verification_passed and report.verified_against.startswith("the original with the dynamic")
    assert report.error is not None and report.error.held_out > 0  # blocks were skipped on the samples
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert ("onnx_split.load" in meta) == (form != "dynamic-portable")
    assert ("standard ONNX" in meta.get("onnx_split.load", "")) == (form == "dynamic-fallback")
    # the written model computes the numpy definition, site after site
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    w2 = numpy_helper.to_array(model.graph.initializer[1])
    h = np.maximum(numpy_dynamic(x, w1, 64, "topk", 2, 0.0), 0).astype(np.float32)
    want = numpy_dynamic(h, w2, 64, "topk", 3, 0.0)
    for library in (True, False) if form == "dynamic-fallback" else (True,):
        got = session(result.model, library=library).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_tolerance_chooses_dynamic_sites_and_is_checked_on_held_out_data():
    from onnx_split import SplitConfig, split_model
    from onnx_split.dynamic import output_error

    config = SplitConfig(dynamic_keep=0.5, dynamic_block=32, tolerance=0.45, layout="parallel", bench=False,
                         calibration=str(MODELS / "digits_calibration.npz"))
    result = split_model(str(MODELS / "digits_mlp.onnx"), config)
    report = result.report
    split = [s for s in report.sites if s.decision == "split"]
    kept = [s for s in report.sites if s.decision == "kept"]
    assert split and kept and all("--tolerance 0.45" in s.reason for s in kept)
    assert report.error.search <= 0.45
    assert report.error.met == (report.error.held_out <= 0.45)
    assert report.verification_passed


@pytest.mark.parametrize("argv,message", [
    (["--dynamic-keep", "1.5"], "--dynamic-keep must be a fraction in (0, 1]"),
    (["--dynamic-keep", "0.5", "--parts", "4"], "does not combine with --parts"),
    (["--dynamic-keep", "0.5", "--dynamic-block", "0"], "--dynamic-block must be a whole number >= 1"),
    (["--dynamic-keep", "0.5", "--dynamic-compensate"], "--dynamic-compensate needs --calibration"),
])
def test_bad_dynamic_options_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    from onnx_split.cli import main

    code = main([str(MODELS / "mlp_blocks.onnx"), str(tmp_path / "out.onnx"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("rule,compensate", [("topk", False), ("threshold", False), ("topk", True)])
def test_the_fallback_form_runs_the_kernel_where_registered_and_its_function_elsewhere(rule, compensate):
    """One file for every runtime: ORT resolves the custom-domain node to the kernel when the library
    is registered, and inlines the model-local function (the portable form) when it is not."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((100, 24)).astype(np.float32)
    model = matmul_model(w, ["batch", 100], ir_version=10)
    model.ir_version = 10
    (site,) = find_sites(model, min_elements=0)
    samples = [(rng.standard_normal((1, 100)) + 1.0).astype(np.float32) for _ in range(10)]
    plan = make_plan(site.weight, block=16, keep=0.5, rule=rule, activations=samples, compensate=compensate)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    refused, _ = rewrite_model(out, [Job(Chain([find_sites(out, min_elements=0)[0]], []), plan, "dynamic-fallback")])
    assert not refused, refused
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["DynamicBlockMatMul"] and len(out.functions) == 1
    assert out.graph.node[0].overload == out.functions[0].overload
    assert sum(t.dims == [100, 24] for t in out.graph.initializer) == 1  # W stored once, read by both paths
    libraries = [False, True] if HAS_KERNEL else [False]
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((3, 100)).astype(np.float32)
        want = numpy_dynamic(x, w, 16, rule, plan.keep_blocks, plan.threshold, fill=plan.fill)
        for library in libraries:
            for optimization in ("disabled", "enabled"):
                got = session(out, optimization, library=library).run(None, {"x": x})[0]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_fallback_form_refuses_ir_below_10_with_the_reason():
    model, _ = _site_model("matmul", 64, 8, np.random.default_rng(14))
    (site,) = find_sites(model, min_elements=0)
    refused, _ = rewrite_model(model, [Job(Chain([site], []), make_plan(site.weight, block=16, keep=0.5),
                                           "dynamic-fallback")])
    assert refused == {0: "the dynamic-fallback form needs IR version >= 10 for one function per site "
                          "(this model has 8)"}


def test_thresholds_are_calibrated_in_order_so_every_site_keeps_its_fraction():
    """Each threshold is calibrated on the activations of the model whose upstream sites are already
    dynamic: on the search samples, every site of the byte LM's chain keeps the asked fraction of its
    blocks on average in the written (reference) model, downstream sites included."""
    from onnx_split import SplitConfig
    from onnx_split.dynamic import _activations, plan_dynamic
    from onnx_split.plans.dynamic import make_plan

    model = onnx.load(str(MODELS / "byte_lm.onnx"))
    sites = find_sites(model)
    config = SplitConfig(dynamic_keep=0.5, dynamic_block=32, dynamic_rule="threshold", layout="parallel",
                         bench=False, calibration=str(MODELS / "byte_lm_calibration.npz"))
    planning = plan_dynamic(model, sites, config)
    plans = {i: d.plan for i, d in planning.decisions.items() if getattr(d, "plan", None) is not None}
    assert len(plans) >= 2, planning.decisions
    written = reference_model(model, sites, plans)
    seen = _activations(written, sites, list(plans), planning.calibration, config)
    dense = _activations(model, sites, list(plans), planning.calibration, config)
    drift = []
    for i, plan in plans.items():
        kept = np.mean([plan.kept_blocks(x).size / plan.n_blocks for x in seen[i]])
        assert abs(kept - 0.5) <= 0.02, (sites[i].name, kept)
        # a threshold calibrated on the dense model's activations keeps another fraction downstream
        naive = make_plan(sites[i].weight, block=32, keep=0.5, rule="threshold", activations=dense[i])
        drift.append(abs(np.mean([naive.kept_blocks(x).size / naive.n_blocks for x in seen[i]]) - 0.5))
    assert drift[0] <= 0.02 and max(drift) > 0.05, drift


def test_skipped_means_are_the_means_over_the_calls_that_skipped_each_block():
    from onnx_split.plans.dynamic import skipped_means

    rng = np.random.default_rng(30)
    w = rng.standard_normal((40, 5)).astype(np.float32)
    calls = [(rng.standard_normal((2, 40)) * rng.gamma(0.5, 1.0, 40)).astype(np.float32) for _ in range(12)]
    plan = make_plan(w, block=16, keep=0.5)  # 3 blocks (the last one of 8 features), 2 kept per call
    fill = skipped_means(plan, calls)
    for b in range(3):
        rows = [x for x in calls if b not in plan.kept_blocks(x)]
        cols = slice(b * 16, min(40, (b + 1) * 16))
        want = np.concatenate(rows)[:, cols].mean(axis=0) if rows else np.zeros(len(range(40)[cols]))
        np.testing.assert_allclose(fill[cols], want, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_the_kernel_adds_each_skipped_blocks_row_of_c(batch, with_bias):
    rng = np.random.default_rng(31 + batch)
    k, n, block = 70, 9, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    fill = rng.standard_normal(k).astype(np.float32)
    plan = make_plan(w, block=block, keep=0.5)
    plan = dataclasses.replace(plan, fill=fill)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    model = kernel_model(w, block, 0, plan.keep_blocks, 0.0, plan.scales, bias)
    model.graph.node[0].input.extend(["C"] if with_bias else ["", "C"])
    model.graph.initializer.append(numpy_helper.from_array(plan.compensation(w), "C"))
    x = rng.standard_normal((batch, k)).astype(np.float32)
    got = session(model).run(None, {"x": x})[0]
    want = numpy_dynamic(x, w, block, "topk", plan.keep_blocks, 0.0, fill=fill) if batch else np.zeros((0, n))
    if with_bias:
        want = want + bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.zeros((2, n), np.float32), "C"))
    with pytest.raises(Exception, match=r"C must be \[blocks, N\] = \[5, 9\]"):
        session(model).run(None, {"x": rng.standard_normal((1, k)).astype(np.float32)})


def test_compensation_lowers_the_byte_lms_held_out_bits_per_byte():
    """--dynamic-compensate on the trained byte LM at half the blocks: bits per byte on test contexts
    training never saw fall, and the written model is verified against its compensated reference.
    (Its relative logit error barely moves: the mean contributions shift every logit alike, which the
    softmax ignores.)"""
    from onnx_split import SplitConfig, split_model

    test = np.load(MODELS / "byte_lm_test.npz")
    contexts, following = test["context"][:600], test["next"][:600]
    bits = {}
    for compensate in (False, True):
        config = SplitConfig(dynamic_keep=0.5, dynamic_block=32, dynamic_compensate=compensate, layout="parallel",
                             bench=False, calibration=str(MODELS / "byte_lm_calibration.npz"))
        result = split_model(str(MODELS / "byte_lm.onnx"), config)
        assert result.report.verification_passed
        split = [s for s in result.report.sites if s.decision == "split"]
        assert len(split) == 3 and all(("compensated" in s.reason) == compensate for s in split), \
            [s.reason for s in split]
        run = session(result.model)
        total = 0.0
        for c, nxt in zip(contexts, following):
            z = run.run(None, {"context": c[None]})[0][0].astype(np.float64)
            z -= z.max()
            total += math.log(np.exp(z).sum()) - z[nxt]
        bits[compensate] = total / len(contexts) / math.log(2)
    assert bits[True] < bits[False] - 0.02, bits
