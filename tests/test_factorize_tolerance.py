"""``--factorize METHOD --tolerance E`` (factor_budget.py) on the shipped digits MLP: a density per
site from the ladder, the search error within E, verified against the factorized original, a
looser tolerance never storing more bytes; the budget options' errors are one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_split import SplitConfig, split_model
from onnx_split.cli import main
from onnx_split.errors import InputError
from onnx_split.factor_budget import LADDER

pytestmark = pytest.mark.usefixtures("one_blas_thread")

MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL, CALIBRATION = str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_calibration.npz")


def _stored_bytes(report) -> int:
    """What the written model stores for the candidate weights: the compressed factors of the split
    sites, the dense weight of the kept ones."""
    total = 0
    for s in report.sites:
        facts = s.details.get("factorized") if s.decision == "split" else None
        total += facts["bytes_after"] if facts else int(np.prod(s.shape)) * 4
    return total


def test_tolerance_chooses_densities_within_it_and_a_looser_one_stores_no_more():
    stages, stored, densities = set(), {}, {}
    for tol in (0.02, 0.1):
        config = SplitConfig(factorize="sparsegpt", tolerance=tol, calibration=CALIBRATION, bench=False)
        result = split_model(MODEL, config, progress=lambda stage, done, total: stages.add(stage))
        report = result.report
        assert report.error.tolerance == tol and report.error.search <= tol
        assert report.error.held_out is not None and report.error.met == (report.error.held_out <= tol)
        split = [s for s in report.sites if s.decision == "split"]
        assert split and all(s.layout == "compressed" for s in split)
        densities[tol] = [s.details["factorized"]["density"] for s in split]
        assert set(densities[tol]) <= set(LADDER)
        for s in split:
            facts = s.details["factorized"]
            assert facts["method"] == "sparsegpt" and facts["bytes_after"] < facts["bytes_before"]
            assert 0 < facts["nonzeros"] <= int(facts["density"] * np.prod(s.shape) + 1e-9)  # within its density
            assert "estimated output error" in s.reason and "alone" in s.reason
        assert report.verified_against.startswith("the factorized original")
        assert {v.optimization for v in report.verification} == {"disabled", "enabled"}
        assert all(v.passed for v in report.verification)
        meta = {p.key: p.value for p in result.model.metadata_props}
        assert meta["onnx_split.factorize"].startswith(f"--factorize sparsegpt --tolerance {tol:g}")
        confirmed = [p for p in report.search_trace if p["accepted"] is not None]
        assert confirmed and all(p["flops"] is None and 0 < p["bytes"] < 1 for p in confirmed)
        stored[tol] = _stored_bytes(report)
    assert stored[0.1] <= stored[0.02] < sum(int(np.prod(s.shape)) * 4 for s in report.sites)
    assert any(len(set(d)) > 1 for d in densities.values())  # per site, not one density for all
    assert {"fit", "sensitivity", "confirm"} <= stages


def test_a_tolerance_nothing_fits_keeps_every_site_with_why():
    config = SplitConfig(factorize="magnitude", tolerance=1e-9, calibration=CALIBRATION, bench=False, verify=False)
    report = split_model(MODEL, config).report
    assert report.n_split == 0 and report.sites
    for s in report.sites:
        assert s.decision == "kept" and s.reason.startswith("--tolerance 1e-09: ") and "estimated" in s.reason
    assert report.error.search == 0 and report.error.met


def test_search_seconds_keeps_the_sites_it_had_no_time_for():
    config = SplitConfig(factorize="magnitude", tolerance=0.05, calibration=CALIBRATION, bench=False, verify=False,
                         search_seconds=1e-9)
    report = split_model(MODEL, config).report
    assert report.n_split == 0
    assert all("--search-seconds 1e-09 ran out before this site was fitted" in s.reason for s in report.sites)


@pytest.mark.parametrize("argv, message", [
    (["--factorize", "magnitude", "--density", "0.5", "--tolerance", "0.05"], "takes one budget"),
    (["--factorize", "magnitude", "--tolerance", "0.05", "--keep", "0.5"], "give one budget"),
    (["--factorize", "magnitude", "--tolerance", "-1"], "--tolerance must be >= 0"),
    (["--factorize", "magnitude"], "needs --density D (the fraction of each weight kept) or --tolerance E"),
    (["--factorize", "lowrank", "--tolerance", "0.05"], "takes --density D"),
    (["--factorize", "magnitude", "--tolerance", "0.05", "--workers", "2"], "--workers and --fit-seconds apply"),
    (["--factorize", "magnitude", "--tolerance", "0.05", "--fit-seconds", "9"], "--workers and --fit-seconds apply"),
])
def test_cli_budget_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out.onnx"
    code = main([MODEL, str(out), "--calibration", CALIBRATION, *argv])
    _, err = capsys.readouterr()
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_library_refuses_density_with_tolerance():
    with pytest.raises(InputError, match="not both"):
        SplitConfig(factorize="magnitude", density=0.5, tolerance=0.05)
    config = SplitConfig(factorize="magnitude", tolerance=0.05)
    assert config.partitioner == "components" and not config.lossy  # the factorizing path, not a lossy split


def test_cli_writes_the_tolerance_model(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main([MODEL, str(out), "--factorize", "magnitude", "--tolerance", "0.05", "--calibration", CALIBRATION,
                 "--no-bench"])
    text, _ = capsys.readouterr()
    assert code == 0, text
    assert "--tolerance 0.05 met on held-out data" in text and "PASSED" in text and "FAILED" not in text
    assert out.stat().st_size < Path(MODEL).stat().st_size
    onnx.checker.check_model(str(out))


@pytest.mark.parametrize("samples", [24, 200])
def test_the_density_search_confirms_on_samples_its_fits_did_not_see(tmp_path, samples):
    """Low-rank inputs, few samples: a fit reproduces the samples it was fitted on far better than
    others. Fitted and confirmed on the same 18 search samples, sparsegpt at --tolerance 0.05 was
    accepted on this model and missed the tolerance on the held-out samples; fitted on one half and
    confirmed on the other it meets it, and with 200 samples it factorizes a site and meets it too."""
    from builders import low_rank_case
    src, cal = low_rank_case(tmp_path, samples)
    result = split_model(str(src), SplitConfig(factorize="sparsegpt", tolerance=0.05, calibration=str(cal),
                                               bench=False, min_elements=0, providers=("cpu",)))
    error = result.report.error
    assert error.met is True and error.held_out <= 0.05
    assert all(p["error"] <= 0.05 for p in result.report.search_trace if p["accepted"])
    assert any(s.decision == "split" for s in result.report.sites) == (samples == 200)
