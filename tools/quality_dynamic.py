"""Quality and latency of dynamic block skipping against dense and against the static baseline, on
the trained byte-level LM (held-out bits per byte) and the digits MLP (test accuracy), for keep
fractions 1, 0.75, 0.5, 0.25 of every eligible projection's input blocks:

- dense: the model as trained;
- dynamic top-k / dynamic threshold: the model onnx_split writes with ``--dynamic-keep F``
  (``--dynamic-rule topk`` / ``threshold``, calibrated on the calibration file), run one sample per
  call (each call selects its own blocks), with each of the two scores (``--dynamic-score xw``:
  ||x_b||*||W_b||, and ``x``: ||x_b|| alone), and top-k with ``--dynamic-compensate`` (a skipped
  block counts as its calibrated mean);
- static: the seed paper's magnitude-block baseline: the same blocks (``--dynamic-block``) pruned
  permanently, per site the F of them with the largest mean ||x_b||*||W_b|| over the calibration
  samples.

Then the LM's whole-model latency at batch 1 and 8 (interleaved medians, one thread) of each
written model against dense, and a reference point for any block score on the LM: every call
keeping, layer by layer, the blocks of largest true contribution ||x_b W_b||, skipped blocks as
zero (``oracle_bound``, a contribution-greedy oracle, blocks of 8, 16 and 32). Writes docs/DYNAMIC.quality.json and prints Markdown tables:

    .venv/bin/python tools/quality_dynamic.py            # a few minutes
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx_split  # noqa: E402
from onnx_split.bench import benchmark_models  # noqa: E402
from onnx_split.plans.dynamic import block_scores, weight_scales  # noqa: E402
from onnx_split.pruned import reference_model  # noqa: E402
from onnx_split.runtime import CPU, capture, make_session  # noqa: E402
from onnx_split.sites import find_sites  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "models"
KEEPS = (1.0, 0.75, 0.5, 0.25)


def lm_metric(model, data):
    """Held-out bits per byte, one context per call."""
    s = make_session(model.SerializeToString(), CPU, "enabled", 1)
    ctx, nxt = data["context"], data["next"]
    total = 0.0
    for i in range(len(ctx)):
        z = s.run(None, {"context": ctx[i:i + 1]})[0][0].astype(np.float64)
        z -= z.max()
        total += math.log(np.exp(z).sum()) - z[nxt[i]]
    return total / len(ctx) / math.log(2)


def digits_metric(model, data):
    s = make_session(model.SerializeToString(), CPU, "enabled", 1)
    x, y = data["pixels"], data["labels"]
    hits = sum(int(np.argmax(s.run(None, {"pixels": x[i:i + 1]})[0][0]) == y[i]) for i in range(len(x)))
    return hits / len(x)


def static_baseline(model, calibration: dict, block: int, keep: float):
    """The model with, per site, all but the F best blocks of input rows zeroed for good."""
    sites = [s for s in find_sites(model, min_elements=0) if s.reason is None]
    name = next(iter(calibration))
    samples = [{name: calibration[name][i:i + 1]} for i in range(len(calibration[name]))]
    acts = capture(model, [s.activation for s in sites], samples)
    weights = {}
    for i, site in enumerate(sites):
        k = site.weight.shape[0]
        n_blocks = math.ceil(k / block)
        if n_blocks < 2:
            continue
        scales = weight_scales(site.weight, block, "xw")
        mean = np.mean([block_scores(a[site.activation], block, scales) for a in acts], axis=0)
        kept = np.sort(np.argsort(-mean, kind="stable")[:max(1, math.ceil(keep * n_blocks - 1e-9))])
        w = np.zeros_like(site.weight)
        for b in kept:
            w[b * block:(b + 1) * block] = site.weight[b * block:(b + 1) * block]
        weights[i] = w
    all_sites = find_sites(model, min_elements=0)
    index = {s.index: j for j, s in enumerate(all_sites)}
    return reference_model(model, all_sites, {index[sites[i].index]: w for i, w in weights.items()})


def dynamic(model, calibration_path: str, block: int, keep: float, rule: str, form: str, score: str = "xw",
            compensate: bool = False):
    config = onnx_split.SplitConfig(dynamic_keep=keep, dynamic_block=block, dynamic_rule=rule, dynamic_form=form,
                                    dynamic_score=score, dynamic_compensate=compensate,
                                    layout="parallel", min_elements=0, calibration=calibration_path, bench=False,
                                    verify=False)
    result = onnx_split.split_model(model, config)
    split = [s for s in result.report.sites if s.decision == "split"]
    if not split:
        return result.model, None  # every site kept dense (keep 1: no saving)
    return result.model, sum(s.flops_after for s in split) / sum(s.flops_before for s in split)


def oracle_bound(model, data, block: int, keep: float) -> float:
    """Held-out bits per byte of the byte LM when every call keeps, at every projection, the blocks
    with the largest true contribution ||x_b W_b|| (computed, not bounded), skipped blocks counting
    as zero: a contribution-greedy oracle, the reference point for the cheap scores (greedy per
    layer, it is not an optimum: a compensated selection can beat it). A float64 numpy forward of
    the LM's own graph (Gather, Reshape, Gemm with default attributes, Relu)."""
    from onnx import numpy_helper

    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Gather", "Reshape", "Gemm", "Relu", "Gemm", "Relu", "Gemm"], ops
    assert not any(a.name in ("transA", "transB", "alpha", "beta") for n in model.graph.node for a in n.attribute)

    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    x = w["emb"][data["context"]].reshape(len(data["context"]), -1)
    for i, node in enumerate(gemms):
        weight, bias = w[node.input[1]], w[node.input[2]]
        n_blocks = math.ceil(x.shape[1] / block)
        parts = np.stack([x[:, b * block:(b + 1) * block] @ weight[b * block:(b + 1) * block]
                          for b in range(n_blocks)], axis=1)
        kept = np.argsort(-np.linalg.norm(parts, axis=2), axis=1)[:, :max(1, math.ceil(keep * n_blocks - 1e-9))]
        y = np.take_along_axis(parts, kept[:, :, None], axis=1).sum(axis=1) + bias
        x = np.maximum(y, 0) if i < len(gemms) - 1 else y
    z = x - x.max(axis=1, keepdims=True)
    picked = z[np.arange(len(z)), data["next"]]
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - picked) / math.log(2))


