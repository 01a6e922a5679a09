import numpy as np
import pytest

from builders import matmul_model, planted
from onnx_split import SplitConfig, compare, make_feeds, split_model, verify_models
from onnx_split.runtime import CUDA, provider_status


@pytest.fixture(scope="module")
def wide_split():
    """K = 16384: the largest K the default fp32 tolerance is promised to pass."""
    rng = np.random.default_rng(0)
    w, _ = planted(rng, 16384, 64, 4)
    model = matmul_model(w, [8, 16384])
    result = split_model(model, SplitConfig(layout="parallel", min_elements=0, bench=False, providers=("cpu",)))
    return model, result


def test_default_tolerance_passes_an_exact_fp32_split_at_k_16384(wide_split):
    _, result = wide_split
    assert result.report.sites[0].decision == "split"
    assert result.report.verification_passed is True
    assert {v.status for v in result.report.verification} == {"passed"}


def test_default_tolerance_fails_when_one_significant_weight_is_dropped(wide_split):
    model, result = wide_split
    dropped = type(model)()
    dropped.CopyFrom(result.model)
    # zero the largest weight of part 0 in the rewritten model
    from onnx import numpy_helper

    init = next(t for t in dropped.graph.initializer if t.name.endswith(("part0/W", "part0/Wt")))
    w = numpy_helper.to_array(init).copy()
    i, j = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    w[i, j] = 0.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    feeds, _ = make_feeds(model, seed=1)
    entries = verify_models(model, dropped, feeds, providers=["CPUExecutionProvider"])
    assert [e.status for e in entries] == ["failed", "failed"]
    (out,) = entries[0].outputs
    assert not out.passed and out.min_rtol > out.rtol == 1e-4


def test_compare_reports_errors_and_the_tolerance_that_would_pass():
    ref = np.array([1.0, -2.0, 0.0, 4.0], np.float32)
    ok = compare("y", ref, ref.copy())
    assert ok.passed and ok.max_abs == 0 and ok.min_rtol == 0
    bad = compare("y", ref, ref + np.array([0, 0, 0.1, 0], np.float32))
    assert not bad.passed and bad.max_abs == pytest.approx(0.1, rel=1e-6)
    assert compare("y", ref, ref + np.array([0, 0, 0.1, 0], np.float32), rtol=bad.min_rtol * 1.01).passed
    assert not compare("y", ref, ref[:3]).passed  # shape mismatch
    nan = np.array([np.nan, 1.0], np.float32)
    assert compare("y", nan, nan.copy()).passed
    assert not compare("y", nan, np.array([0.0, 1.0], np.float32)).passed


def test_near_zero_outputs_are_judged_against_the_output_scale():
    ref = np.array([1000.0, 1e-6], np.float64).astype(np.float32)
    got = ref + np.array([0, 1e-3], np.float32)  # 1e-6 of the output's size: rounding, not a bug
    assert compare("y", ref, got).passed


def test_cuda_is_reported_unavailable_not_passed_without_a_gpu():
    why = provider_status(CUDA)
    if why is None:
        pytest.skip("CUDA really runs here")
    rng = np.random.default_rng(1)
    w, _ = planted(rng, 32, 32, 2)
    result = split_model(matmul_model(w, [2, 32]),
                         SplitConfig(layout="parallel", min_elements=0, providers=("cpu", "cuda"), bench_seconds=0.05))
    cuda = [v for v in result.report.verification if v.provider == CUDA]
    assert [v.status for v in cuda] == ["unavailable", "unavailable"] and all(v.passed is None for v in cuda)
    assert [e.status for e in result.report.latency if e.provider == CUDA] == ["unavailable"]
    assert result.report.verification_passed is True  # CPU passed; CUDA neither passed nor failed


@pytest.mark.skipif(provider_status(CUDA) is not None, reason=f"CUDA EP unavailable: {provider_status(CUDA)}")
def test_cuda_verification_and_iobinding_timing():
    rng = np.random.default_rng(2)
    w, _ = planted(rng, 256, 256, 4)
    result = split_model(matmul_model(w, [32, 256]), SplitConfig(layout="parallel", min_elements=0, providers=("cuda",),
                                                                 bench_seconds=0.2))
    assert [v.status for v in result.report.verification] == ["passed", "passed"]
    assert result.report.latency[0].status == "measured"


def test_sequence_outputs_are_compared_element_by_element():
    from onnx_split.verify import compare
    a = [np.ones((2, 3), np.float32), np.zeros(4, np.float32)]
    assert compare("s", a, [x.copy() for x in a]).passed
    worse = compare("s", a, [a[0] + 1.0, a[1]])
    assert not worse.passed and worse.max_abs == pytest.approx(1.0) and "sequence of 2" in worse.note
    assert not compare("s", a, a[:1]).passed
    assert compare("s", [], []).passed


def test_compare_prints_no_numpy_warning_on_infinite_or_huge_values():
    import warnings

    ref = np.array([np.inf, -np.inf, 1e308, 1.0], np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning is printed on stderr by the CLI: a second line
        assert compare("y", ref, ref.copy()).passed
        assert not compare("y", ref, np.array([np.inf, -np.inf, -1e308, 1.0])).passed
