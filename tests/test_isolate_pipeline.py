"""The pass opens no ORT session of a model that crashes ORT in its own process: the crash (made
here by a child that segfaults on every model holding onnx_split's rewrite) ends as a one-line
failure, exit 1, nothing written."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
from builders import matmul_model, planted

from onnx_split import SplitConfig, isolate, split_model
from onnx_split.cli import main


@pytest.fixture
def rewrite_crashes_ort(tmp_path, monkeypatch):
    """Child sessions segfault (a real NULL read) on any model with a node named '.../split/...'
    at ``level`` (ORT's name) or at every level."""

    def install(level: str | None = None) -> None:
        wrapper = tmp_path / "segv_on_split.py"
        wrapper.write_text(textwrap.dedent(f"""
            import ctypes, runpy
            import onnxruntime as ort
            original = ort.InferenceSession
            def session(source, options=None, **kwargs):
                hit = {level!r} is None or options.graph_optimization_level == getattr(
                    ort.GraphOptimizationLevel, {level!r} or "ORT_ENABLE_ALL")
                if isinstance(source, bytes) and b"/split/" in source and hit:
                    ctypes.string_at(0)
                return original(source, options, **kwargs)
            ort.InferenceSession = session
            runpy.run_path({str(isolate.CHILD_SCRIPT)!r}, run_name="__main__")
        """))
        monkeypatch.setattr(isolate, "CHILD_SCRIPT", wrapper)

    return install


@pytest.fixture
def block_model(tmp_path):
    w, _ = planted(np.random.default_rng(0), 64, 64, 4)
    path = tmp_path / "in.onnx"
    path.write_bytes(matmul_model(w, [8, 64]).SerializeToString())
    return path


@pytest.mark.parametrize("extra", [[], ["--no-verify"], ["--no-bench"]])
def test_a_rewrite_that_crashes_ort_is_a_failure_with_nothing_written(rewrite_crashes_ort, block_model, tmp_path,
                                                                     capsys, extra):
    rewrite_crashes_ort("ORT_ENABLE_ALL")
    out = tmp_path / "out.onnx"
    code = main([str(block_model), str(out), "--layout", "batched", "--min-elements", "0"] + extra)
    printed = capsys.readouterr()
    assert code == 1 and not out.exists()
    assert ("onnxruntime crashed (SIGSEGV) loading the rewritten model with ORT_ENABLE_ALL on CPUExecutionProvider"
            in printed.out)
    assert "Traceback" not in printed.err


def test_auto_leaves_out_candidates_that_crash_ort(rewrite_crashes_ort, block_model):
    rewrite_crashes_ort()  # every rewritten form crashes; dense (the original nodes) does not
    result = split_model(str(block_model), SplitConfig(min_elements=0, tune_seconds=1, bench=False, verify=False))
    tuning, = result.report.tuning
    assert tuning.choice == "dense"
    assert tuning.reason.startswith("kept dense: every layout crashed (onnxruntime crashed (SIGSEGV) loading "
                                    "candidate 'parallel' of fc1 with ORT_ENABLE_ALL")
    assert not result.report.modified


def test_the_load_check_opens_the_model_at_the_default_level(rewrite_crashes_ort, block_model):
    rewrite_crashes_ort("ORT_ENABLE_ALL")
    result = split_model(str(block_model), SplitConfig(layout="parallel", min_elements=0, verify=False, bench=False))
    assert result.report.checker["ort_loads"] == (
        "onnxruntime crashed (SIGSEGV) loading the rewritten model with ORT_ENABLE_ALL on CPUExecutionProvider")
    assert result.report.verification_passed is False
