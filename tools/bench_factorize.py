"""Factorization methods (``--factorize``) compared at equal non-zeros, written to docs/FACTORIZE.md.

- A synthetic Gaussian layer (``--width`` square, correlated activations with outlier features, as
  in issue 13): held-out ||X(W - W')|| / ||XW|| and fit time per method at 50/25/10% density.
- The shipped digits MLP (models/digits_mlp.onnx, calibrated on models/digits_calibration.npz,
  tested on models/digits_test.npz, which no step of the pass sees): test accuracy and held-out
  relative output error per method and density, every layer factorized in order.
- The DSF model written at 50%: file size, load time and latency against the dense original
  (ORT CPU, optimizations on).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx_split import SplitConfig, split_model  # noqa: E402
from onnx_split.factorize import METHODS, fit  # noqa: E402
from onnx_split.runtime import CPU, make_session  # noqa: E402
from benchdocs import meta_lines, run_meta, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DENSITIES = (0.5, 0.25, 0.1)


def gaussian_layer(k: int, rows: int, seed: int = 0):
    """The issue's synthetic layer: W [k, k], activations mixed by a dense matrix over an identity,
    k/32 outlier features ten times larger; calibration and held-out samples drawn alike."""
    rng = np.random.default_rng(seed)
    mix = 0.6 * rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    scale = np.ones(k)
    scale[rng.choice(k, max(1, k // 32), replace=False)] = 10.0
    weight = rng.standard_normal((k, k)) / np.sqrt(k)
    draw = lambda: (rng.standard_normal((rows, k)) @ mix) * scale  # noqa: E731
    return weight, draw(), draw()


def synthetic(width: int, rows: int, methods) -> list[str]:
    weight, cal, held = gaussian_layer(width, rows)
    gram, held_gram = cal.T @ cal, held.T @ held
    lines = []
    for method in methods:
        cells, seconds = [], []
        for density in DENSITIES:
            start = time.perf_counter()
            found = fit(method, weight, gram, density)
            seconds.append(time.perf_counter() - start)
            cells.append(f"{found.error(weight, held_gram):.3f}")
        lines.append(f"| {method} | {' | '.join(cells)} | {' / '.join(f'{s:.1f}' for s in seconds)} s |")
    return lines


def _accuracy(model: onnx.ModelProto, test) -> float:
    session = make_session(model.SerializeToString(), CPU, "enabled", 1)
    return 100.0 * float((session.run(None, {"pixels": test["pixels"]})[0].argmax(axis=1) == test["labels"]).mean())


def digits(methods, densities) -> tuple[list[str], onnx.ModelProto | None]:
    """The table's rows, and the DSF model at 50% (None unless measured)."""
    model_path, cal = ROOT / "models" / "digits_mlp.onnx", str(ROOT / "models" / "digits_calibration.npz")
    test = np.load(ROOT / "models" / "digits_test.npz")
    dense = _accuracy(onnx.load(str(model_path)), test)
    lines, dsf_half = [f"| dense | {dense:.2f}% | - | - |"], None
    for method in methods:
        for density in densities:
            config = SplitConfig(factorize=method, density=density, calibration=cal, verify=False, bench=False)
            start = time.perf_counter()
            result = split_model(str(model_path), config)
            seconds = time.perf_counter() - start
            layers = " / ".join(f"{s.details['factorized']['held_out']:.3f}" for s in result.report.sites
                                if s.decision == "split")
            lines.append(f"| {method} {density:.0%} | {_accuracy(result.model, test):.2f}% | "
                         f"{result.report.error.held_out:.4f} ({layers}) | {seconds:.0f} s |")
            if (method, density) == ("dsf", 0.5):
                dsf_half = result.model
    return lines, dsf_half


def _load_and_latency(model: onnx.ModelProto, feeds: dict, repeats: int, seconds: float) -> tuple[float, float]:
    data = model.SerializeToString()
    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        session = make_session(data, CPU, "enabled", 1)
        loads.append(time.perf_counter() - start)
    for _ in range(20):
        session.run(None, feeds)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(loads) * 1e3, statistics.median(times) * 1e3


def written_dsf(model: onnx.ModelProto, seconds: float) -> list[str]:
    dense = onnx.load(str(ROOT / "models" / "digits_mlp.onnx"))
    lines = []
    for batch in (1, 256):
        feeds = {"pixels": np.random.default_rng(0).standard_normal((batch, 64)).astype(np.float32)}
        rows = []
        for _ in range(3):  # interleaved rounds, the median of each
            rows.append((_load_and_latency(dense, feeds, 3, seconds), _load_and_latency(model, feeds, 3, seconds)))
        (dl, dt), (fl, ft) = [tuple(statistics.median(r[i][j] for r in rows) for j in range(2)) for i in range(2)]
        lines.append(f"| {batch} | {dense.ByteSize() / 1e6:.2f} MB | {model.ByteSize() / 1e6:.2f} MB "
                     f"({model.ByteSize() / dense.ByteSize():.2f}x) | {dl:.1f} / {fl:.1f} ms | {dt:.4f} / {ft:.4f} ms "
                     f"({ft / dt:.3f}x) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1024, help="side of the synthetic layer (1024)")
    p.add_argument("--rows", type=int, default=4096, help="calibration (and held-out) rows of the synthetic layer")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seconds", type=float, default=2.0, help="timing per model and round")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "FACTORIZE.md"))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    meta = meta_lines(run_meta(argv))
    lines = ["## Factorization at equal non-zeros (`tools/bench_factorize.py`)", "", *meta, ""]
    if not args.skip_synthetic:
        lines += [f"Synthetic Gaussian {args.width}x{args.width} layer, correlated activations with outlier "
                  f"features, {args.rows} calibration rows and as many held out; held-out "
                  f"||X(W - W')|| / ||XW|| (fit time per density):", "",
                  "| method | 50% | 25% | 10% | fit time |", "|---|---|---|---|---|",
                  *synthetic(args.width, args.rows, methods), ""]
    table, model = digits(methods, DENSITIES)
    lines += ["Digits MLP (64 -> 1024 -> 1024 -> 10, every layer factorized in order, 269 calibration samples, "
              "90 held out): test accuracy on the 360 test samples, held-out relative output error (per layer: held-out "
              "layer error), pass time:", "",
              "| method, density | test accuracy | held-out output error (fc1 / fc2 / fc3) | pass time |",
              "|---|---|---|---|", *table, ""]
    if model is not None:
        lines += ["The DSF model at 50% as written (compressed factors), against the dense original; ORT CPU, "
                  "optimizations on (ORT_ENABLE_ALL), 1 thread; load: session creation, median of 3x3; "
                  "latency: median run:", "",
                  "| batch | dense file | DSF file | load dense / DSF | latency dense / DSF |", "|---|---|---|---|---|",
                  *written_dsf(model, args.seconds), ""]
    write_section(Path(args.out), "bench_factorize", lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
