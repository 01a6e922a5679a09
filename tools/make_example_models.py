"""Write the example models shipped in models/ (seeded, so the files are reproducible).

    .venv/bin/python tools/make_example_models.py

mlp_blocks.onnx: a 3-layer MLP in the form exporters write (Gemm with transB=1 + Relu, then
MatMul + Add + Relu, then a dense Gemm classifier head). The two hidden layers, 512 wide, hold 8
exact dense blocks each under hidden row/column permutations that agree between the layers, so
onnx_split finds 8 independent sub-networks running through both; the head is dense and is kept,
with its reason.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def block_weight(rng: np.random.Generator, k: int, n: int, blocks: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``blocks`` dense blocks on the diagonal, rows and columns shuffled by ``rows`` and ``cols``."""
    w = np.zeros((k, n), np.float32)
    for r, c in zip(np.array_split(np.arange(k), blocks), np.array_split(np.arange(n), blocks)):
        w[np.ix_(r, c)] = rng.standard_normal((r.size, c.size)) * np.sqrt(2.0 / r.size)
    return w[rows][:, cols]


def mlp_blocks(width: int = 512, blocks: int = 8, n_in: int = 512, n_out: int = 10, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    # the hidden units are shuffled once, so fc1's column order is fc2's row order: the two layers
    # hold 8 sub-networks that run through both (as in a network trained to be block-sparse)
    p_in, p_hidden, p_out = rng.permutation(n_in), rng.permutation(width), rng.permutation(width)
    w1 = block_weight(rng, n_in, width, blocks, p_in, p_hidden)
    w2 = block_weight(rng, width, width, blocks, p_hidden, p_out)
    w3 = (rng.standard_normal((width, n_out)) / np.sqrt(width)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w1.T), "fc1.weight"),  # [out, in], as exporters store it
        numpy_helper.from_array((rng.standard_normal(width) * 0.1).astype(np.float32), "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),
        numpy_helper.from_array((rng.standard_normal(width) * 0.1).astype(np.float32), "fc2.bias"),
        numpy_helper.from_array(np.ascontiguousarray(w3.T), "head.weight"),
        numpy_helper.from_array(np.zeros(n_out, np.float32), "head.bias"),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["act1"], name="relu1"),
        helper.make_node("MatMul", ["act1", "fc2.weight"], ["fc2_mm"], name="fc2"),
        helper.make_node("Add", ["fc2_mm", "fc2.bias"], ["fc2_out"], name="fc2_bias"),
        helper.make_node("Relu", ["fc2_out"], ["act2"], name="relu2"),
        helper.make_node("Gemm", ["act2", "head.weight", "head.bias"], ["logits"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp_blocks",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="onnx_split/tools/make_example_models.py")
    model.doc_string = (f"3-layer MLP, hidden {width}, {blocks} planted blocks per hidden weight under hidden "
                        f"permutations (seed {seed})")
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "models"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(mlp_blocks(), str(out / "mlp_blocks.onnx"))
    print(f"wrote {out / 'mlp_blocks.onnx'}")


if __name__ == "__main__":
    main()
