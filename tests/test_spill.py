"""A large input's weights kept on disk during a run (spill.py): the run is the same as in memory."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_split import SplitConfig, spill, split_model, survey_model
from onnx_split.model_io import model_source

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL, CALIBRATION = MODELS / "digits_mlp.onnx", MODELS / "digits_calibration.npz"


def _two_layers():
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1")
    w1.doc_string = "first layer"
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W2")
    small = numpy_helper.from_array(np.ones(8, np.float32), "b")  # below 1 KB: stays in the proto
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [w1, w2, small])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(source, feeds):
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_a_spilled_model_refers_to_its_weights_on_disk_and_reads_back_as_it_was():
    model = _two_layers()
    before = model.SerializeToString()
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    with spill.spilled(model, limit=0) as header:
        folder = spill.directory()
        assert folder is not None and (folder / spill.DATA).is_file()
        assert spill.refers_outside(header) and not spill.refers_outside(model)
        external = [t.name for t in header.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert external == ["W1", "W2"] and not header.graph.initializer[0].HasField("raw_data")
        np.testing.assert_array_equal(spill.array(header.graph.initializer[1]),
                                      numpy_helper.to_array(model.graph.initializer[1]))
        assert spill.loaded(header).SerializeToString() == before  # doc strings and all
        with model_source(header) as source:  # written beside the weights it refers to
            assert isinstance(source, str) and Path(source).parent == folder
            np.testing.assert_array_equal(_run(source, feeds), _run(before, feeds))
        assert sorted(p.name for p in folder.iterdir()) == [spill.DATA]  # the source is removed
    assert spill.directory() is None and not folder.exists()
    assert model.SerializeToString() == before
    with pytest.raises(ValueError, match="no spill is active"):
        spill.array(header.graph.initializer[0])
    with spill.spilled(model) as same:  # small: not spilled
        assert same is model and spill.directory() is None


def test_to_disk_writes_a_models_weights_beside_the_spill_and_reads_back_the_same():
    model = _two_layers()
    assert spill.to_disk(model) is model  # no spill active: the model itself
    with spill.spilled(model, limit=0) as header:
        folder = spill.directory()
        assert spill.to_disk(header) is header  # its weights are references already
        built = spill.loaded(header)  # a model built in the run, in memory
        held = spill.to_disk(built)
        assert held is not built and spill.refers_outside(held)
        assert [t.name for t in held.graph.initializer if t.data_location == TensorProto.EXTERNAL] == ["W1", "W2"]
        assert held.graph.initializer[2].HasField("raw_data")  # below 1 KB: stays in the proto
        (extra,) = [p for p in folder.iterdir() if p.name != spill.DATA]
        assert extra.name.startswith("held-")
        assert spill.loaded(held).SerializeToString() == model.SerializeToString()
        from onnx_split.verify import check

        assert check(held) == {"passed": True, "error": None}  # checked by path, beside its weights
    assert not folder.exists()


def _outcome(result):
    r = result.report
    return (result.model.SerializeToString(),
            [(s.node, s.decision, s.reason, s.parts, s.retained, s.shape, s.dtype) for s in r.sites],
            [(v.provider, v.optimization, v.status, v.passed) for v in r.verification],
            None if r.error is None else (r.error.search, r.error.held_out, r.error.met),
            r.model["before"], r.model["after"], r.verified_against)


@pytest.mark.parametrize("budget", [dict(), dict(parts=4), dict(tolerance=0.05)])
def test_split_model_with_its_input_spilled_writes_the_same_model_and_report(monkeypatch, budget):
    config = SplitConfig(calibration=str(CALIBRATION), bench=False, layout="batched", **budget)
    in_memory = split_model(str(MODEL), config)
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    seen = []
    real = spill.load_weights

    def spy(model):
        seen.append(spill.refers_outside(model))
        return real(model)

    monkeypatch.setattr("onnx_split.pipeline.load_weights", spy)
    spilled = split_model(str(MODEL), config)
    assert seen  # the working copy reads in its weights once verified (where not reverted)
    if not budget:  # the lossless pass keeps weights dense: they were references to the spill until then
        assert seen[0]
    a, b = _outcome(in_memory), _outcome(spilled)
    assert a == b
    assert any(v.status == "passed" for v in spilled.report.verification)
    if budget:
        assert any(s.decision == "split" for s in spilled.report.sites)
    assert not spill.refers_outside(spilled.model)


def test_the_dry_run_of_a_spilled_input_reads_the_same_figures(monkeypatch):
    config = SplitConfig(calibration=str(CALIBRATION))
    in_memory = survey_model(str(MODEL), config)
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    spilled = survey_model(str(MODEL), config)
    assert [(r.node, r.levels) for r in in_memory] == [(r.node, r.levels) for r in spilled]



def test_a_spilled_input_written_back_where_the_rewrite_does_not_pay_is_the_input(monkeypatch):
    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    monkeypatch.setattr("onnx_split.pipeline.whole_model_verdict", lambda latency, margin: "measured slower (forced)")
    monkeypatch.setattr("onnx_split.tune.measure",  # every site's split measures faster: something is split
                        lambda models, *a: {name: (2.0 if name == "dense" else 1.0) for name in models})
    result = split_model(str(MODEL), SplitConfig(parts=4, bench_seconds=0.05, tune_seconds=0.05))
    assert result.report.reverted and "measured slower (forced)" in result.report.notes
    assert result.model.SerializeToString() == onnx.load(str(MODEL)).SerializeToString()


def test_a_spilled_lossy_run_holds_its_reference_and_working_copy_on_disk(monkeypatch):
    """While it is verified, neither the reference (the refitted original) nor the rewritten
    model holds the input's weights in memory: the reference's are written beside the spill, the
    weights the rewrite kept are still references to the input's spill."""
    import onnx_split.pipeline as pipeline

    monkeypatch.setattr(spill, "SPILL_BYTES", 0)
    seen = []
    real = pipeline.verify_models

    def files(model):
        return {t.name: next(e.value for e in t.external_data if e.key == "location")
                for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}

    def spy(reference, model, *args, **kwargs):
        fc2 = next(n for n in reference.graph.node if n.name == "/fc2/Gemm")
        seen.append((spill.directory(), files(reference), files(model), fc2.input[1]))
        return real(reference, model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "verify_models", spy)
    config = SplitConfig(calibration=str(CALIBRATION), bench=False, layout="batched", parts=4, include=("/fc2/*",))
    result = split_model(str(MODEL), config)
    assert [s.node for s in result.report.sites if s.decision == "split"] == ["/fc2/Gemm"]
    ((folder, of_reference, of_model, refitted),) = seen
    assert folder is not None
    assert of_reference[refitted].startswith("held-")  # the refitted weight, written beside the spill
    assert of_reference["fc1.weight"] == of_reference["fc3.weight"] == spill.DATA and "fc2.weight" not in of_reference
    assert of_model == {name: spill.DATA for name in ("fc1.weight", "fc1.bias", "fc3.weight")}  # (fc3.bias: < 1 KB)
    assert "fc2.weight" not in [t.name for t in result.model.graph.initializer]  # replaced: never read in
    assert not spill.refers_outside(result.model)


