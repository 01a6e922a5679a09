"""Microbenchmark of dynamic block skipping: ORT's dense MatMul vs the DynamicBlockMatMul kernel and
the portable If-per-block form, y = x @ W with W [K, N] fp32 random (weights beyond cache at K = N =
4096: 64 MB), 1 thread, each variant of one (K, batch) point timed interleaved with dense in one
process (alternating who goes first), medians. Each rewrite is checked against numpy first.

    .venv/bin/python tools/bench_dynamic.py                 # about 3 minutes
    .venv/bin/python tools/bench_dynamic.py --quick         # a few seconds (CI smoke test)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx_split import kernel  # noqa: E402
from onnx_split.bench import Runner, round_robin  # noqa: E402
from onnx_split.chains import Chain  # noqa: E402
from onnx_split.plans.dynamic import make_plan  # noqa: E402
from onnx_split.rewrite import Job, rewrite_model  # noqa: E402
from onnx_split.runtime import CPU  # noqa: E402
from onnx_split.sites import find_sites  # noqa: E402

DEFAULTS = dict(k=[4096, 1024], batch=[1, 8, 32], keep=[0.5, 0.25], block=128, seconds=2.0, inputs=16)
QUICK = dict(k=[256], batch=[1, 3], keep=[0.5], block=32, seconds=0.05, inputs=2)


class Rotating:
    """One session, run on the next of several inputs at each call."""

    def __init__(self, source, inputs):
        self.runners = [Runner(source, CPU, {"x": x}, 1) for x in inputs[:1]]
        session = self.runners[0].session
        self.bindings = []
        for x in inputs:
            binding = session.io_binding()
            binding.bind_cpu_input("x", x)
            binding.bind_output("y", "cpu")
            self.bindings.append(binding)
        self.session, self.i = session, 0

    def __call__(self) -> float:
        binding = self.bindings[self.i % len(self.bindings)]
        self.i += 1
        start = time.perf_counter_ns()
        self.session.run_with_iobinding(binding)
        return (time.perf_counter_ns() - start) / 1e6


def dense_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def dynamic_model(dense: onnx.ModelProto, keep: float, block: int, form: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(dense)
    (site,) = find_sites(model, min_elements=0)
    plan = make_plan(site.weight, block=block, keep=keep)
    refused, _ = rewrite_model(model, [Job(Chain([site], []), plan, form)])
    if refused:
        raise SystemExit(f"{form}: {refused}")
    return model, plan


def check(model, plan, w, x) -> None:
    so = ort.SessionOptions()
    kernel.register(so)
    got = ort.InferenceSession(model.SerializeToString(), so, providers=[CPU]).run(None, {"x": x})[0]
    mask = np.zeros(w.shape[0], bool)
    for b in plan.kept_blocks(x):
        mask[b * plan.block:(b + 1) * plan.block] = True
    want = (x.astype(np.float64) * mask) @ w.astype(np.float64)
    scale = np.sqrt(np.mean(want ** 2)) + 1e-30
    if np.abs(got - want).max() > 1e-4 * scale * 10:
        raise SystemExit(f"{model.graph.node[0].op_type}: wrong result")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seconds", type=float)
    p.add_argument("--out", default="docs/DYNAMIC.bench.json")
    p.add_argument("--forms", nargs="+", default=["dynamic-kernel", "dynamic-portable"])
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else DEFAULTS)
    if args.seconds:
        cfg["seconds"] = args.seconds
    forms = [f for f in args.forms if f != "dynamic-kernel" or kernel.kernel_library()]
    rows = []
    for k in cfg["k"]:
        rng = np.random.default_rng(k)
        w = rng.standard_normal((k, k)).astype(np.float32)
        dense = dense_model(w)
        variants = {"dense": (dense, None)}
        for form in forms:
            for keep in cfg["keep"]:
                variants[f"{form} {keep:g}"] = dynamic_model(dense, keep, cfg["block"], form)
        for batch in cfg["batch"]:
            # several inputs in turn, so the blocks kept change from call to call (as from token to
            # token) and the kept rows of W do not stay in the last-level cache
            xs = [(rng.standard_normal((batch, k)) * rng.gamma(0.5, 1.0, k)).astype(np.float32)
                  for _ in range(cfg["inputs"])]
            for name, (model, plan) in variants.items():
                if plan is not None:
                    check(model, plan, w, xs[0])
            # each rewrite interleaved with dense alone, as it would be deployed: the other
            # variants' copies of W would otherwise share the last-level cache with it
            dense_run = Rotating(dense.SerializeToString(), xs)
            for name, (model, _) in variants.items():
                if name == "dense":
                    continue
                times = round_robin([dense_run, Rotating(model.SerializeToString(), xs)],
                                    seconds=cfg["seconds"] * 2)
                base, median = (float(np.median(t)) for t in times)
                rows.append({"k": k, "n": k, "batch": batch, "variant": name, "median_ms": median,
                             "dense_ms": base, "speedup": base / median, "runs": len(times[0])})
                print(f"K=N={k} batch {batch:3d} {name:22s} {median:9.4f} ms  {base / median:5.2f}x "
                      f"(dense {base:.4f} ms)", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
            "kernel": kernel.kernel_path(), "block": cfg["block"], "threads": 1, "seconds_per_variant": cfg["seconds"]}
    try:
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    if not args.quick:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
