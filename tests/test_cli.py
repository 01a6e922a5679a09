"""The CLI end to end, and every bad input: exit 2, one line, no traceback, no output, input intact."""
import hashlib
import os
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import gemm_model, matmul_model, planted
from onnx_split.cli import main

REPO = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def block_model(tmp_path):
    w, _ = planted(np.random.default_rng(0), 64, 48, 4)
    path = tmp_path / "in.onnx"
    onnx.save_model(matmul_model(w, ["batch", 64]), str(path))
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_in_a_subprocess_writes_model_and_report(tmp_path, block_model):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_split", str(block_model), str(out), "--min-elements", "0",
         "--bench-seconds", "0.1", "--input-shape", "x:4,64", "--report", str(report),
         "--layout", "parallel"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fc1" in proc.stdout and "split (parallel" in proc.stdout and "PASSED" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(f"wrote {out}")
    data = json.loads(report.read_text())
    (site,) = data["sites"]
    assert {k: site[k] for k in ("node", "op_type", "shape", "decision", "parts")} == {
        "node": "fc1", "op_type": "MatMul", "shape": [64, 48], "decision": "split", "parts": 4}
    assert site["flops_before"] == 2 * 64 * 48 and 0 < site["flops_after"] < site["flops_before"]
    assert "reason" in site
    ver = data["verification"]
    assert {(v["provider"], v["optimization"]) for v in ver} >= {("CPUExecutionProvider", "disabled"),
                                                                 ("CPUExecutionProvider", "enabled")}
    assert all("outputs" in v and "passed" in v for v in ver)
    lat = [e for e in data["latency"] if e["provider"] == "CPUExecutionProvider"]
    assert lat and lat[0]["original_ms"] > 0 and lat[0]["rewritten_ms"] > 0 and lat[0]["speedup"] > 0
    assert data["written"] is True and data["verification_passed"] is True
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("layout", ["parallel", "batched"])
def test_layout_option_and_progress_free_quiet_mode(tmp_path, block_model, capsys, layout):
    out = tmp_path / "o.onnx"
    code, stdout, err = _run(capsys, block_model, out, "--min-elements", "0", "--layout", layout, "--no-bench",
                             "--quiet")
    assert code == 0 and err == ""
    assert stdout.strip().splitlines() == [f"wrote {out}: 1 of 1 sites split, verified against the original"]
    matmuls = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == (4 if layout == "parallel" else 1)


def test_failed_verification_exits_1_and_writes_nothing_unless_forced(tmp_path, capsys):
    rng = np.random.default_rng(1)
    blocks, _ = planted(rng, 32, 32, 4)
    strong = np.sign(blocks) * (1.0 + np.abs(blocks))  # every in-block weight has |w| > 1
    w = np.where(blocks != 0, strong, 0.3).astype(np.float32)  # off-block weights: small but significant
    src = tmp_path / "dense.onnx"
    onnx.save_model(matmul_model(w, [2, 32]), str(src))
    out = tmp_path / "out.onnx"
    # a lossy threshold that drops the significant off-block weights must fail the default tolerance
    code, stdout, err = _run(capsys, src, out, "--min-elements", "0", "--threshold", "1.0", "--no-bench",
                             "--layout", "parallel")
    assert code == 1 and "FAILED" in stdout and "nothing written" in err and not out.exists()
    assert "dropping |w| <= 1 (--threshold) changed the outputs beyond --rtol/--atol" in err  # what to do
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, src, out, "--min-elements", "0", "--threshold", "1.0", "--no-bench", "--force",
                         "--layout", "parallel")
    assert code == 1 and "anyway" in err and out.exists()


