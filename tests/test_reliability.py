"""Verification that cannot pass without checking, and bad input that reads as bad input (issue 10,
items 6-10 and 12-15): each test failed before its fix."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import gemm_model, matmul_model, planted
from onnx_split import SplitConfig, compare, split_model, verify_models
from onnx_split.cli import main
from onnx_split.errors import InputError, ModelLoadError
from onnx_split.inputs import make_feeds
from onnx_split.model_io import read_model
from onnx_split.runtime import CPU, CUDA, provider_status
from onnx_split.sites import find_sites

REPO = Path(__file__).resolve().parents[1]
FAST = ["--bench-seconds", "0.05", "--tune-seconds", "0.5"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _bad_input(code, out, err, match):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("onnx_split: error:"), err
    assert "internal error" not in err and "Traceback" not in err and match in lines[0], err


def _save(model, path):
    onnx.save_model(model, str(path))
    return path


# --- 6: small outputs -------------------------------------------------------------------------

def _tiny_blocks(scale, off_block):
    """Planted blocks of |w| in [1, 2) * scale and every other weight off_block (0: exact blocks)."""
    blocks, _ = planted(np.random.default_rng(1), 32, 32, 4)
    strong = np.sign(blocks) * (1.0 + np.abs(blocks))
    return (np.where(blocks != 0, strong, off_block) * scale).astype(np.float32)


def test_a_far_off_output_of_tiny_size_does_not_pass_under_the_default_atol():
    ref = np.random.default_rng(0).standard_normal(100).astype(np.float32) * 1e-8
    got = (ref * 1.79).astype(np.float32)  # 79% off, every element far below the fp32 atol 1e-6
    result = compare("y", ref, got)
    assert not result.passed and result.atol < 1e-6 and "scaled" in result.note
    assert compare("y", ref, got, atol=1e-6).passed  # an atol given explicitly is used as given
    # rounding stays relative to the output's size: a lossless result of the same size passes
    assert compare("y", ref, (ref.astype(np.float64) * (1 + 1e-6)).astype(np.float32)).passed


def test_weights_near_1e8_with_a_lossy_threshold_are_not_reported_passed(tmp_path, capsys):
    src = _save(matmul_model(_tiny_blocks(1e-8, 0.5), [2, 32]), tmp_path / "tiny.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", "--threshold", "6e-9", "--layout", "parallel",
                             "--no-bench", "--report", report)
    assert json.loads(report.read_text())["sites"][0]["decision"] == "split"
    assert code == 1 and "PASSED" not in stdout and "FAILED" in stdout and not out.exists(), stdout + err
    assert json.loads(report.read_text())["verification_passed"] is False


def test_a_lossless_split_of_tiny_weights_still_passes(tmp_path, capsys):
    src = _save(matmul_model(_tiny_blocks(1e-8, 0.0), [2, 32]), tmp_path / "tiny.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", "--layout", "parallel", "--no-bench")
    assert code == 0 and "FAILED" not in stdout and out.exists(), stdout + err
    assert stdout.count("PASSED") == 2


# --- 7: tolerances and the other float options ---------------------------------------------

@pytest.mark.parametrize("option,value", [
    ("--rtol", "inf"), ("--rtol", "nan"), ("--rtol", "-1e-4"), ("--atol", "inf"), ("--atol", "nan"),
    ("--atol", "-1"), ("--threshold", "inf"), ("--threshold", "nan"), ("--tolerance", "inf"),
    ("--bench-seconds", "inf"), ("--tune-seconds", "inf"), ("--min-speedup", "inf"), ("--min-speedup", "nan"),
    ("--keep", "nan"), ("--flops", "inf"), ("--holdout", "nan")])
def test_non_finite_or_negative_float_options_are_bad_input(tmp_path, capsys, option, value):
    src = _save(matmul_model(_tiny_blocks(1.0, 0.0), [2, 32]), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    _bad_input(*_run(capsys, src, out, "--min-elements", "0", f"{option}={value}"), f"{option} must be")
    assert not out.exists()


# --- 8: nothing compared is not verified; several input sets -------------------------------

@pytest.fixture
def blocks_model(tmp_path):
    w, _ = planted(np.random.default_rng(0), 64, 48, 4)
    return _save(matmul_model(w, ["batch", 64]), tmp_path / "blocks.onnx")


@pytest.mark.parametrize("case", ["all-NaN inputs", "zero-size dim"])
def test_a_verification_that_compared_nothing_is_not_verified(tmp_path, capsys, blocks_model, case):
    if case == "all-NaN inputs":
        np.savez(tmp_path / "nan.npz", x=np.full((4, 64), np.nan, np.float32))
        extra = ["--inputs", tmp_path / "nan.npz"]
    else:  # (--input-shape x:0,64 is refused before any work: test_cli)
        np.savez(tmp_path / "empty.npz", x=np.zeros((0, 64), np.float32))
        extra = ["--inputs", tmp_path / "empty.npz"]
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, blocks_model, out, "--min-elements", "0", "--layout", "parallel", "--no-bench",
                             "--report", report, *extra)
    assert code == 1 and "PASSED" not in stdout and "NOT VERIFIED" in stdout and not out.exists(), stdout + err
    data = json.loads(report.read_text())
    assert data["verification_passed"] is False
    assert {v["status"] for v in data["verification"] if v["provider"] == CPU} == {"not verified"}
    assert all(o["compared"] == 0 for v in data["verification"] for o in v["outputs"])
    code, _, err = _run(capsys, blocks_model, out, "--min-elements", "0", "--layout", "parallel", "--no-bench",
                        "--force", *extra)
    assert out.exists() and "anyway" in err


def test_verification_runs_on_three_seeded_input_sets_by_default(blocks_model):
    from onnx_split.inputs import feed_sets

    model = onnx.load(str(blocks_model))
    feeds, _ = make_feeds(model, {"x": (3, 64)}, seed=5)
    sets = feed_sets(model, feeds, seed=5)
    assert len(sets) == 3 and sets[0] is feeds
    assert all(s["x"].shape == (3, 64) for s in sets)
    assert not np.array_equal(sets[0]["x"], sets[1]["x"]) and not np.array_equal(sets[1]["x"], sets[2]["x"])
    np.testing.assert_array_equal(sets[2]["x"], make_feeds(model, {"x": (3, 64)}, seed=7)[0]["x"])
    result = split_model(model, SplitConfig(layout="parallel", min_elements=0, bench=False, providers=("cpu",)))
    assert "seeded random inputs (seeds 0, 1, 2; tuning and timing on seed 0)" in "; ".join(result.report.inputs)
    assert all(o.compared == 3 * 1 * 48 for v in result.report.verification for o in v.outputs)


def _sign_if_model(column: int = 0, always_true: bool = False):
    """y = If(sum(x[:, column]) > 0 [always_true: |..| >= 0]): x @ W (then) / x @ V (else); both split."""
    rng = np.random.default_rng(3)
    w, _ = planted(rng, 32, 32, 4)
    v, _ = planted(rng, 32, 32, 2)
    f = TensorProto.FLOAT
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_fc")], "then", [],
                               [helper.make_tensor_value_info("t", f, ["n", 32])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "V"], ["e"], name="else_fc")], "else", [],
                               [helper.make_tensor_value_info("e", f, ["n", 32])])
    nodes = [helper.make_node("Gather", ["x", "col"], ["c"], axis=1, name="pick"),
             helper.make_node("ReduceSum", ["c"], ["s"], keepdims=0, name="sum")]
    if always_true:
        nodes.append(helper.make_node("Abs", ["s"], ["s_abs"], name="abs"))
    nodes += [helper.make_node("GreaterOrEqual" if always_true else "Greater",
                               ["s_abs" if always_true else "s", "zero"], ["cond"], name="sign"),
              helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["n", 32])],
                          [helper.make_tensor_value_info("y", f, ["n", 32])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(v, "V"),
                           numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                           numpy_helper.from_array(np.array(column, np.int64), "col")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_rewritten_if_branch_no_input_set_takes_is_not_verified():
    probe = [make_feeds(_sign_if_model(), seed=s)[0]["x"] for s in range(3)]  # the default seeds' inputs
    column = next(j for j in range(32) if len({bool(x[:, j].sum() > 0) for x in probe}) == 2)
    model = _sign_if_model(column)  # a condition the three default seeds decide both ways
    config = SplitConfig(layout="parallel", min_elements=0, bench=False, providers=("cpu",))
    result = split_model(model, config)
    assert [s.decision for s in result.report.sites] == ["split", "split"]
    sets = [make_feeds(model, seed=s)[0] for s in range(3)]
    signs = [bool(f["x"][:, column].sum() > 0) for f in sets]
    assert result.report.verification_passed is True  # three sets: both branches ran
    one = [next(f for f, positive in zip(sets, signs) if not positive)]  # only the else branch
    entries = verify_models(model, result.model, one, providers=[CPU])
    assert [e.status for e in entries] == ["not verified", "not verified"]
    assert all(e.passed is False and "then_branch of If 'branch'" in e.detail for e in entries)


def test_an_if_branch_that_can_never_be_taken_fails_the_cli_unless_forced(tmp_path, capsys):
    src = _save(_sign_if_model(always_true=True), tmp_path / "if.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", "--layout", "parallel", "--no-bench",
                             "--report", report)
    assert code == 1 and "NOT VERIFIED" in stdout and "else_branch" in stdout and not out.exists(), stdout + err
    assert json.loads(report.read_text())["verification_passed"] is False


# --- 9: a provider asked for that does not run ----------------------------------------------

@pytest.mark.skipif(provider_status(CUDA) is None, reason="CUDA really runs here")
def test_providers_cuda_where_cuda_does_not_run_is_bad_input_unless_forced(tmp_path, capsys, blocks_model):
    out = tmp_path / "out.onnx"
    _bad_input(*_run(capsys, blocks_model, out, "--min-elements", "0", "--providers", "cuda", *FAST),
               "--providers cuda")
    assert not out.exists()
    code, stdout, err = _run(capsys, blocks_model, out, "--min-elements", "0", "--providers", "cpu,cuda",
                             "--layout", "parallel", "--force", *FAST)
    assert code == 0 and out.exists() and "UNAVAILABLE" in stdout, stdout + err


# --- 10: sequence and optional graph inputs -------------------------------------------------

def _non_tensor_input_model(kind: str):
    w, _ = planted(np.random.default_rng(4), 16, 16, 2)
    elem = helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 16])
    if kind == "sequence":
        typ, first = helper.make_sequence_type_proto(elem), helper.make_node("SequenceAt", ["s", "zero"], ["x"])
    else:
        typ, first = helper.make_optional_type_proto(elem), helper.make_node("OptionalGetElement", ["s"], ["x"])
    g = helper.make_graph([first, helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g",
                          [helper.make_value_info("s", typ)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0, np.int64), "zero")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize("kind", ["sequence", "optional"])
def test_a_sequence_or_optional_graph_input_is_a_clear_error(tmp_path, capsys, kind):
    src = _save(_non_tensor_input_model(kind), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", *FAST)
    _bad_input(code, stdout, err, f"graph input 's' is a{'n' if kind == 'optional' else ''} {kind}, not a tensor")
    assert "--no-verify --no-bench --layout parallel" in err and not out.exists()
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", "--no-verify", "--no-bench", "--layout",
                             "parallel")
    assert code == 0 and out.exists(), err


# --- 12: inputs too large to make -----------------------------------------------------------

@pytest.mark.parametrize("dims,extra,names", [
    ([10**12, 64], [], "--inputs"),
    (["batch", 64], ["--input-shape", "x:1000000000000,64"], "--input-shape x:1000000000000,64"),
])
def test_a_huge_input_shape_is_refused_before_allocating(tmp_path, capsys, dims, extra, names):
    w, _ = planted(np.random.default_rng(5), 64, 32, 4)
    src = _save(matmul_model(w, dims), tmp_path / "huge.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", *extra, *FAST)
    _bad_input(code, stdout, err, "over the 1 GiB limit")
    assert names in err and "--no-verify" in err and not out.exists()


def test_the_feed_size_limit_is_checked_on_the_whole_set(monkeypatch):
    import onnx_split.inputs as inputs

    model = matmul_model(np.ones((64, 8), np.float32), ["batch", 64])
    monkeypatch.setattr(inputs, "MAX_FEED_BYTES", 1024)
    assert make_feeds(model, {"x": (4, 64)})[0]["x"].nbytes == 1024
    with pytest.raises(InputError, match=r"--input-shape x:5,64 asks"):
        make_feeds(model, {"x": (5, 64)})


# --- 13: an npz with a huge unused member ---------------------------------------------------

def _npz_with_big_member(path: Path, arrays: dict, big_bytes: int) -> Path:
    """An .npz holding ``arrays`` and a member 'unused' of ``big_bytes`` zero bytes, written in chunks
    (a few hundred KB on disk)."""
    np.savez(path, **arrays)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("unused.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (big_bytes // 4,)}
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(1 << 20)
            for _ in range(big_bytes >> 20):
                f.write(chunk)
    return path


_RSS_PROBE = """
import json, resource, sys
import numpy as np, onnx
sys.path.insert(0, {tests!r})
from builders import matmul_model
from onnx_split.calibration import load_calibration
from onnx_split.errors import InputError
from onnx_split.inputs import make_feeds
model = matmul_model(np.eye(64, dtype=np.float32), ["batch", 64])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
feeds, _ = make_feeds(model, inputs_path=sys.argv[1])
try:
    load_calibration(sys.argv[1], model)
    calibration = "loaded"
