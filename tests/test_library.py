import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builders import matmul_model, planted
import onnx_split


def test_the_library_never_prints_even_when_probing_cuda():
    """Run in a fresh process so the CUDA probe (and ORT's C++ logging) happens inside the capture."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import numpy as np, onnx_split\n"
        "from builders import matmul_model, planted\n"
        "w, _ = planted(np.random.default_rng(0), 64, 64, 4)\n"
        "r = onnx_split.split_model(matmul_model(w, [2, 64]), onnx_split.SplitConfig(layout='parallel', min_elements=0, bench_seconds=0.05))\n"
        "assert r.report.verification_passed\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_split_model_takes_a_path_and_never_modifies_its_input(tmp_path):
    w, _ = planted(np.random.default_rng(1), 64, 64, 4)
    model = matmul_model(w, [2, 64])
    before = model.SerializeToString()
    result = onnx_split.split_model(model, onnx_split.SplitConfig(layout="parallel", min_elements=0, verify=False, bench=False))
    assert model.SerializeToString() == before and result.report.modified
    path = tmp_path / "m.onnx"
    path.write_bytes(before)
    from_path = onnx_split.split_model(str(path), onnx_split.SplitConfig(layout="parallel", min_elements=0, verify=False, bench=False))
    assert from_path.report.input == str(path)
    assert from_path.model.SerializeToString() == result.model.SerializeToString()


def test_bad_arguments_raise_the_library_error_type():
    with pytest.raises(onnx_split.InputError, match="ModelProto or a path"):
        onnx_split.split_model(42)
    with pytest.raises(onnx_split.OnnxSplitError, match="--layout"):
        onnx_split.SplitConfig(layout="diagonal")


def test_report_json_round_trips():
    import json

    w, _ = planted(np.random.default_rng(2), 64, 64, 4)
    result = onnx_split.split_model(matmul_model(w, [2, 64]), onnx_split.SplitConfig(layout="parallel", min_elements=0, bench=False,
                                                                                     providers=("cpu",)))
    data = json.loads(result.report.to_json())
    assert data["sites"][0]["decision"] == "split" and data["modified"] is True
    assert data["config"]["layout"] == "parallel" and data["verification_passed"] is True


def test_a_tolerance_run_checks_that_the_original_loads_in_ort_once(tmp_path, monkeypatch):
    """The tuner's timing of the search's plans and the layout choice both need the original to
    load; the check (a child process loading the model at two optimization levels) runs once."""
    import onnx_split.pipeline as pipeline
    rng = np.random.default_rng(4)
    w, _ = planted(rng, 128, 128, 4)
    w = (w + 0.01 * rng.standard_normal(w.shape)).astype(np.float32)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((64, 128)).astype(np.float32))
    checked = []
    real = pipeline.loads_in_ort
    monkeypatch.setattr(pipeline, "loads_in_ort", lambda model, label="the model": checked.append(label) or real(model, label))
    result = onnx_split.split_model(matmul_model(w, ["batch", 128]), onnx_split.SplitConfig(
        tolerance=0.1, calibration=str(cal), min_elements=0, providers=("cpu",), tune_seconds=1, bench_seconds=0.2,
        batches=(8,)))
    assert result.report.sites and checked.count("the model") == 1
