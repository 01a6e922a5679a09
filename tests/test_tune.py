"""--layout auto end to end: options, the whole-model check, and what the report says. No real
timing is asserted here (speed lives in tools/bench_chains.py); fake latencies drive the decisions."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from builders import chain_model, chained_blocks, feature_wise
from onnx_split import SplitConfig, split_model
from onnx_split.bench import LatencyEntry
from onnx_split.cli import main
from onnx_split.errors import InputError
from onnx_split.tune import whole_model_verdict

CPU = "CPUExecutionProvider"


def _model():
    rng = np.random.default_rng(3)
    return chain_model(chained_blocks(rng, [64, 64, 64], 4), [[feature_wise("Relu", rng)]], ["N", 64])


def _latency(speedups: list[float]) -> list[LatencyEntry]:
    return [LatencyEntry(CPU, "measured", original_ms=s, rewritten_ms=1.0, speedup=s, inputs=f"batch {b}")
            for s, b in zip(speedups, (1, 32, 256))]


@pytest.mark.parametrize("speedups, kept", [([1.5, 2.0], False), ([0.99, 3.0], True), ([1.01, 1.01], True)])
def test_whole_model_check_writes_the_original_unless_faster_everywhere(speedups, kept, monkeypatch):
    import onnx_split.pipeline as pipeline

    monkeypatch.setattr(pipeline, "benchmark_models", lambda *a, **kw: _latency(speedups))
    monkeypatch.setattr("onnx_split.tune.measure",
                        lambda models, *a: {name: (2.0 if name == "dense" else 1.0) for name in models})
    why = whole_model_verdict(_latency(speedups), 1.02)
    assert (why is not None) is kept
    original = _model()
    result = split_model(original, SplitConfig(min_elements=0, providers=("cpu",), input_shapes={"x": (4, 64)},
                                               batches=(1, 32)))
    assert (result.model.SerializeToString() == original.SerializeToString()) is kept
    assert result.report.reverted is kept
    assert any("original was written unchanged" in n for n in result.report.notes) is kept


def test_without_measurements_the_check_says_so(monkeypatch):
    import onnx_split.pipeline as pipeline

    assert whole_model_verdict([], 1.02) is None
    monkeypatch.setattr(pipeline, "benchmark_models", lambda *a, **kw: [LatencyEntry(CPU, "unavailable")])
    monkeypatch.setattr("onnx_split.tune.measure",
                        lambda models, *a: {name: (2.0 if name == "dense" else 1.0) for name in models})
    model = _model()
    result = split_model(model, SplitConfig(min_elements=0, providers=("cpu",), input_shapes={"x": (4, 64)}))
    assert result.report.modified
    assert any("could not be timed" in n for n in result.report.notes)


def test_auto_reverts_through_the_pipeline_when_the_rewrite_is_slower(monkeypatch):
    """Tuning picks a layout, but the whole model measures slower: the original is the result."""
    import onnx_split.pipeline as pipeline

    def fake_timer(models, feeds, provider, seconds, threads):
        return {name: (2.0 if name == "dense" else 1.0) for name in models}

    def slower(original, model, feeds, **kw):
        return [LatencyEntry(CPU, "measured", original_ms=1.0, rewritten_ms=2.0, speedup=0.5)]

    monkeypatch.setattr("onnx_split.tune.measure", fake_timer)
    monkeypatch.setattr(pipeline, "benchmark_models", slower)
    model = _model()
    result = split_model(model, SplitConfig(min_elements=0, providers=("cpu",), input_shapes={"x": (4, 64)}))
    report = result.report
    assert report.tuning and report.tuning[0].choice != "dense"
    assert report.reverted and not report.modified
    assert result.model.SerializeToString() == model.SerializeToString()
    assert all(s.decision == "kept" and "0.50x" in s.reason for s in report.sites)


def test_batch_sizes_give_one_measured_point_each(monkeypatch):
    seen = []

    def fake_timer(models, feeds, provider, seconds, threads):
        seen.append(next(iter(feeds.values())).shape[0])
        return {name: (2.0 if name == "dense" else 1.0) for name in models}

    monkeypatch.setattr("onnx_split.tune.measure", fake_timer)
    result = split_model(_model(), SplitConfig(min_elements=0, providers=("cpu",), batches=(1, 8), bench=False))
    assert sorted(seen) == [1, 8]
    (tuned,) = result.report.tuning
    assert sorted(tuned.times_ms["dense"]) == ["CPU, batch 1", "CPU, batch 8"]


def test_auto_without_a_runnable_original_uses_the_static_rule():
    model = _model()
    model.ir_version = 14  # newer than ORT 1.31 reads
    result = split_model(model, SplitConfig(min_elements=0, providers=("cpu",), bench=False, verify=False))
    assert result.report.modified
    assert any("could not measure" in n and "static parallel rule" in n for n in result.report.notes)


@pytest.mark.parametrize("kw, match", [({"batches": (0, 4)}, "--batch"), ({"tune_seconds": 0}, "--tune-seconds"),
                                       ({"min_speedup": float("nan")}, "--min-speedup")])
def test_bad_tuning_options(kw, match):
    with pytest.raises(InputError, match=match):
        SplitConfig(**kw)


def test_cli_auto_writes_report_with_every_candidate_time(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("onnx_split.tune.measure",
                        lambda models, *a: {name: (3.0 if name == "batched" else 2.0 if name == "dense" else 1.5)
                                            for name in models})
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save_model(_model(), str(src))
    code = main([str(src), str(out), "--min-elements", "0", "--batch", "2,16", "--no-bench", "--report", str(rep)])
    stdout = capsys.readouterr().out
    assert code == 0 and "autotune fc0 -> fc1" in stdout
    data = json.loads(rep.read_text())
    (tuned,) = data["tuning"]
    assert tuned["choice"] in ("parallel", "parallel-rows")  # 1.5 < 2.0 (dense) < 3.0 (batched)
    assert set(tuned["times_ms"]) == {"dense", "parallel", "parallel-rows", "batched"}
    assert data["chains"][0]["sites"] == ["fc0", "fc1"]


def test_cli_rejects_a_bad_batch_list(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(src))
    code = main([str(src), str(tmp_path / "o.onnx"), "--batch", "1,x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--batch" in err and not (tmp_path / "o.onnx").exists()


def test_no_bench_skips_the_whole_model_check_and_says_so(monkeypatch):
    import onnx_split.pipeline as pipeline

    monkeypatch.setattr("onnx_split.tune.measure", lambda models, *a: {n: (2.0 if n == "dense" else 1.0) for n in models})
    monkeypatch.setattr(pipeline, "benchmark_models", lambda *a, **k: pytest.fail("timed despite --no-bench"))
    result = split_model(_model(), SplitConfig(min_elements=0, providers=("cpu",), bench=False))
    assert result.report.modified and not result.report.latency
    assert any("--no-bench" in n and "not timed" in n for n in result.report.notes)
