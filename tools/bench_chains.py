"""Benchmark whole networks: split sub-networks across layers, autotuning, never slower, pass time.

Three measurements, each written to its own section of docs/BENCHMARKS.md (raw rows to JSON):

1. A 3-layer MLP (width 4096, bias + Relu between layers) whose weights are 8 exact blocks under
   hidden row/column permutations, split with every layout and with ``--layout auto``; original
   and rewritten timed in one process, interleaved, at batch 1 and 32.
2. Models where splitting does not pay (a dense random MLP; a small 2-block MLP): ``--layout auto``
   output vs input, and the reason the report gives.
3. The time of the pass itself (analysis + rewrite, no verification or timing) on a 1 GB fp32
   model: 16 chained 4096 x 4096 layers.

Run from the repository root:

    .venv/bin/python tools/bench_chains.py --quick --out /tmp/bench_chains.md
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx_split  # noqa: E402
from onnx_split.bench import Runner, summarize, time_pair  # noqa: E402
from onnx_split.runtime import CPU, CUDA, provider_status  # noqa: E402
from benchdocs import meta_lines, parse_with_presets, run_meta, write_section  # noqa: E402

FULL = dict(width=4096, layers=3, parts=8, batches=[1, 32], seconds=3.0, tune_seconds=30.0, pass_width=4096,
            pass_layers=16, small_width=1024)
QUICK = dict(width=256, layers=3, parts=8, batches=[1, 8], seconds=0.1, tune_seconds=2.0, pass_width=256,
             pass_layers=4, small_width=128)
LAYOUTS = [("auto", True), ("parallel", True), ("batched", True), ("function", True), ("parallel", False),
           ("batched", False)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (fixed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-pass-time", action="store_true", help="skip the 1 GB pass-time measurement")
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="Markdown output; raw rows go to <out>.chains.json")
    args = parse_with_presets(p, argv, FULL, QUICK)
    return args


def mlp(weights: list[np.ndarray], rng: np.random.Generator, name: str) -> onnx.ModelProto:
    """x -> (MatMul -> Add bias -> Relu) ... -> MatMul -> Add bias -> y, batch dim dynamic."""
    nodes, inits, h = [], [], "x"
    for i, w in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"W{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(w.shape[1])).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"mm{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"], name=f"bias{i}")]
        h = f"z{i}"
        if i + 1 < len(weights):
            nodes.append(helper.make_node("Relu", [h], [f"a{i}"], name=f"relu{i}"))
            h = f"a{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights[0].shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weights[-1].shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def block_weights(rng: np.random.Generator, width: int, layers: int, parts: int) -> list[np.ndarray]:
    """``layers`` weights of ``parts`` dense blocks each, rows and columns under hidden permutations
    that are consistent between layers (so the network is ``parts`` independent networks)."""
    perms = [rng.permutation(width) for _ in range(layers + 1)]
    size = width // parts
    out = []
    for i in range(layers):
        w = np.zeros((width, width), dtype=np.float32)
        for b in range(parts):
            block = slice(b * size, (b + 1) * size)
            w[block, block] = rng.standard_normal((size, size)) / np.sqrt(size)
        out.append(np.ascontiguousarray(w[perms[i]][:, perms[i + 1]]))
    return out


def split(model: onnx.ModelProto, args, layout: str, chains: bool):
    config = onnx_split.SplitConfig(layout=layout, chains=chains, min_elements=0, max_parts=16, verify=layout == "auto",
                                    bench=layout == "auto", batches=tuple(args.batches), providers=("cpu",),
                                    tune_seconds=args.tune_seconds, bench_seconds=1.0, threads=args.threads)
    start = time.perf_counter()
    result = onnx_split.split_model(model, config)
    return result, time.perf_counter() - start


def time_models(original: onnx.ModelProto, rewritten: onnx.ModelProto, args, batch: int, rng) -> dict:
    feeds = {"x": rng.standard_normal((batch, original.graph.input[0].type.tensor_type.shape.dim[1].dim_value)).astype(np.float32)}
    dense = Runner(original.SerializeToString(), CPU, feeds, args.threads)
    other = Runner(rewritten.SerializeToString(), CPU, feeds, args.threads)
    check = onnx_split.compare("y", dense.session.run(None, feeds)[0], other.session.run(None, feeds)[0])
    if not check.passed:
        return {"status": "wrong output", "max_rel_error": check.max_rel}
    a, b = time_pair(dense, other, seconds=args.seconds)
    e = summarize(CPU, a, b, args.threads)
    return {"status": "measured", "max_rel_error": check.max_rel, "original_ms": e.original_ms,
            "rewritten_ms": e.rewritten_ms, "speedup": e.speedup, "runs": e.runs}


def describe(report) -> str:
    if report.reverted:
        return "original written (whole model not faster)"
    if not report.chains:
        return "nothing split"
    return "; ".join(f"{' -> '.join(c.sites)}: {c.parts} parts, {c.layout}, {c.boundary_gathers} boundary Gathers"
                     for c in report.chains)


def network_rows(args, rng) -> list[dict]:
    weights = block_weights(rng, args.width, args.layers, args.parts)
    model = mlp(weights, rng, "block_mlp")
    rows = []
    for layout, chains in LAYOUTS:
        result, seconds = split(model, args, layout, chains)
        label = layout + ("" if chains else " (each layer alone)")
        ideal = sum(s.flops_before for s in result.report.sites) / max(1, sum(
            s.flops_after if s.decision == "split" else s.flops_before for s in result.report.sites))
        tuned = "; ".join(f"{'->'.join(t.chain)}: {t.choice}" for t in result.report.tuning)
        for batch in args.batches:
            row = dict(model="block_mlp", layout=label, batch=batch, ideal=ideal, written=describe(result.report),
                       tuned=tuned, split_seconds=seconds, **time_models(model, result.model, args, batch, rng))
            rows.append(row)
            print(f"{label:<28} batch {batch:>3}: {row.get('speedup', float('nan')):.2f}x (ideal {ideal:.2f}x)",
                  file=sys.stderr)
    return rows


def no_gain_rows(args, rng) -> list[dict]:
    w = args.small_width
    cases = {
        "dense_mlp": [(rng.standard_normal((w, w)) / np.sqrt(w)).astype(np.float32) for _ in range(3)],
        "small_2_blocks": block_weights(rng, w // 4, 2, 2),
    }
    rows = []
    for name, weights in cases.items():
        model = mlp(weights, rng, name)
        result, seconds = split(model, args, "auto", True)
        reasons = sorted({s.reason for s in result.report.sites})
        tuned = "; ".join(f"{'->'.join(t.chain)}: {t.choice} ({t.reason})" for t in result.report.tuning)
        for batch in args.batches:
            row = dict(model=name, layout="auto", batch=batch, written=describe(result.report), tuned=tuned,
                       reasons=reasons, notes=result.report.notes, split_seconds=seconds,
                       **time_models(model, result.model, args, batch, rng))
            rows.append(row)
            print(f"{name:<16} batch {batch:>3}: output/input {row.get('speedup', float('nan')):.3f}x; {row['written']}",
                  file=sys.stderr)
    return rows


def pass_time(args, rng) -> dict:
    """Seconds of split_model (analysis + rewrite, nothing run) on a chained block MLP."""
    weights = block_weights(rng, args.pass_width, args.pass_layers, args.parts)
    model = mlp(weights, rng, "big_block_mlp")
    del weights
    gc.collect()
    size = sum(t.ByteSize() for t in model.graph.initializer)
    config = onnx_split.SplitConfig(layout="parallel", min_elements=0, verify=False, bench=False)
    start = time.perf_counter()
    result = onnx_split.split_model(model, config)
    seconds = time.perf_counter() - start
    report = result.report
    return dict(bytes=size, layers=args.pass_layers, width=args.pass_width, seconds=seconds,
                written=describe(report), checker=report.checker.get("passed"))


def markdown(meta: dict, rows: list[dict], no_gain: list[dict], timing: dict | None) -> list[str]:
    lines = ["# onnx_split benchmarks: networks, autotuning and the cost of the pass", "", "## How this was made", "",
             *meta_lines(meta),
             f"- Intra-op threads: {meta['threads']}; each original/rewritten pair timed interleaved in one process for "
             f"{meta['seconds']} s after 5 warm-up runs each (median); `--layout auto` tuned with "
             f"`--batch {','.join(map(str, meta['batches']))} --tune-seconds {meta['tune_seconds']:g}`; seed {meta['seed']}", ""]
    if CUDA not in meta["providers"]:
        lines += [f"CUDA EP: not measured, no GPU here ({provider_status(CUDA)}).", ""]
    lines += [f"## {meta['layers']}-layer MLP, width {meta['width']}, {meta['parts']} exact blocks under hidden permutations", "",
              "`x -> (MatMul -> Add bias -> Relu) x2 -> MatMul -> Add bias`, every weight 8 dense blocks whose rows and "
              "columns are shuffled by hidden permutations (consistent between layers, so the network is 8 networks). "
              "*ideal* = FLOPs before / after from the report; *speedup* = original median / rewritten median.", "",
              "| layout | batch | original ms | rewritten ms | speedup | ideal | of ideal | what was written |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "measured":
            lines.append(f"| {r['layout']} | {r['batch']} | {r['status']} | | | | | {r['written']} |")
            continue
        lines.append(f"| {r['layout']} | {r['batch']} | {r['original_ms']:.3f} | {r['rewritten_ms']:.3f} | "
                     f"{r['speedup']:.2f}× | {r['ideal']:.2f}× | {100 * r['speedup'] / r['ideal']:.0f}% | {r['written']} |")
    tuned = sorted({r["tuned"] for r in rows if r["layout"] == "auto" and r["tuned"]})
    if tuned:
        lines += ["", f"`--layout auto` chose: {'; '.join(tuned)}."]
    lines += ["", "## Where splitting does not pay: `--layout auto` output vs input", "",
              "| model | batch | input ms | output ms | output speed / input | what was written | why |",
              "|---|---:|---:|---:|---:|---|---|"]
    for r in no_gain:
        why = " / ".join(r["reasons"])[:300]
        if r["status"] != "measured":
            lines.append(f"| {r['model']} | {r['batch']} | {r['status']} | | | {r['written']} | {why} |")
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r['original_ms']:.4f} | {r['rewritten_ms']:.4f} | "
                     f"{r['speedup']:.3f}× | {r['written']} | {why} |")
    if timing:
        lines += ["", "## Cost of the pass", "",
                  f"`split_model` (analysis + rewrite, `--layout parallel --no-verify --no-bench`) on "
                  f"{timing['layers']} chained {timing['width']}×{timing['width']} fp32 layers "
                  f"({timing['bytes'] / 2**30:.2f} GiB of weights): **{timing['seconds']:.1f} s**; "
                  f"written: {timing['written']}; onnx checker passed: {timing['checker']}."]
    return lines + [""]


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    providers = [CPU] + ([CUDA] if provider_status(CUDA) is None else [])
    meta = run_meta(argv, threads=args.threads, seconds=args.seconds, seed=args.seed, providers=providers,
                    batches=args.batches, tune_seconds=args.tune_seconds, width=args.width, layers=args.layers,
                    parts=args.parts)
    rows = network_rows(args, rng)
    no_gain = no_gain_rows(args, rng)
    timing = None if args.skip_pass_time else pass_time(args, rng)
    out = Path(args.out)
    write_section(out, "bench_chains", markdown(meta, rows, no_gain, timing))
    raw = out.with_suffix(".chains.json")
    raw.write_text(json.dumps({"meta": meta, "network": rows, "no_gain": no_gain, "pass_time": timing}, indent=1) + "\n")
    print(f"wrote {out} and {raw}", file=sys.stderr)
    return 1 if any(r["status"] == "wrong output" for r in rows + no_gain) else 0


if __name__ == "__main__":
    sys.exit(main())