def test_split_held_takes_the_model_out_of_its_list_and_splits_it_as_split_model_does():
    from onnx_split import split_held
    from onnx_split.errors import InputError

    config = SplitConfig(bench=False, layout="batched")
    model = onnx.load(str(MODEL))
    held = [model]
    result = split_held(held, config, source="digits")
    assert held == [] and result.report.input == "digits"
    assert result.model.SerializeToString() == split_model(str(MODEL), config).model.SerializeToString()
    assert model.SerializeToString() == onnx.load(str(MODEL)).SerializeToString()  # not modified
    for bad in (model, [], [model, model], ["m.onnx"]):
        with pytest.raises(InputError, match="a list holding one onnx.ModelProto"):
            split_held(bad, config)


def test_the_cli_keeps_no_reference_to_the_input_it_hands_over(tmp_path, monkeypatch, capsys):
    """The CLI reads the model and hands it to the library: no local of its frame still refers to
    it during the run, so a large input is not held in memory beside its spill."""
    import sys

    import onnx_split.cli as cli

    real, seen = cli.split_held, []

    def spy(held, *args, **kwargs):
        (model,) = held
        caller = sys._getframe(1)
        seen.append([name for name, value in caller.f_locals.items() if value is model])
        return real(held, *args, **kwargs)

    monkeypatch.setattr(cli, "split_held", spy)
    assert cli.main([str(MODEL), str(tmp_path / "out.onnx"), "--no-bench", "--layout", "batched"]) == 0
    assert seen == [[]]
    assert (tmp_path / "out.onnx").is_file()
