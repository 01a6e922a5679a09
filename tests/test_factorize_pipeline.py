"""``--factorize`` end to end: every site fitted in order on calibration data, written
compressed, verified against the model with each weight replaced by its factors' product, the
report and metadata saying what was done; CLI errors are one line."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest

from builders import chain_model, feature_wise, ort_run
from onnx_split import SplitConfig, split_model
from onnx_split.cli import main
from onnx_split.errors import InputError

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _mlp():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((48, 64)).astype(np.float32) / 7, rng.standard_normal((64, 32)).astype(np.float32) / 8]
    model = chain_model(weights, [[feature_wise("Relu", rng)]], ["N", 48], ir_version=8)
    return model, weights


def _calibration(tmp_path, n: int = 400):
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((48, 48)) / 7 + np.eye(48)
    path = tmp_path / "cal.npz"
    np.savez(path, x=(rng.standard_normal((n, 48)) @ mix).astype(np.float32))
    return path


@pytest.mark.parametrize("method", ["dsf", "sparsegpt"])
def test_factorized_model_is_verified_smaller_and_reported(tmp_path, method, capsys, caplog):
    model, weights = _mlp()
    config = SplitConfig(factorize=method, density=0.4, calibration=str(_calibration(tmp_path)), min_elements=0,
                         bench=False, input_shapes={"x": (3, 48)})
    with caplog.at_level(logging.INFO, logger="onnx_split"):
        result = split_model(model, config)
    assert capsys.readouterr() == ("", "")  # the library logs, never prints
    assert any("factorized" in r.getMessage() for r in caplog.records)
    report = result.report
    split = [s for s in report.sites if s.decision == "split"]
    assert len(split) == 2 and all(s.layout == "compressed" for s in split)
    for s, w in zip(split, weights):
        facts = s.details["factorized"]
        assert facts["method"] == method and facts["density"] == 0.4
        assert facts["nonzeros"] == int(0.4 * w.size)
        assert 0 < facts["error"] < 1 and 0 < facts["held_out"] < 1
        assert facts["bytes_before"] == w.nbytes and facts["bytes_after"] < 0.6 * w.nbytes
    assert len(split[0].details["factorized"]["factors"]) == (2 if method == "dsf" else 1)
    assert report.verified_against.startswith("the factorized original")
    assert {v.optimization for v in report.verification} == {"disabled", "enabled"}
    assert all(v.passed for v in report.verification)
    assert report.error is not None and 0 < report.error.held_out < 0.5
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["onnx_split.factorize"].startswith(f"--factorize {method} --density 0.4")
    stored = lambda m: sum(len(t.raw_data) for t in m.graph.initializer)  # noqa: E731  (nodes aside: tiny here)
    assert stored(result.model) < 0.6 * stored(model)
    assert result.model.ir_version == model.ir_version
    assert [o.version for o in result.model.opset_import] == [o.version for o in model.opset_import]
    feeds = {"x": np.random.default_rng(5).standard_normal((4, 48)).astype(np.float32)}
    for level in ("disabled", "enabled"):  # runs either way, and close to the original
        (got,), (want,) = ort_run(result.model, feeds, level), ort_run(model, feeds, level)
        assert np.linalg.norm(got - want) < 0.5 * np.linalg.norm(want)


def test_sites_are_fitted_on_the_factorized_outputs_before_them(tmp_path):
    """The second layer is fitted on what the factorized first layer hands it, against the
    original output: magnitude pruning then prunes the weight that best gives XW from X' (not W
    itself), which it does only when the first layer was factorized too."""
    from onnx_split.factorization import plan_factorized
    from onnx_split.factorize.pruning import magnitude
    from onnx_split.sites import find_sites

    model, weights = _mlp()
    cal = str(_calibration(tmp_path))
    found = {}
    for include in ((), ("fc1*",)):
        config = SplitConfig(factorize="magnitude", density=0.3, calibration=cal, min_elements=0, include=include)
        sites = find_sites(model, min_elements=0)
        planning = plan_factorized(model, sites, config)
        found[include] = {u.sites[0]: u.plan for u in planning.units}
    plain = magnitude(weights[1].astype(np.float64), None, int(0.3 * weights[1].size)).astype(np.float32)
    assert set(found[()]) == {0, 1} and set(found[("fc1*",)]) == {1}
    assert np.array_equal(found[("fc1*",)][1].factors[0], plain)       # alone: X' = X, W itself pruned
    assert not np.array_equal(found[()][1].factors[0], plain)          # after fc0: the corrected weight
    assert found[()][1].error > found[("fc1*",)][1].error > 0          # measured against XW, so fc0's loss shows


@pytest.mark.parametrize("argv, message", [
    (["--density", "0.5"], "--density is the budget of --factorize"),
    (["--factorize", "dsf"], "needs --density"),
    (["--factorize", "dsf", "--density", "1.5"], "--density must be a fraction"),
    (["--factorize", "dsf", "--density", "0.5", "--parts", "4"], "--factorize takes --density"),
    (["--factorize", "wanda", "--density", "0.5", "--dynamic-keep", "0.5"], "does not combine"),
    (["--blocks", "4"], "--blocks is the block count of --factorize blocks"),
    (["--factorize", "lowrank", "--density", "0.5", "--blocks", "4"], "--blocks is the block count"),
    (["--factorize", "blocks", "--density", "0.5", "--blocks", "1"], "--blocks must be an integer >= 2"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    model, _ = _mlp()
    path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(path))
    code = main([str(path), str(out), *argv])
    _, err = capsys.readouterr()
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_factorizes_and_reports(tmp_path, capsys):
    model, _ = _mlp()
    path, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, str(path))
    code = main([str(path), str(out), "--factorize", "admm", "--density", "0.5", "--min-elements", "0",
                 "--calibration", str(_calibration(tmp_path)), "--no-bench", "--report", str(report)])
    text, _ = capsys.readouterr()
    assert code == 0, text
    assert "admm at 50" in text and "PASSED" in text and "FAILED" not in text
    data = json.loads(report.read_text())
    assert [s["details"]["factorized"]["method"] for s in data["sites"]] == ["admm", "admm"]
    assert "admm at 50" in json.loads(report.read_text())["chains"][0]["label"]


def test_library_rejects_a_bad_method():
    with pytest.raises(InputError, match="--factorize must be one of"):
        SplitConfig(factorize="svd", density=0.5)
