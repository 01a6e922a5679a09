"""ORT sessions in a child process: a native crash becomes a one-line reason, the batch goes on."""
from __future__ import annotations

import logging
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_split import isolate
from onnx_split.isolate import BatchStats, Probe, crash_reason, first_crash, loads_in_ort, probe_models, probe_source

MARK = "onnx_split-test:crash-here"


def identity_model(doc: str = "", dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", dtype, [2, 3])
    y = helper.make_tensor_value_info("y", dtype, [2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.doc_string = doc
    return model


def invalid_model() -> onnx.ModelProto:
    """A Reshape whose shape input is float: ORT refuses it at load, without crashing."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def crashing_child(tmp_path, monkeypatch):
    """The real child script, with onnxruntime's session patched to crash natively on models whose
    bytes carry MARK: ``how`` is "segv" (a real NULL read in native code), "kill" (SIGSEGV sent
    to itself) or "abort"; ``level`` limits the crash to one optimization level."""

    def install(how: str = "segv", level: str | None = None, phase: str = "load") -> None:
        wrapper = tmp_path / f"child_{how}_{level}_{phase}.py"
        wrapper.write_text(textwrap.dedent(f"""
            import ctypes, os, runpy, signal, sys
            import onnxruntime as ort

            def die():
                if {how!r} == "segv":
                    ctypes.string_at(0)
                elif {how!r} == "kill":
                    os.kill(os.getpid(), signal.SIGSEGV)
                else:
                    os.abort()

            class Session(ort.InferenceSession):
                def __init__(self, source, options=None, **kwargs):
                    marked = isinstance(source, bytes) and {MARK!r}.encode() in source
                    level_hit = {level!r} is None or options.graph_optimization_level == getattr(
                        ort.GraphOptimizationLevel, {level!r} or "ORT_ENABLE_ALL")
                    self._die_on_run = marked and level_hit and {phase!r} == "run"
                    if marked and level_hit and {phase!r} == "load":
                        sys.stderr.write("native noise the parent must not show\\n")
                        die()
                    super().__init__(source, options, **kwargs)

                def run(self, *args, **kwargs):
                    if self._die_on_run:
                        die()
                    return super().run(*args, **kwargs)

            ort.InferenceSession = Session
            runpy.run_path({str(isolate.CHILD_SCRIPT)!r}, run_name="__main__")
        """))
        monkeypatch.setattr(isolate, "CHILD_SCRIPT", wrapper)

    return install


def test_a_good_model_probes_fine_and_runs_on_feeds():
    feeds = {"x": np.ones((2, 3), np.float32)}
    stats: list[BatchStats] = []
    results = probe_models([Probe(identity_model().SerializeToString(), "the model", optimization=level,
                                  feeds=feeds) for level in isolate.LEVELS], stats=stats)
    assert [r.ok for r in results] == [True] * len(isolate.LEVELS)
    assert all(r.reason is None and not r.crashed for r in results)
    assert results[0].providers[0] == "CPUExecutionProvider"
    assert stats[0].children == 1


def test_an_ort_error_comes_back_as_ort_s_line_and_is_not_a_crash():
    result, = probe_models([Probe(invalid_model().SerializeToString(), "the rewritten model")])
    assert not result.ok and not result.crashed
    assert result.reason.startswith("onnxruntime cannot load the rewritten model with ORT_ENABLE_ALL on "
                                    "CPUExecutionProvider: INVALID_GRAPH: ")
    assert "\n" not in result.reason and "/onnxruntime_src/" not in result.reason
    garbage, = probe_models([Probe(b"not a model", "garbage")])
    assert not garbage.ok and "protobuf" in garbage.reason


def test_a_run_error_names_the_run_phase():
    wrong_feeds = {"x": np.ones((5,), np.float32)}
    result, = probe_models([Probe(identity_model().SerializeToString(), "the model", feeds=wrong_feeds)])
    assert not result.ok and not result.crashed
    assert result.reason.startswith("onnxruntime cannot run the model with ORT_ENABLE_ALL")


@pytest.mark.parametrize("how, signal_name", [("segv", "SIGSEGV"), ("kill", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_native_crash_is_one_line_and_the_batch_goes_on(crashing_child, how, signal_name, capfd):
    crashing_child(how)
    good, bad = identity_model().SerializeToString(), identity_model(MARK).SerializeToString()
    stats: list[BatchStats] = []
    results = probe_models([Probe(good, "model 0"), Probe(bad, "model 1"), Probe(good, "model 2"),
                            Probe(bad, "model 3", optimization="disabled"), Probe(good, "model 4")], stats=stats)
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert [r.crashed for r in results] == [False, True, False, True, False]
    assert results[1].reason == (f"onnxruntime crashed ({signal_name}) loading model 1 with ORT_ENABLE_ALL "
                                 f"on CPUExecutionProvider")
    assert results[3].reason == (f"onnxruntime crashed ({signal_name}) loading model 3 with ORT_DISABLE_ALL "
                                 f"on CPUExecutionProvider")
    assert first_crash(results) == results[1].reason
    assert stats[0].children == 3  # one child, and a fresh one after each crash
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the child's stderr is captured, not shown


def test_a_crash_while_running_says_running(crashing_child):
    crashing_child("segv", phase="run")
    model = identity_model(MARK)
    reason = crash_reason(model, "the rewritten model", feeds={"x": np.ones((2, 3), np.float32)})
    assert reason == "onnxruntime crashed (SIGSEGV) running the rewritten model with ORT_DISABLE_ALL on CPUExecutionProvider"
    assert crash_reason(model, "the rewritten model") is None  # opening alone does not crash it


def test_load_check_covers_the_level_users_run(crashing_child):
    """The old check opened the model with optimizations disabled only: a model that crashes ORT
    at ORT_ENABLE_ALL (its default) passed as "loads: yes"."""
    crashing_child("segv", level="ORT_ENABLE_ALL")
    model = identity_model(MARK)
    assert loads_in_ort(model, "the rewritten model", levels=("disabled",)) == "yes"
    assert loads_in_ort(model, "the rewritten model") == (
        "onnxruntime crashed (SIGSEGV) loading the rewritten model with ORT_ENABLE_ALL on CPUExecutionProvider")
    assert loads_in_ort(identity_model()) == "yes"


def test_ort_errors_are_not_crashes_for_crash_reason():
    assert crash_reason(invalid_model(), "the rewritten model") is None
    assert loads_in_ort(invalid_model(), "the rewritten model").startswith(
        "onnxruntime cannot load the rewritten model with ORT_DISABLE_ALL")


def test_a_child_that_cannot_start_fails_every_probe_once(crashing_child, tmp_path, monkeypatch):
    broken = tmp_path / "broken_child.py"
    broken.write_text("raise SystemExit('no onnxruntime here')\n")
    monkeypatch.setattr(isolate, "CHILD_SCRIPT", broken)
    stats: list[BatchStats] = []
    results = probe_models([Probe(b"", "model 0"), Probe(b"", "model 1")], stats=stats)
    assert [r.crashed for r in results] == [True, True]
    assert results[0].reason.startswith("the onnxruntime child process failed (child exit 1: no onnxruntime here)")
    assert stats[0].children == 1


def test_large_models_go_as_a_path_with_their_external_data(tmp_path):
    w = numpy_helper.from_array(np.arange(512, dtype=np.float32).reshape(4, 128), "W")  # 2 KB: external
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with probe_source(model, limit=0) as source:
        assert isinstance(source, str)
        on_disk = onnx.load(source, load_external_data=False)
        assert on_disk.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
        result, = probe_models([Probe(source, "the model", feeds={"x": np.zeros((4, 128), np.float32)})])
    assert result.ok
    with probe_source(model) as source:
        assert isinstance(source, bytes)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown optimization level"):
        probe_models([Probe(b"", "m", optimization="all")])


def test_a_hung_child_is_stopped_and_named(crashing_child, tmp_path, monkeypatch):
    slow = tmp_path / "slow_child.py"
    slow.write_text(textwrap.dedent(f"""
        import runpy, time
        import onnxruntime as ort
        original = ort.InferenceSession
        def session(source, *args, **kwargs):
            if {MARK!r}.encode() in source:
                time.sleep(600)
            return original(source, *args, **kwargs)
        ort.InferenceSession = session
        runpy.run_path({str(isolate.CHILD_SCRIPT)!r}, run_name="__main__")
    """))
    monkeypatch.setattr(isolate, "CHILD_SCRIPT", slow)
    good, bad = identity_model().SerializeToString(), identity_model(MARK).SerializeToString()
    results = probe_models([Probe(good, "model 0"), Probe(bad, "model 1"), Probe(good, "model 2")], timeout=10)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reason == ("onnxruntime did not finish in 10 s loading model 1 with ORT_ENABLE_ALL "
                                 "on CPUExecutionProvider")


def test_overhead_is_reported_not_asserted(record_property, caplog):
    """One child per batch: its cost for 1 and for 20 models goes to the test report (junit
    properties) and the log; no figure is asserted."""
    model = identity_model().SerializeToString()
    for n in (1, 20):
        stats: list[BatchStats] = []
        probe_models([Probe(model, f"model {i}") for i in range(n)], stats=stats)
        assert stats[0].children == 1
        record_property(f"probe_seconds_{n}_models", round(stats[0].seconds, 3))
        with caplog.at_level(logging.INFO):
            logging.getLogger(__name__).info("%d models probed in one child: %.3f s", n, stats[0].seconds)


def test_crash_screen_names_each_crashing_model_once(crashing_child):
    crashing_child("segv")
    good, bad = identity_model().SerializeToString(), identity_model(MARK).SerializeToString()
    stats: list[BatchStats] = []
    probes = [Probe(source, label, optimization=level) for label, source in
              (("the original model", good), ("the rewritten model", bad), ("another model", good))
              for level in ("disabled", "enabled")]
    results = probe_models(probes, skip_crashed_labels=True, stats=stats)
    assert [r.ok for r in results] == [True, True, False, False, True, True]
    assert results[3].reason == "not tried: the rewritten model crashed onnxruntime already"
    assert stats[0].children == 2  # the crashed model's second probe costs no extra child
    found = isolate.crash_screen({"the original model": good, "the rewritten model": bad},
                                 feeds_list=[{"x": np.ones((2, 3), np.float32)}, None])
    assert found == {"the original model": None, "the rewritten model":
                     "onnxruntime crashed (SIGSEGV) loading the rewritten model with ORT_DISABLE_ALL on "
                     "CPUExecutionProvider"}


def test_files_in_the_working_directory_do_not_shadow_the_child_s_imports(tmp_path, monkeypatch):
    (tmp_path / "onnxruntime.py").write_text("raise ImportError('shadowed')\n")
    (tmp_path / "json.py").write_text("raise ImportError('shadowed')\n")
    monkeypatch.chdir(tmp_path)
    result, = probe_models([Probe(identity_model().SerializeToString(), "the model")])
    assert result.ok, result.reason