def test_kept_sites_are_not_errors(tmp_path, capsys):
    """A weight that is a graph input, and an unsupported op form (3-D weight), are kept with reasons."""
    w, _ = planted(np.random.default_rng(2), 64, 64, 4)
    model = matmul_model(w, [2, 64])
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 64]))
    src = tmp_path / "in.onnx"
    onnx.save_model(model, str(src))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, _ = _run(capsys, src, out, "--min-elements", "0", "--no-bench", "--report", report)
    assert code == 0 and "kept: weight 'W' is a graph input" in stdout
    site = json.loads(report.read_text())["sites"][0]
    assert site["decision"] == "kept" and "graph input" in site["reason"]

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 6])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="bmm")], "g", [x], [y],
                          [numpy_helper.from_array(np.ones((2, 8, 6), np.float32), "W")])
    onnx.save_model(helper.make_model(g, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    code, stdout, _ = _run(capsys, src, out, "--min-elements", "0", "--no-bench")
    assert code == 0 and "only 2-D weights are split" in stdout


def _bad(tmp_path, capsys, argv, match, inputs=()):
    before = {p: _digest(p) for p in inputs}
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx_split: error:"), err
    assert "Traceback" not in err and match in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no output, no temp files
    assert {p: _digest(p) for p in inputs} == before


def test_missing_input(tmp_path, capsys):
    _bad(tmp_path, capsys, [tmp_path / "nope.onnx", tmp_path / "o.onnx"], "not found")


def test_not_onnx(tmp_path, capsys):
    src = tmp_path / "text.onnx"
    src.write_text("hello, I am a text file and not a model\n" * 10)
    _bad(tmp_path, capsys, [src, tmp_path / "o.onnx"], "not", [src])


def test_truncated(tmp_path, capsys, block_model):
    src = tmp_path / "cut.onnx"
    src.write_bytes(block_model.read_bytes()[:5000])
    _bad(tmp_path, capsys, [src, tmp_path / "o.onnx"], "not a valid ONNX model", [src, block_model])


def test_output_over_input_is_refused(tmp_path, capsys, block_model):
    _bad(tmp_path, capsys, [block_model, block_model, "--min-elements", "0"], "overwrite the input", [block_model])


def test_output_over_external_data_is_refused(tmp_path, capsys):
    w, _ = planted(np.random.default_rng(3), 64, 64, 4)
    src = tmp_path / "m.onnx"
    onnx.save_model(matmul_model(w, [2, 64]), str(src), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    _bad(tmp_path, capsys, [src, tmp_path / "m.data"], "overwrite the input", [src, tmp_path / "m.data"])


def test_missing_output_directory(tmp_path, capsys, block_model):
    _bad(tmp_path, capsys, [block_model, tmp_path / "no" / "o.onnx"], "output directory does not exist", [block_model])


def test_missing_report_directory_is_refused_before_anything_is_written(tmp_path, capsys, block_model):
    _bad(tmp_path, capsys, [block_model, tmp_path / "o.onnx", "--report", tmp_path / "no" / "r.json"],
         "--report directory does not exist", [block_model])


@pytest.mark.parametrize("argv,match", [
    (["--layout", "diagonal"], "invalid choice"),
    (["--max-parts", "0"], "--max-parts must be >= 1"),
    (["--threshold", "-1"], "--threshold must be >= 0"),
    (["--providers", "tpu"], "unknown provider"),
    (["--input-shape", "x"], "--input-shape wants name:d0,d1"),
    (["--input-shape", "nope:1,64"], "not a graph input"),
    (["--input-shape", "x:1,63"], "does not fit its shape"),
    (["--input-shape", "x:0,64"], "--input-shape x:0,64: every dim must be >= 1"),
    (["--inputs", "missing.npz"], "--inputs file not found"),
])
def test_bad_options(tmp_path, capsys, block_model, argv, match):
    _bad(tmp_path, capsys, [block_model, tmp_path / "o.onnx", *argv], match, [block_model])


@pytest.mark.parametrize("arrays,match", [
    ({"y": np.zeros((2, 64), np.float32)}, "has no array named 'x'"),
    ({"x": np.zeros((2, 64), np.float64)}, "has dtype float64"),
    ({"x": np.zeros((2, 3, 64), np.float32)}, "has shape [2, 3, 64]"),
])
def test_bad_npz_inputs(tmp_path, capsys, block_model, arrays, match):
    npz = tmp_path / "in.npz"
    np.savez(npz, **arrays)
    _bad(tmp_path, capsys, [block_model, tmp_path / "o.onnx", "--inputs", npz], match, [block_model, npz])


def test_real_inputs_from_npz(tmp_path, capsys, block_model):
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.random.default_rng(5).standard_normal((7, 64)).astype(np.float32))
    code, stdout, _ = _run(capsys, block_model, tmp_path / "o.onnx", "--min-elements", "0", "--no-bench",
                           "--inputs", npz)
    assert code == 0 and f"inputs from {npz}" in stdout


def test_gemm_model_through_the_cli(tmp_path, capsys):
    w, _ = planted(np.random.default_rng(6), 48, 40, 4)
    src = tmp_path / "g.onnx"
    onnx.save_model(gemm_model(w, 3, trans_b=1, alpha=0.25, beta=3.0, c_shape=(40,)), str(src))
    code, stdout, _ = _run(capsys, src, tmp_path / "o.onnx", "--min-elements", "0", "--no-bench", "--layout",
                           "batched")
    assert code == 0 and "split (batched)" in stdout


def test_installed_console_script(tmp_path, block_model):
    script = Path(sys.executable).parent / "onnx-split"
    if not script.exists():
        pytest.skip("onnx_split is not pip-installed in this environment (no onnx-split script)")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "onnx_split 0.1.0"
    proc = subprocess.run([str(script), str(block_model), str(tmp_path / "o.onnx"), "--min-elements", "0",
                           "--no-bench", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "o.onnx").exists(), proc.stderr


def test_an_html_path_over_the_input_the_output_or_the_report_names_which(tmp_path, capsys, block_model):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    _bad(tmp_path, capsys, [block_model, out, "--html", block_model], "overwrite the input", [block_model])
    _bad(tmp_path, capsys, [block_model, out, "--html", out], f"--html {out} is also the output model's path",
         [block_model])
    _bad(tmp_path, capsys, [block_model, out, "--report", report, "--html", report],
         f"--html {report} is also the --report path", [block_model])


def test_report_path_over_the_input_or_a_directory_is_refused(tmp_path, capsys, block_model):
    _bad(tmp_path, capsys, [block_model, tmp_path / "o.onnx", "--report", block_model], "overwrite the input",
         [block_model])
    _bad(tmp_path, capsys, [block_model, tmp_path / "o.onnx", "--report", tmp_path], "is a directory", [block_model])
    _bad(tmp_path, capsys, [block_model, tmp_path / "o.onnx", "--report", tmp_path / "o.onnx"],
         "output model's path", [block_model])


def test_absolute_external_data_location_is_a_load_error(tmp_path, capsys):
    w, _ = planted(np.random.default_rng(7), 64, 64, 4)
    src = tmp_path / "m.onnx"
    onnx.save_model(matmul_model(w, [2, 64]), str(src), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = str(tmp_path / "m.data")
    onnx.save_model(model, str(src))
    _bad(tmp_path, capsys, [src, tmp_path / "o.onnx"], "cannot read external data", [src, tmp_path / "m.data"])


def test_nan_timing_budget_is_refused(tmp_path, capsys, block_model):
    _bad(tmp_path, capsys, [block_model, tmp_path / "o.onnx", "--bench-seconds", "nan"], "--bench-seconds must be > 0",
         [block_model])


def _external_model(folder: Path, location: str, **entries) -> Path:
    """The 64x64 MatMul with its weight stored externally at ``location`` (entries set by hand)."""
    w, _ = planted(np.random.default_rng(8), 64, 64, 4)
    model = matmul_model(w, [2, 64])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), *entries.items()):
        tensor.external_data.add(key=key, value=str(value))
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _directory(folder):
    (folder / "weights").mkdir()
    return "weights", {}


def _fifo(folder):
    os.mkfifo(folder / "w.fifo")
    return "w.fifo", {}


def _short(folder):
    (folder / "w.bin").write_bytes(b"\0" * 1000)  # the tensor needs 64 * 64 * 4 bytes
    return "w.bin", {}


def _short_length(folder):
    (folder / "w.bin").write_bytes(b"\0" * 64 * 64 * 4)
    return "w.bin", {"length": 1000}


def _past_the_end(folder):
    (folder / "w.bin").write_bytes(b"\0" * 64 * 64 * 4)
    return "w.bin", {"offset": 4096, "length": 64 * 64 * 4}


def _link_to_dev_zero(folder):
    (folder / "w.bin").symlink_to("/dev/zero")
    return "w.bin", {}


@pytest.mark.parametrize("make,match", [
    (_directory, "location 'weights' is a directory, not a regular file"),
    (_fifo, "location 'w.fifo' is a FIFO (named pipe), not a regular file"),
    (lambda folder: ("w\0.bin", {}), "contains a NUL character"),
    (_short, "'w.bin' is shorter than the tensor: it needs bytes 0 to 16384, the file has 1000"),
    (_short_length, "its length 1000 is shorter than the tensor (16384 bytes"),
    (_past_the_end, "'w.bin' is shorter than the tensor: it needs bytes 4096 to 20480, the file has 16384"),
    (lambda folder: ("/dev/zero", {}), "location '/dev/zero' is an absolute path"),
    (_link_to_dev_zero, "location 'w.bin' is a symbolic link out of the model's folder"),
    (lambda folder: ("w.bin", {"offset": "-1"}), "its offset '-1' is not a whole number >= 0"),
], ids=["directory", "fifo", "nul", "short", "short-length", "past-the-end", "dev-zero", "link-out", "offset"])
def test_bad_external_data_gives_its_true_reason(tmp_path, capsys, make, match):
    folder = tmp_path / "model"
    folder.mkdir()
    location, entries = make(folder)
    src = _external_model(folder, location, **entries)
    _bad(folder, capsys, [src, tmp_path / "o.onnx"], match, [src])
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("outside", ["../secret.bin", "link.bin"])
def test_a_location_out_of_the_folder_does_not_tell_whether_the_file_exists(tmp_path, capsys, outside):
    folder = tmp_path / "model"
    folder.mkdir()
    if outside == "link.bin":
        (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    src = _external_model(folder, outside)
    messages = []
    for exists in (False, True):
        if exists:
            (tmp_path / "secret.bin").write_bytes(b"\0" * 64 * 64 * 4)
        code, _, err = _run(capsys, src, tmp_path / "o.onnx")
        assert code == 2 and "missing" not in err, err
        assert ("out of the model's folder" if outside == "link.bin" else "leaves the model's folder") in err
        messages.append(err)
    assert messages[0] == messages[1]


def test_the_report_file_gets_its_wrote_line_before_the_models(tmp_path, block_model, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, _ = _run(capsys, block_model, out, "--min-elements", "0", "--layout", "parallel", "--no-bench",
                           "--quiet", "--report", report)
    assert code == 0 and report.exists()
    assert stdout.strip().splitlines() == [f"wrote {report}",
                                           f"wrote {out}: 1 of 1 sites split, verified against the original"]
