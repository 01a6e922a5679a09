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
