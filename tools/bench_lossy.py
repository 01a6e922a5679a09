"""Lossy splitting of ordinarily trained models with refit and the linear-time search.

Rows (each a real ``split_model`` run with verification and interleaved timing, 1 thread):

- lossy chains: a 4-layer digits MLP trained for one block structure in fc2 and fc3 (with
  ``--torch-python``), fc2 -> fc3 split jointly and one by one, timed against each other.
- ``models/digits_mlp.onnx`` (plain training, shipped): ``--tolerance`` 0.05 and 0.03, refit and
  ``--no-refit``; test accuracy on ``models/digits_test.npz`` (which no step of the pass sees).
- a scikit-learn MLPClassifier (512, 512) on digits (tools/make_sklearn_mlp.py; needs
  scikit-learn and skl2onnx, else the row says so): ``--tolerance 0.05``, calibrated on the 359
  calibration rows, and on those with the 1,078 rows it was trained on.
- magika's shipped model (the ``magika`` package, used here only; else the row says so): features of
  real files (this Python's standard library: sources, data files, compiled modules), half as
  calibration, half held out; ``--tolerance 0.05``; label agreement with the original on the
  held-out files.
- pass time of ``--dry-run`` and ``--tolerance 0.05`` on a BERT-base-sized encoder
  (tools/make_bert.py, 72 sites; ``--bert-layers`` makes it smaller) with 32 calibration
  sequences of 32 tokens, each under a wall-clock limit.

    .venv/bin/python tools/bench_lossy.py [--quick] [--out docs/SIGNIFICANCE.md] [--skip chains,bert --print-only]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx_split import SplitConfig, split_model  # noqa: E402
from onnx_split.runtime import CPU, make_session  # noqa: E402
from benchdocs import meta_lines, run_meta, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _accuracy(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray, name: str, output: int = 0) -> float:
    session = make_session(model.SerializeToString(), CPU, "enabled", 1)
    out = session.run(None, {name: x})[output]
    pred = out if out.ndim == 1 else out.argmax(axis=1)
    return 100.0 * float((pred == labels).mean())


def _row(label: str, model_path: Path, config: SplitConfig, score) -> str:
    start = time.perf_counter()
    result = split_model(str(model_path), config)
    seconds = time.perf_counter() - start
    r = result.report
    split = [f"{s.node} ({s.parts} parts)" for s in r.sites if s.decision == "split"]
    flops = r.model["after"]["flops_per_row"] / max(r.model["before"]["flops_per_row"], 1)
    speed = {e.inputs: e.speedup for e in r.latency if e.status == "measured"}
    ratio = " / ".join(f"{speed[k]:.2f}x" for k in speed) or "-"
    err = f"{r.error.held_out:.4f}" if r.error is not None and r.error.held_out is not None else "-"
    return (f"| {label} | {', '.join(split) or 'nothing'} | {flops:.1%} | {err} | {score(result.model)} | "
            f"{ratio} | {seconds:.0f} s |")


def digits(args) -> list[str]:
    cal, test = ROOT / "models" / "digits_calibration.npz", np.load(ROOT / "models" / "digits_test.npz")
    model = ROOT / "models" / "digits_mlp.onnx"
    dense = _accuracy(onnx.load(str(model)), test["pixels"], test["labels"], "pixels")
    score = lambda m: f"{_accuracy(m, test['pixels'], test['labels'], 'pixels'):.2f}% (dense {dense:.2f}%)"  # noqa: E731
    rows = []
    for tol in args.tolerances:
        for refit in (True, False):
            config = SplitConfig(tolerance=tol, calibration=str(cal), refit=refit, batches=(1, 256),
                                 bench_seconds=args.seconds, tune_seconds=args.tune_seconds)
            rows.append(_row(f"digits_mlp --tolerance {tol:g}{'' if refit else ' --no-refit'}", model, config, score))
    return rows


def sklearn_mlp(args, tmp: Path) -> list[str]:
    try:
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        return ["| scikit-learn MLP | not measured: scikit-learn and skl2onnx are not installed | | | | | |"]
    path = tmp / "sklearn_mlp.onnx"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_sklearn_mlp.py"), str(path)], check=True,
                   capture_output=True)
    test = np.load(path.with_name("sklearn_mlp_test.npz"))
    name = onnx.load(str(path)).graph.input[0].name
    dense = _accuracy(onnx.load(str(path)), test[name], test["labels"], name)
    score = lambda m: f"{_accuracy(m, test[name], test['labels'], name):.2f}% (dense {dense:.2f}%)"  # noqa: E731
    rows = []
    for data, what in (("calibration", "359 calibration samples"), ("seen", "1437 training + calibration samples")):
        config = SplitConfig(tolerance=0.05, calibration=str(path.with_name(f"sklearn_mlp_{data}.npz")),
                             batches=(1, 256), bench_seconds=args.seconds, tune_seconds=args.tune_seconds)
        rows.append(_row(f"scikit-learn MLP (512, 512) --tolerance 0.05, {what}", path, config, score))
    return rows


def magika_model(args, tmp: Path) -> list[str]:
    try:
        import magika
    except ImportError:
        return ["| magika | not measured: the magika package is not installed | | | | | |"]
    m = magika.Magika()
    files = sorted(p for p in Path(np.__file__).parents[2].rglob("*") if p.is_file() and p.stat().st_size > 0)
    files = files[:: max(1, len(files) // args.magika_files)][: args.magika_files]
    rows = []
    for path in files:
        _, features = m._get_result_or_features_from_path(path)
        if features is None:
            continue
        cfg = m._model_config
        sample = list(features.beg[:cfg.beg_size]) + list(features.mid[:cfg.mid_size]) + list(features.end[-cfg.end_size:] if cfg.end_size else [])
        rows.append(sample)
    x = np.asarray(rows, dtype=np.int32)
    model_path = next(Path(magika.__file__).parent.glob("models/*/model.onnx"))
    model = onnx.load(str(model_path))
    name = model.graph.input[0].name
    half = len(x) // 2
    np.savez(tmp / "magika_cal.npz", **{name: x[:half]})
    original = make_session(model.SerializeToString(), CPU, "enabled", 1).run(None, {name: x[half:]})[0]
    labels = original.argmax(axis=1) if original.ndim == 2 else original
    score = lambda out: f"{_accuracy(out, x[half:], labels, name):.1f}% label agreement on {len(x) - half} files"  # noqa: E731
    config = SplitConfig(tolerance=0.05, calibration=str(tmp / "magika_cal.npz"), batches=(1, 64),
                         bench_seconds=args.seconds, tune_seconds=args.tune_seconds)
    return [_row(f"magika ({model_path.parent.name}) --tolerance 0.05, {half} files as calibration", model_path,
                 config, score)]


def chains(args, tmp: Path) -> list[str]:
    """The lossy-chain row: a 4-layer digits MLP whose fc2 and fc3 were trained for one block
    structure (tools/train_digits_chain.py, run with ``--torch-python``); fc2 and fc3 split into 8
    parts jointly and one by one, the two rewrites timed against each other, interleaved."""
    if not args.torch_python:
        return ["| lossy chain | not measured: give --torch-python (an interpreter with torch) to train the model |"]
    from onnx_split.bench import benchmark_models
    path = tmp / "digits_chain.onnx"
    subprocess.run([args.torch_python, str(ROOT / "tools" / "train_digits_chain.py"), str(path)], check=True,
                   capture_output=True)
    test = np.load(ROOT / "models" / "digits_test.npz")
    cal = str(ROOT / "models" / "digits_calibration.npz")
    runs = {}
    for joined in (True, False):
        config = SplitConfig(parts=8, include=("/fc2/*", "/fc3/*"), calibration=cal, layout="batched",
                             chains=joined, bench=False)
        runs[joined] = split_model(str(path), config)
    lines = []
    for joined, result in runs.items():
        r = result.report
        gathers = sum(n.op_type == "Gather" for n in result.model.graph.node)
        acc = _accuracy(result.model, test["pixels"], test["labels"], "pixels")
        lines.append(f"| {'jointly (one chain)' if joined else 'one by one (--no-chains)'} | "
                     f"{', '.join(str(len(c.sites)) + ' layer(s)' for c in r.chains)} | {gathers} | "
                     f"{r.error.held_out:.2g} | {acc:.2f}% |")
    ratios = []
    for batch in (1, 256):
        feeds = {"pixels": test["pixels"][:batch] if batch <= len(test["pixels"]) else
                 np.resize(test["pixels"], (batch, 64))}
        entry = benchmark_models(runs[False].model, runs[True].model, feeds, providers=[CPU],
                                 seconds=args.seconds * 2)[0]
        ratios.append(f"batch {batch}: {entry.speedup:.2f}x")
    lines.append(f"| chain over one-by-one, interleaved | | | | {', '.join(ratios)} |")
    return lines


def bert(args, tmp: Path) -> list[str]:
    path, cal = tmp / "bert.onnx", tmp / "bert_cal.npz"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_bert.py"), str(path), "--layers", str(args.bert_layers),
                    "--calibration", str(cal), "--samples", "32", "--seq", "32"], check=True, capture_output=True)
    lines = []
    for what, extra in (("--dry-run", ["--dry-run"]), ("--tolerance 0.05", [str(tmp / "bert.split.onnx"),
                                                                             "--tolerance", "0.05", "--no-bench"])):
        command = [sys.executable, "-m", "onnx_split", str(path), *extra, "--calibration", str(cal)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.bert_limit, cwd=ROOT)
            took = f"{time.perf_counter() - start:.0f} s (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            took = f"did not finish within {args.bert_limit:.0f} s"
        lines.append(f"| {args.bert_layers}-layer BERT-base-width encoder, {6 * args.bert_layers} sites | {what} | {took} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one tolerance, short timings, a 1-layer encoder")
    p.add_argument("--out", default=str(ROOT / "docs" / "SIGNIFICANCE.md"))
    p.add_argument("--bert-layers", type=int, default=None)
    p.add_argument("--bert-limit", type=float, default=900.0, help="wall-clock limit per encoder run (s)")
    p.add_argument("--torch-python", default=None, help="an interpreter with torch, to train the lossy-chain model")
    p.add_argument("--skip", default="", help="comma-separated groups not to run: chains, bert")
    p.add_argument("--print-only", action="store_true",
                   help="print the rows; leave the section in --out as it is (a partial run)")
    args = p.parse_args(argv)
    args.tolerances = [0.05] if args.quick else [0.05, 0.03]
    args.seconds, args.tune_seconds = (0.2, 1.0) if args.quick else (2.0, 10.0)
    args.magika_files = 40 if args.quick else 400
    args.bert_layers = args.bert_layers or (1 if args.quick else 12)
    header = "| run | split | FLOPs | held-out rel. error | quality | latency ratio (batches) | pass time |"
    with tempfile.TemporaryDirectory() as tmp:
        rows = digits(args) + sklearn_mlp(args, Path(tmp)) + magika_model(args, Path(tmp))
        skip = set(filter(None, args.skip.split(",")))
        chain_rows = ["| lossy chain | not run (--skip chains) |"] if "chains" in skip else chains(args, Path(tmp))
        timing = ["| encoder | not run (--skip bert) | |"] if "bert" in skip else bert(args, Path(tmp))
    lines = ["## Lossy splitting with refit on ordinarily trained models (`tools/bench_lossy.py`)", "",
             *meta_lines(run_meta(argv)), "",
             "Latency: original / rewritten median, ORT CPU, 1 thread, interleaved (> 1: the rewrite is faster); "
             "FLOPs: the whole model's MatMul/Gemm FLOPs per row after / before.", "",
             header, "|---|---|---|---|---|---|---|", *rows, "",
             "Lossy chains: a 4-layer digits MLP (tools/train_digits_chain.py) whose fc2 and fc3 were trained for "
             "one block structure, `--parts 8 --include '/fc2/*' --include '/fc3/*' --layout batched`:", "",
             "| fc2, fc3 split | units | Gathers | held-out rel. error | test accuracy / latency ratio |",
             "|---|---|---|---|---|", *chain_rows, "",
             "Pass time on the encoder (no timing of the result):", "", "| model | run | wall time |", "|---|---|---|",
             *timing]
    if not args.print_only:
        write_section(Path(args.out), "bench_lossy", lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
