import numpy as np

from builders import matmul_model, planted
from onnx_split import SplitConfig, benchmark_models, make_feeds, split_model
from onnx_split.bench import summarize, time_pair


def test_time_pair_warms_up_interleaves_and_respects_min_runs():
    calls = []

    def a():
        calls.append("a")
        return 2.0

    def b():
        calls.append("b")
        return 1.0

    ta, tb = time_pair(a, b, seconds=0.0, warmup=3, min_runs=6)
    assert len(ta) == len(tb) == 6
    timed = calls[6:]
    assert timed[:4] == ["a", "b", "b", "a"]  # the order alternates, so neither always goes first
    entry = summarize("CPUExecutionProvider", ta, tb, 1)
    assert entry.speedup == 2.0 and entry.original_ms == 2.0 and entry.rewritten_p90_ms == 1.0


def test_benchmark_models_measures_cpu_with_iobinding():
    rng = np.random.default_rng(0)
    w, _ = planted(rng, 64, 64, 4)
    model = matmul_model(w, [4, 64])
    rewritten = split_model(model, SplitConfig(layout="parallel", min_elements=0, verify=False, bench=False)).model
    feeds, _ = make_feeds(model)
    (entry,) = benchmark_models(model, rewritten, feeds, providers=["CPUExecutionProvider"], seconds=0.05)
    assert entry.status == "measured" and entry.runs >= 10
    assert entry.original_ms > 0 and entry.rewritten_ms > 0
    assert entry.speedup == entry.original_ms / entry.rewritten_ms


def test_a_model_that_fails_while_running_is_reported_not_raised():
    from onnx import TensorProto, helper, numpy_helper

    w, _ = planted(np.random.default_rng(1), 64, 64, 4)
    nodes = [helper.make_node("Reshape", ["x", "s"], ["xr"]), helper.make_node("MatMul", ["xr", "W"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([4, 64], np.int64), "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rewritten = split_model(model, SplitConfig(layout="parallel", min_elements=0, verify=False, bench=False)).model
    feeds = {"x": np.zeros((1, 64), np.float32)}  # 64 values cannot be reshaped to [4, 64]
    (entry,) = benchmark_models(model, rewritten, feeds, providers=["CPUExecutionProvider"], seconds=0.01)
    assert entry.status == "unavailable" and entry.detail.startswith("failed while running")
    assert "onnxruntime_src" not in entry.detail  # ORT's source locations are stripped
