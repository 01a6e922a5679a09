import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders import matmul_model, planted
from onnx_split import ModelLoadError, OutputError, SplitConfig, load_model, save_model, split_model
from onnx_split import model_io


def _model(k=64, seed=0):
    w, _ = planted(np.random.default_rng(seed), k, k, 4)
    return matmul_model(w, [2, k])


def test_external_data_loads_splits_and_saves_as_external(tmp_path):
    model = _model()
    src = tmp_path / "in.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="in.weights", size_threshold=0)
    loaded, files = model_io.read_model(src)
    assert files == {(tmp_path / "in.weights").resolve()}
    result = split_model(loaded, SplitConfig(layout="parallel", min_elements=0, bench=False, providers=("cpu",)))
    assert result.report.verification_passed
    out = tmp_path / "out.onnx"
    written = save_model(result.model, out, external_data=True)
    assert written[0] == out and len(written) == 2
    assert re.fullmatch(r"out\.onnx\.[0-9a-f]{12}\.data", written[1].name) and written[1].parent == tmp_path
    header = onnx.load(str(out), load_external_data=False)
    assert model_io.uses_external_data(header)
    onnx.checker.check_model(str(out), full_check=True)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_external_data_is_written_automatically_above_the_protobuf_limit(tmp_path, monkeypatch):
    model = _model()
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", model.ByteSize() - 1)  # is_large() reads it
    written = save_model(model, tmp_path / "big.onnx")
    assert written[0].name == "big.onnx" and re.fullmatch(r"big\.onnx\.[0-9a-f]{12}\.data", written[1].name)
    assert model_io.uses_external_data(onnx.load(str(tmp_path / "big.onnx"), load_external_data=False))
    assert not model_io.uses_external_data(model)  # the caller's model still holds its weights
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).shape == (64, 64)
    small = save_model(model, tmp_path / "small.onnx", external_data=False)
    assert [p.name for p in small] == ["small.onnx"]


def test_save_never_overwrites_the_input_and_leaves_no_partial_file(tmp_path):
    model = _model()
    src = tmp_path / "m.onnx"
    onnx.save_model(model, str(src))
    before = src.read_bytes()
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(model, src, protect=(src,))
    assert src.read_bytes() == before
    with pytest.raises(OutputError, match="directory does not exist"):
        save_model(model, tmp_path / "nope" / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp folders left


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    (b"", "empty"),
    (b"this is not an onnx model at all\n" * 4, "not"),
])
def test_bad_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        load_model(path)


def test_truncated_model_is_rejected(tmp_path):
    data = _model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(path)


def test_missing_external_data_file_is_a_clear_error(tmp_path):
    onnx.save_model(_model(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelLoadError, match="external data file of the model is missing"):
        load_model(tmp_path / "m.onnx")


def test_is_large_counts_weights_without_serializing(monkeypatch):
    model = _model()
    exact = model.ByteSize()
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", exact + 256)
    assert not model_io.is_large(model)  # the estimate is close to the real size...
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", exact)
    assert model_io.is_large(model)  # ...and never below it


def test_a_model_above_the_source_limit_goes_to_ort_by_path_unchanged_and_with_the_outputs_asked_for():
    from onnx_split.runtime import CPU, capture, make_session
    from builders import chain_model
    rng = np.random.default_rng(5)
    w0, w1 = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((32, 16)).astype(np.float32)
    model = chain_model([w0, w1], [[]], ["batch", 64], biases=False)
    before = model.SerializeToString()
    x = rng.standard_normal((3, 64)).astype(np.float32)
    inner = "mm0"
    with model_io.model_source(model) as small, model_io.model_source(model, limit=0, outputs=(inner,)) as path:
        assert isinstance(small, bytes) and isinstance(path, str)
        header = onnx.load(path, load_external_data=False)
        assert {t.name for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} == {"W0", "W1"}
        by_bytes = make_session(small, CPU).run(None, {"x": x})
        session = make_session(path, CPU)
        assert [o.name for o in session.get_outputs()] == [model.graph.output[0].name, inner]
        by_path = session.run(None, {"x": x})
    np.testing.assert_array_equal(by_bytes[0], by_path[0])
    np.testing.assert_allclose(by_path[1], x @ w0, rtol=1e-5, atol=1e-4)
    assert model.SerializeToString() == before  # neither changed nor left with the extra output
    (found,) = capture(model, [inner], [{"x": x}])
    np.testing.assert_array_equal(found[inner], by_path[1])


def _rich_model() -> onnx.ModelProto:
    """Every kind of field around the weights: model fields before and after the graph, graph
    fields before and after the initializers, a sparse initializer, a function."""
    model = _model()
    model.doc_string, model.producer_name, model.model_version = "doc", "test", 3
    onnx.helper.set_model_props(model, {"k": "v"})
    model.graph.doc_string = "graph doc"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32), "extra"))
    model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(np.ones(2, np.float32), "s"), onnx.numpy_helper.from_array(np.array([0, 3])), [4]))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [2]))
    model.functions.append(onnx.helper.make_function("custom", "f", ["a"], ["b"],
                                                     [onnx.helper.make_node("Relu", ["a"], ["b"])],
                                                     [onnx.helper.make_opsetid("", 17)]))
    return model


@pytest.mark.parametrize("make", [_model, _rich_model, onnx.ModelProto, lambda: onnx.ModelProto(ir_version=8)])
def test_a_model_serialized_a_weight_at_a_time_is_the_same_bytes(make, tmp_path):
    from onnx_split.protos import serialized_pieces

    model = make()
    pieces = list(serialized_pieces(model))
    assert b"".join(pieces) == model.SerializeToString()
    if len(model.graph.initializer) > 1:  # each weight a piece of its own, after its key
        assert len(pieces) == 2 * len(model.graph.initializer) + 4  # model and graph fields before and after
        serialized = {t.SerializeToString() for t in model.graph.initializer}
        assert sum(piece in serialized for piece in pieces) >= len(model.graph.initializer)
    if model.HasField("graph"):
        save_model(model, tmp_path / "m.onnx", external_data=False)
        assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()


def test_serialized_pieces_of_unknown_fields_or_past_the_limit(monkeypatch):
    from onnx_split import protos

    model = _model()
    with_unknown = onnx.ModelProto.FromString(model.SerializeToString() + b"\xf8\x07\x01")  # field 127 = 1
    assert list(protos.serialized_pieces(with_unknown)) == [with_unknown.SerializeToString()]
    monkeypatch.setattr(protos, "MESSAGE_LIMIT", len(model.SerializeToString()) - 1)
    with pytest.raises(ValueError, match="2 GB limit"):
        next(protos.serialized_pieces(model))
