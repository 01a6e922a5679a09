"""A real model over protobuf's 2 GB limit: loads with external data, splits, verifies, and is written
with external data. Skipped only where the disk cannot hold it (it needs about 10 GB of scratch)."""
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import planted
from onnx_split.cli import main

ROWS, DIM, TABLES = 190_000, 1000, 3  # 3 x 760 MB float32 tables: 2.28 GB, each tensor under 2 GB


def _external_tensor(name: str, dims, location: str, offset: int, length: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, dims=dims, data_type=TensorProto.FLOAT)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return t


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """Embedding tables summed, then a block-structured projection: the tables are written straight
    to the external data file, so the test itself never holds 2 GB in memory."""
    folder = tmp_path_factory.mktemp("big")
    free = shutil.disk_usage(folder).free
    if free < 12 * 2**30:
        pytest.skip(f"needs ~12 GB free disk for a >2 GB model and its copies, {free / 2**30:.1f} GB free")
    inits, offset = [], 0
    with open(folder / "big.onnx.data", "wb") as f:
        for i in range(TABLES):
            for start in range(0, ROWS, 10_000):
                rows = np.arange(start, min(start + 10_000, ROWS))
                chunk = (rows[:, None] % 97 + np.arange(DIM)[None, :] % 13 + i).astype(np.float32) / 100
                f.write(chunk.tobytes())
            length = ROWS * DIM * 4
            inits.append(_external_tensor(f"table{i}", [ROWS, DIM], "big.onnx.data", offset, length))
            offset += length
    w, _ = planted(np.random.default_rng(0), DIM, 256, 4)
    inits.append(numpy_helper.from_array(w, "W"))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])
    nodes = [helper.make_node("Gather", [f"table{i}", "ids"], [f"emb{i}"], name=f"embedding{i}")
             for i in range(TABLES)]
    nodes += [helper.make_node("Sum", [f"emb{i}" for i in range(TABLES)], ["emb"], name="sum"),
              helper.make_node("MatMul", ["emb", "W"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "big", [ids], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "big.onnx"
    onnx.save_model(model, str(path))
    return path


@pytest.mark.slow
def test_model_over_2gb_is_split_verified_and_written_with_external_data(big_model, capsys):
    out = big_model.parent / "big.split.onnx"
    # a static layout: whether --layout auto splits this 1000x256 weight at batch 8 is a timing call
    # (measured 1.08-1.32x, so a busy machine can tip it to dense); this test is about the >2 GB path
    code = main([str(big_model), str(out), "--no-bench", "--layout", "parallel", "--input-shape", "ids:8",
                 "--providers", "cpu"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "proj" in stdout and "split (" in stdout and stdout.count("PASSED") == 2
    (data,) = big_model.parent.glob("big.split.onnx.*.data")  # onnx_split names each data file anew
    assert data.stat().st_size > 2**31
    assert out.stat().st_size < 2**20  # the weights are in the external data file
    onnx.checker.check_model(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"ids": np.array([0, 5, ROWS - 1], np.int64)})
    assert result.shape == (3, 256)