def timed(model, written, feeds, keep, batch, variant, repeats: int) -> dict:
    """Whole-model speedup of ``written`` over ``model``: ``repeats`` interleaved runs of 2 s each,
    the median speedup reported."""
    entries = [benchmark_models(model, written, feeds, providers=[CPU], seconds=2.0, threads=1)[0]
               for _ in range(repeats)]
    speedups = sorted(e.speedup for e in entries)
    row = {"keep": keep, "batch": batch, "variant": variant, "speedup": float(np.median(speedups)),
           "speedups": speedups, "dense_ms": float(np.median([e.original_ms for e in entries])),
           "dynamic_ms": float(np.median([e.rewritten_ms for e in entries]))}
    runs = ", ".join(f"{v:.2f}" for v in speedups)
    print(f"  latency keep {keep:g} batch {batch} {variant}: {row['speedup']:.2f}x median of [{runs}] "
          f"({row['dense_ms']:.4f} -> {row['dynamic_ms']:.4f} ms)", flush=True)
    return row


def latency_only(form: str, repeats: int) -> int:
    model, data = onnx.load(str(ROOT / "byte_lm.onnx")), dict(np.load(ROOT / "byte_lm_test.npz"))
    written, _ = dynamic(model, str(ROOT / "byte_lm_calibration.npz"), 32, 0.5, "topk", form)
    for batch in (1, 8):
        timed(model, written, {"context": data["context"][:batch]}, 0.5, batch, "topk", repeats)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="100 test samples, no latency")
    ap.add_argument("--out", default="docs/DYNAMIC.quality.json")
    ap.add_argument("--only", choices=["byte_lm", "digits_mlp"], help="one of the two models")
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved latency runs per point (the median speedup is reported, every run recorded)")
    ap.add_argument("--latency-only", action="store_true",
                    help="the byte LM's latency at keep 0.5 (top-k) only, no quality tables")
    args = ap.parse_args(argv)
    form = "kernel" if onnx_split.kernel_library() else "portable"
    if args.latency_only:
        return latency_only(form, args.repeats)
    cases = {
        "byte_lm": (ROOT / "byte_lm.onnx", ROOT / "byte_lm_calibration.npz", ROOT / "byte_lm_test.npz", lm_metric,
                    "held-out bits per byte (lower is better)"),
        "digits_mlp": (ROOT / "digits_mlp.onnx", ROOT / "digits_calibration.npz", ROOT / "digits_test.npz",
                       digits_metric, "test accuracy"),
    }
    rows, latency = [], []
    for label, (path, cal, test, metric, what) in cases.items():
        if args.only and label != args.only:
            continue
        model = onnx.load(str(path))
        data = dict(np.load(test))
        if args.quick:
            data = {k: v[:100] for k, v in data.items()}
        calibration = dict(np.load(cal))
        dense = metric(model, data)
        print(f"\n{label}: {what}; dense {dense:.4f}; block {args.block}; written as the {form} form")
        print("| keep | top-k, xw score | top-k, x score | top-k, xw, compensated | threshold, xw | threshold, x "
              "| static blocks | FLOPs of the dynamic sites (top-k) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for keep in KEEPS:
            row = {"model": label, "metric": what, "keep": keep, "dense": dense}
            topk, flops = dynamic(model, str(cal), args.block, keep, "topk", form)
            row["topk"], row["topk_flops"] = metric(topk, data), flops
            row["topk_x"] = metric(dynamic(model, str(cal), args.block, keep, "topk", form, "x")[0], data)
            compensated, _ = dynamic(model, str(cal), args.block, keep, "topk", form, compensate=True)
            row["topk_compensated"] = metric(compensated, data)
            thr, _ = dynamic(model, str(cal), args.block, keep, "threshold", form)
            row["threshold"] = metric(thr, data)
            row["threshold_x"] = metric(dynamic(model, str(cal), args.block, keep, "threshold", form, "x")[0], data)
            row["static"] = metric(static_baseline(model, calibration, args.block, keep), data)
            rows.append(row)
            share = "dense" if flops is None else f"{flops:.1%}"
            cells = " | ".join(f"{row[k]:.4f}" for k in ("topk", "topk_x", "topk_compensated", "threshold",
                                                          "threshold_x", "static"))
            print(f"| {keep:g} | {cells} | {share} |", flush=True)
            if label == "byte_lm" and not args.quick and keep < 1:
                for batch in (1, 8):
                    feeds = {"context": data["context"][:batch]}
                    for variant, m in (("topk", topk), ("topk_compensated", compensated), ("threshold", thr)):
                        latency.append(timed(model, m, feeds, keep, batch, variant, args.repeats))
    oracle = []
    if args.only != "digits_mlp":
        model, data = onnx.load(str(ROOT / "byte_lm.onnx")), dict(np.load(ROOT / "byte_lm_test.npz"))
        if args.quick:
            data = {k: v[:100] for k, v in data.items()}
        print("\nbyte_lm, contribution-greedy oracle: each call keeps the blocks of largest ||x_b W_b|| (skipped: 0)")
        print("| block | keep 0.5 (bits per byte) |\n|---:|---:|")
        for block in (8, 16, 32):
            oracle.append({"block": block, "keep": 0.5, "bits_per_byte": oracle_bound(model, data, block, 0.5)})
            print(f"| {block} | {oracle[-1]['bits_per_byte']:.4f} |", flush=True)
    if not args.quick:
        Path(args.out).write_text(json.dumps({"block": args.block, "form": form, "rows": rows, "latency": latency,
                                              "oracle": oracle},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
