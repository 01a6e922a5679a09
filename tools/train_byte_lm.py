"""Train, reproducibly, the small byte-level language model of docs/DYNAMIC.md and write it to
models/: an MLP over the previous 8 bytes (byte embedding 24 -> Gemm 192x512 -> Relu -> Gemm
512x512 -> Relu -> Gemm 512x256 logits), trained in numpy with Adam on Python standard-library
sources (text that ships with Python itself). Writes models/byte_lm.onnx, models/byte_lm_calibration.npz
(contexts from held-out text), models/byte_lm_test.npz (later held-out contexts with their next
bytes: the test data ships with the model) and models/byte_lm_training.json. About a minute on one core:

    .venv/bin/python tools/train_byte_lm.py
"""
from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONTEXT, EMBED, HIDDEN = 8, 24, 512
SOURCES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "heapq.py", "bisect.py", "colorsys.py",
           "calendar.py", "difflib.py", "argparse.py", "csv.py", "pprint.py", "queue.py", "sched.py"]
HELD_OUT = ["ftplib.py", "gettext.py"]


def corpus(names: list[str]) -> np.ndarray:
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / n).read_bytes() for n in names if (root / n).is_file())
    return np.frombuffer(data, dtype=np.uint8)


def windows(data: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ctx = np.stack([data[idx + j] for j in range(CONTEXT)], axis=1).astype(np.int64)
    return ctx, data[idx + CONTEXT].astype(np.int64)


def init(rng):
    def dense(k, n):
        return (rng.standard_normal((k, n)) * np.sqrt(2.0 / k)).astype(np.float32), np.zeros(n, np.float32)
    p = {"emb": (rng.standard_normal((256, EMBED)) * 0.5).astype(np.float32)}
    p["w1"], p["b1"] = dense(CONTEXT * EMBED, HIDDEN)
    p["w2"], p["b2"] = dense(HIDDEN, HIDDEN)
    p["w3"], p["b3"] = dense(HIDDEN, 256)
    return p


def forward(p, ctx):
    e = p["emb"][ctx].reshape(len(ctx), -1)
    h1 = np.maximum(e @ p["w1"] + p["b1"], 0)
    h2 = np.maximum(h1 @ p["w2"] + p["b2"], 0)
    return e, h1, h2, h2 @ p["w3"] + p["b3"]


def loss_and_grads(p, ctx, target):
    e, h1, h2, logits = forward(p, ctx)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(axis=1, keepdims=True)
    n = len(ctx)
    loss = -np.log(prob[np.arange(n), target] + 1e-12).mean()
    d = prob
    d[np.arange(n), target] -= 1
    d /= n
    g = {"w3": h2.T @ d, "b3": d.sum(0)}
    d2 = (d @ p["w3"].T) * (h2 > 0)
    g["w2"], g["b2"] = h1.T @ d2, d2.sum(0)
    d1 = (d2 @ p["w2"].T) * (h1 > 0)
    g["w1"], g["b1"] = e.T @ d1, d1.sum(0)
    de = (d1 @ p["w1"].T).reshape(n, CONTEXT, EMBED)
    g["emb"] = np.zeros_like(p["emb"])
    np.add.at(g["emb"], ctx, de)
    return float(loss), g


def to_onnx(p) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, k) for k, v in p.items()]
    inits.append(numpy_helper.from_array(np.array([-1, CONTEXT * EMBED], np.int64), "flat"))
    nodes = [helper.make_node("Gather", ["emb", "context"], ["e3"], name="embed", axis=0),
             helper.make_node("Reshape", ["e3", "flat"], ["e"], name="flatten"),
             helper.make_node("Gemm", ["e", "w1", "b1"], ["a1"], name="fc1"),
             helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["a2"], name="fc2"),
             helper.make_node("Relu", ["a2"], ["h2"], name="relu2"),
             helper.make_node("Gemm", ["h2", "w3", "b3"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "byte_lm", [helper.make_tensor_value_info("context", TensorProto.INT64,
                                                                              ["batch", CONTEXT])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10,
                              producer_name="onnx_split tools/train_byte_lm.py")
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="models")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    train, held = corpus(SOURCES), corpus(HELD_OUT)
    if len(train) < 100_000 or len(held) < 20_000:
        print("the Python standard library sources were not found", file=sys.stderr)
        return 2
    p = init(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    lr, b1, b2 = 2e-3, 0.9, 0.999
    log = []
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(train) - CONTEXT - 1, 512)
        loss, g = loss_and_grads(p, *windows(train, idx))
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            p[k] -= (lr * (m[k] / (1 - b1 ** step)) / (np.sqrt(v2[k] / (1 - b2 ** step)) + 1e-8)).astype(np.float32)
        if step % 100 == 0:
            log.append({"step": step, "train_bits_per_byte": loss / np.log(2)})
            print(f"step {step}: {loss / np.log(2):.3f} bits/byte", flush=True)
    # held-out text: the first half for calibration, the second for evaluation (never trained on)
    half = len(held) // 2
    cal_idx = np.arange(0, half - CONTEXT - 1, 7)[:2048]
    test_idx = np.arange(half, len(held) - CONTEXT - 1, 5)[:4096]
    cal_ctx, _ = windows(held, cal_idx)
    test_ctx, test_next = windows(held, test_idx)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(p), str(out / "byte_lm.onnx"))
    np.savez_compressed(out / "byte_lm_calibration.npz", context=cal_ctx)
    np.savez_compressed(out / "byte_lm_test.npz", context=test_ctx, next=test_next)
    logits = forward(p, test_ctx)[3]
    z = logits - logits.max(1, keepdims=True)
    bpb = float((np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), test_next]).mean() / np.log(2))
    info = {"sources": SOURCES, "held_out": HELD_OUT, "python": sys.version.split()[0], "steps": args.steps,
            "held_out_bits_per_byte": bpb, "log": log}
    (out / "byte_lm_training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"held-out {bpb:.3f} bits/byte; wrote {out / 'byte_lm.onnx'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