except InputError as exc:
    calibration = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grew_kb": after - before, "x_sum": float(feeds["x"].sum()), "calibration": calibration}}))
"""


def test_an_npz_member_the_model_does_not_need_is_never_decompressed(tmp_path):
    x = np.arange(8 * 64, dtype=np.float32).reshape(8, 64)
    big = 300 << 20
    path = _npz_with_big_member(tmp_path / "in.npz", {"x": x}, big)
    assert path.stat().st_size < 5 << 20
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE.format(tests=str(REPO / "tests")), str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["x_sum"] == float(x.sum())  # --inputs reads x and ignores the rest, as before
    assert "not graph inputs: unused" in result["calibration"]  # --calibration refuses extras, as before
    assert result["grew_kb"] * 1024 < big / 4, result  # the 300 MB member was not decompressed


def test_a_missing_array_still_lists_every_member(tmp_path, blocks_model):
    path = tmp_path / "in.npz"
    np.savez(path, y=np.zeros((4, 64), np.float32), z=np.zeros(3))
    with pytest.raises(InputError, match=r"has no array named 'x' \(it has: y, z\)"):
        make_feeds(onnx.load(str(blocks_model)), inputs_path=str(path))


# --- 14: invalid shapes in the input model ---------------------------------------------------

def _gemm_3d_weight():
    model = gemm_model(np.ones((8, 6), np.float32), 2)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((8, 6, 2), np.float32), "B"))
    return model


def _huge_value_info():
    w, _ = planted(np.random.default_rng(6), 64, 32, 4)
    model = matmul_model(w, [2, 64])
    model.graph.node[0].output[0] = "h"
    model.graph.node.append(helper.make_node("Relu", ["h"], ["y"], name="relu"))
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [10**15, 32]))
    return model


@pytest.mark.parametrize("build,match", [(_gemm_3d_weight, "rank 2 but has rank 3"),
                                         (_huge_value_info, "differ in dimension 0: (2) vs (1000000000000000)")])
def test_a_model_whose_shapes_do_not_agree_is_bad_input(tmp_path, capsys, build, match):
    src = _save(build(), tmp_path / "bad.onnx")
    with pytest.raises(ModelLoadError, match=None) as info:
        read_model(src)
    assert match in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", *FAST)
    _bad_input(code, stdout, err, "shapes or types do not agree")
    assert not out.exists()


def test_every_shipped_model_passes_the_shape_check():
    shipped = sorted((REPO / "models").glob("*.onnx"))
    assert shipped
    for path in shipped:
        read_model(path)


# --- 15: quantized weights ------------------------------------------------------------------

def _quantized_model(kind: str):
    rng = np.random.default_rng(7)
    k, n = 64, 64
    q = rng.integers(-8 if kind == "int4" else -127, 8 if kind == "int4" else 127, size=(k, n))
    f = TensorProto.FLOAT
    opset = {"int4": 21, "int8-19": 19}.get(kind, 17)  # onnx's evaluator folds DequantizeLinear from 19 on
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "scale")
    if kind == "cast":
        inits = [numpy_helper.from_array(q.astype(np.int8), "Wq"), scale]
        nodes = [helper.make_node("Cast", ["Wq"], ["Wf"], to=f, name="cast"),
                 helper.make_node("Mul", ["Wf", "scale"], ["W"], name="rescale")]
    else:
        elem = TensorProto.INT4 if kind == "int4" else TensorProto.INT8  # int8: opset 17 or 19
        wq = helper.make_tensor("Wq", elem, [k, n], q.reshape(-1).tolist())
        zero = helper.make_tensor("zp", elem, [], [0])
        inits = [wq, scale, zero]
        nodes = [helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["W"], name="dq")]
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["batch", k])],
                          [helper.make_tensor_value_info("y", f, ["batch", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if kind == "int4" else 8)


@pytest.mark.parametrize("kind", ["int8", "int8-19", "int4", "cast"])
def test_a_quantized_weight_is_kept_with_the_reason(kind):
    (site,) = find_sites(_quantized_model(kind), min_elements=0)
    assert site.reason is not None and site.reason.startswith("weight is quantized"), site.reason
    assert site.shape == (None if kind == "int8" else (64, 64))  # opset 17: not folded, still quantized


def test_a_quantized_weight_through_the_cli_is_kept_and_the_model_written_unchanged(tmp_path, capsys):
    src = _save(_quantized_model("int8"), tmp_path / "q.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", "--layout", "parallel", "--no-bench")
    assert code == 0 and "kept: weight is quantized (it comes from DequantizeLinear node 'dq')" in stdout, err
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["DequantizeLinear", "MatMul"]


def test_a_float_weight_through_a_non_quantizing_chain_is_still_split():
    w, _ = planted(np.random.default_rng(8), 32, 32, 4)
    model = matmul_model(w.astype(np.float16).astype(np.float32), [2, 32])
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), "W16"))
    model.graph.node.insert(0, helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT, name="up"))
    (site,) = find_sites(model, min_elements=0)
    assert site.reason is None


def test_an_initializer_of_an_undefined_data_type_is_bad_input(tmp_path, capsys):
    """Found by tools/fuzz.py: onnx's checker (without full_check) lets data type 99 through, and
    reading the weight was an internal error (KeyError: 99)."""
    model = matmul_model(_tiny_blocks(1.0, 0.0), [2, 32])
    model.graph.initializer[0].data_type = 99
    src = _save(model, tmp_path / "dt.onnx")
    out = tmp_path / "out.onnx"
    _bad_input(*_run(capsys, src, out, "--min-elements", "0", "--layout", "parallel", "--no-bench"),
               "tensor 'W' has data type 99")
    assert not out.exists()


def test_a_name_that_is_not_utf8_is_bad_input(tmp_path, capsys):
    """Found by tools/fuzz.py: a flipped byte in the graph's name passed onnx's checker, then copying
    the model raised an internal UnicodeDecodeError."""
    model = matmul_model(_tiny_blocks(1.0, 0.0), [2, 32])
    model.graph.name = "Qgraph"
    src = tmp_path / "utf8.onnx"
    src.write_bytes(model.SerializeToString().replace(b"Qgraph", b"\xe7graph"))
    out = tmp_path / "out.onnx"
    _bad_input(*_run(capsys, src, out, "--min-elements", "0", "--layout", "parallel", "--no-bench"),
               "not valid UTF-8")
    assert not out.exists()


def test_a_weight_holding_a_signalling_nan_is_kept_and_prints_no_warning(tmp_path, capsys):
    """Found by tools/fuzz.py: a flipped bit made a signalling NaN in a weight; the lossy scores then
    printed a numpy RuntimeWarning (a second stderr line) and the split dropped the NaN."""
    w = _tiny_blocks(1.0, 0.0)
    w[3, 5] = np.array([0x7F800001], np.uint32).view(np.float32)[0]
    src = _save(matmul_model(w, ["batch", 32]), tmp_path / "nan.onnx")
    (site,) = find_sites(onnx.load(str(src)))
    assert site.reason.startswith("weight holds NaN or infinite values")
    out = tmp_path / "out.onnx"
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", "--layout", "parallel", "--no-bench",
                             "--parts", "2")
    assert code == 0 and err == "" and "kept: weight holds NaN" in stdout, err


def test_a_model_without_graph_outputs_is_bad_input(tmp_path, capsys):
    """Found by tools/fuzz.py: a graph with its outputs removed passes onnx's checker, then
    verification compared nothing and ended "NOT VERIFIED" (exit 1) instead of bad input."""
    model = matmul_model(_tiny_blocks(1.0, 0.0), [2, 32])
    del model.graph.output[:]
    src = _save(model, tmp_path / "no_out.onnx")
    out = tmp_path / "out.onnx"
    _bad_input(*_run(capsys, src, out, "--min-elements", "0", "--layout", "parallel", "--no-bench"), "no outputs")
    assert not out.exists()
