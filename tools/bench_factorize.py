"""Factorization methods (``--factorize``) compared at equal non-zeros, written to docs/FACTORIZE.md.

- A synthetic Gaussian layer (``--width`` square, correlated activations with outlier features, as
  in issue 13): held-out ||X(W - W')|| / ||XW|| and fit time per method at 50/25/10% density.
- The shipped digits MLP (models/digits_mlp.onnx, calibrated on models/digits_calibration.npz,
  tested on models/digits_test.npz, which no step of the pass sees): test accuracy and held-out
  relative output error per method and density, every layer factorized in order.
- The shipped byte-level LM (models/byte_lm.onnx, calibrated on models/byte_lm_calibration.npz,
  tested on models/byte_lm_test.npz, which no step of the pass sees; ``--lm-only`` runs just this,
  in its own section): held-out bits per byte (``quality_dynamic.lm_metric``) and perplexity per
  byte, held-out relative output error per method and density, every layer factorized in order.
- The structured factorizations (``--structured-only``, their own section): the trained digits fc2
  alone, its held-out layer error and the latency of each form (blocks of 4 and 8, low rank) against
  the dense Gemm at batch 1/8/64; then the synthetic layer, the digits MLP and the byte LM.
- The DSF model written at 50%: file size, load time and latency against the dense original
  (ORT CPU, optimizations on).
- The encodings of one 50%-sparse 1024x1024 weight (``--encodings-only`` runs just this): dense,
  the compressed form (bitmask + values, a decoder ORT folds at load), and ONNX sparse
  initializers (COO, int64 indices): file size, load time, the ops left after ORT's optimizations,
  latency with optimizations on and off.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx_split import SplitConfig, split_model  # noqa: E402
from onnx_split.bench import Runner, round_robin  # noqa: E402
from onnx_split.chains import Chain  # noqa: E402
from onnx_split.factorization import plan_factorized  # noqa: E402
from onnx_split.factorize import METHODS, STRUCTURED, fit, fit_structured  # noqa: E402
from onnx_split.rewrite import Job, rewrite_model  # noqa: E402
from onnx_split.sites import find_sites  # noqa: E402
from onnx_split.factorize.pruning import magnitude  # noqa: E402
from onnx_split.runtime import CPU, make_session  # noqa: E402
from benchdocs import meta_lines, run_meta, write_section  # noqa: E402
from quality_dynamic import lm_metric  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DENSITIES = (0.5, 0.25, 0.1)


def _config(method: str, density: float, cal: str, **more) -> SplitConfig:
    """The pass as these tables run it: no verification or timing, and the static layout, so that a
    structured factorization is written whatever its speed (the tables measure its quality)."""
    return SplitConfig(factorize=method, density=density, calibration=cal, verify=False, bench=False,
                       layout="parallel", **more)


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
            found = fit_structured(method, weight, gram, density) if method in STRUCTURED else \
                fit(method, weight, gram, density)
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
            config = _config(method, density, cal)
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


def lm(methods, densities) -> tuple[list[str], list[str], str]:
    """The byte LM's rows (held-out bits per byte on byte_lm_test.npz), notes for sites not factorized, and
    the calibration split the pass reported."""
    model_path, cal = ROOT / "models" / "byte_lm.onnx", str(ROOT / "models" / "byte_lm_calibration.npz")
    test = dict(np.load(ROOT / "models" / "byte_lm_test.npz"))
    dense = lm_metric(onnx.load(str(model_path)), test)
    lines, notes, split = [f"| dense | {dense:.4f} | {2 ** dense:.3f} | - | - |"], [], ""
    print(lines[0], flush=True)
    for method in methods:
        for density in densities:
            config = _config(method, density, cal)
            start = time.perf_counter()
            result = split_model(str(model_path), config)
            seconds = time.perf_counter() - start
            layers = []
            for site in result.report.sites:
                if site.decision == "split" and "factorized" in site.details:
                    layers.append(f"{site.node} {site.details['factorized']['held_out']:.3f}")
                else:
                    layers.append(f"{site.node} kept")
                    notes.append(f"{method} {density:.0%}: `{site.node}` ({site.op_type} {site.shape}) "
                                 f"{site.decision}: {site.reason}")
            split = result.report.error.data
            bits = lm_metric(result.model, test)
            lines.append(f"| {method} {density:.0%} | {bits:.4f} | {2 ** bits:.3f} | "
                         f"{result.report.error.held_out:.4f} ({' / '.join(layers)}) | {seconds:.0f} s |")
            print(lines[-1], flush=True)
    return lines, notes, split


def _lm_section(methods, meta) -> list[str]:
    table, notes, split = lm(methods, DENSITIES)
    return ["## Byte-level LM (models/byte_lm.onnx), every layer factorized in order", "", *meta, "",
            "fc1 192x512, fc2 512x512, head 512x256 (the `embed` Gather is not a MatMul site); calibrated on "
            f"models/byte_lm_calibration.npz ({split}); held-out bits per byte on "
            "models/byte_lm_test.npz (4096 contexts, seen by no step of the pass), perplexity per byte = 2^bits; "
            "held-out output error ||y' - y|| / ||y|| of the logits (per layer: held-out layer error), pass time:", "",
            "| method, density | bits per byte | perplexity per byte | held-out output error (per layer) | pass time |",
            "|---|---|---|---|---|", *table, "",
            *(["Sites not factorized:", "", *(f"- {n}" for n in notes), ""] if notes else
              ["Every run factorized every site the pass found.", ""])]


def _load_and_latency(model: onnx.ModelProto, feeds: dict, repeats: int, seconds: float) -> tuple[float, float]:
    data = model.SerializeToString()
    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        session = make_session(data, CPU, "enabled", 1)
        loads.append(time.perf_counter() - start)
    return statistics.median(loads) * 1e3, _median_ms(session, feeds, seconds)


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


def _matmul(weight: np.ndarray | None, sparse: onnx.SparseTensorProto | None = None, k: int = 1024,
            n: int = 1024) -> onnx.ModelProto:
    inits = [] if weight is None else [numpy_helper.from_array(weight, "W")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "layer",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", n])], inits,
                              sparse_initializer=[] if sparse is None else [sparse])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _session(data: bytes, level: str, folded: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
    options.intra_op_num_threads = 1
    if folded is not None:
        options.optimized_model_filepath = str(folded)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _median_ms(session, feeds: dict, seconds: float) -> float:
    for _ in range(10):
        session.run(None, feeds)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def encodings(seconds: float, tmp: Path) -> list[str]:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((1024, 1024)) / 32).astype(np.float32)
    pruned = magnitude(weight, None, weight.size // 2).astype(np.float32)
    flat = np.flatnonzero(pruned.ravel())
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(pruned.ravel()[flat], "W"),
                                       numpy_helper.from_array(flat.astype(np.int64), "W_indices"), [1024, 1024])
    dense = _matmul(weight)
    config = SplitConfig(factorize="magnitude", density=0.5, min_elements=0, verify=False, bench=False,
                         input_shapes={"x": (8, 1024)})
    models = {"dense": dense, "compressed form (bitmask + values)": split_model(dense, config).model,
              "sparse initializer (COO, int64)": _matmul(None, sparse)}
    feeds = {"x": rng.standard_normal((1, 1024)).astype(np.float32)}
    lines = []
    for name, model in models.items():
        data = model.SerializeToString()
        folded = tmp / "folded.onnx"
        start = time.perf_counter()
        on = _session(data, "ENABLE_ALL", folded)
        load = (time.perf_counter() - start) * 1e3
        ops = ", ".join(n.op_type for n in onnx.load(str(folded)).graph.node)
        off = _session(data, "DISABLE_ALL")
        want = feeds["x"] @ (weight if name == "dense" else pruned)
        err = max(float(np.abs(s.run(None, feeds)[0] - want).max()) for s in (on, off))
        lines.append(f"| {name} | {len(data) / 1e6:.2f} MB | {load:.0f} ms | {ops} | {_median_ms(on, feeds, seconds):.4f} ms"
                     f" | {_median_ms(off, feeds, seconds):.4f} ms | {err:.1e} |")
    return lines


def _encodings_section(args, meta) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = encodings(args.seconds, Path(tmp))
    return ["### Encodings of one 50%-sparse 1024x1024 weight", "", *meta, "",
            "Batch 1, ORT CPU, 1 thread; ops: the graph ORT runs with ORT_ENABLE_ALL (its optimized model); "
            "max |error| against x @ W', both levels:", "",
            "| encoding | file | load (ENABLE_ALL) | ops after optimization | latency ENABLE_ALL | latency DISABLE_ALL "
            "| max abs error |", "|---|---|---|---|---|---|---|", *rows, ""]


def trained_layer(tmp: Path) -> tuple[onnx.ModelProto, str, np.ndarray]:
    """The digits MLP's fc2 alone (a trained 1024x1024 Gemm with its bias, as exported), the path of
    its calibration samples (fc1's ReLU outputs on models/digits_calibration.npz), and those outputs."""
    model = onnx.load(str(ROOT / "models" / "digits_mlp.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    pixels = np.load(ROOT / "models" / "digits_calibration.npz")["pixels"]
    hidden = np.maximum(pixels @ inits["fc1.weight"].T + inits["fc1.bias"], 0).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "fc2.weight", "fc2.bias"], ["y"], name="/fc2/Gemm", transB=1)
    graph = helper.make_graph([node], "fc2", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 1024])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 1024])],
                              [numpy_helper.from_array(inits[n], n) for n in ("fc2.weight", "fc2.bias")])
    layer = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    path = tmp / "fc2_calibration.npz"
    np.savez(path, x=hidden)
    return layer, str(path), hidden


def _written(layer: onnx.ModelProto, plan, form: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(layer)
    refused, _ = rewrite_model(copy, [Job(Chain([find_sites(copy, min_elements=0)[0]], []), plan, form)])
    if refused:
        raise RuntimeError(f"{form}: {refused[0]}")
    return copy


def structured_layer(variants, densities, batches, seconds: float) -> list[str]:
    """Per structured variant and density: the trained fc2's held-out layer error, and the latency of
    each form against the dense Gemm (ORT CPU, optimizations on, 1 thread; all models of one batch
    timed in one round robin, the median of each)."""
    import tempfile

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        layer, cal, hidden = trained_layer(Path(tmp))
        site = find_sites(layer, min_elements=0)
        for density in densities:
            models, labels = {"dense": layer}, {}
            for method, blocks in variants:
                config = _config(method, density, cal, min_elements=0, **({"blocks": blocks} if blocks else {}))
                (unit,) = plan_factorized(layer, site, config).units
                plan = unit.plan
                labels[(method, blocks)] = plan
                for form in ("factor-batched", "factor-parallel") if plan.groups > 1 else ("factor-batched",):
                    written = _written(layer, plan, form)
                    want = hidden[:8] @ plan.effective_weight(0, site[0].weight).astype(np.float64) + \
                        numpy_helper.to_array(layer.graph.initializer[1])
                    got = make_session(written.SerializeToString(), CPU, "enabled", 1).run(None, {"x": hidden[:8]})[0]
                    assert np.allclose(got, want, atol=1e-3 * np.abs(want).max()), (method, form)
                    models[(method, blocks, form)] = written
            cells = {key: [] for key in models if key != "dense"}
            for batch in batches:
                feeds = {"x": np.ascontiguousarray(np.resize(hidden, (batch, 1024)))}
                keys = list(models)
                runs = [Runner(models[k].SerializeToString(), CPU, feeds, 1) for k in keys]
                times = round_robin(runs, seconds=seconds * len(runs), warmup=20, min_rounds=50)
                medians = {k: statistics.median(t) for k, t in zip(keys, times)}
                for k in cells:
                    cells[k].append(f"{medians[k] * 1e3:.1f} us ({medians['dense'] / medians[k]:.2f}x)")
                print(batch, {str(k): round(v * 1e3, 1) for k, v in medians.items()}, flush=True)
            for (method, blocks, form), row in cells.items():
                plan = labels[(method, blocks)]
                lines.append(f"| {method}{f' --blocks {blocks}' if blocks else ''} {density:.0%} | {plan.label} | "
                             f"{plan.held_out:.3f} | {form} | {' | '.join(row)} |")
    return lines


def _structured_section(args, meta) -> list[str]:
    batches = (1, 8, 64)
    variants = [("blocks", 4), ("blocks", 8), ("lowrank", None)]
    layer = structured_layer(variants, (0.5, 0.25), batches, args.seconds)
    lines = ["## Structured factorizations (`--factorize blocks`, `--factorize lowrank`)", "", *meta, "",
             "The digits MLP's trained fc2 (1024x1024 Gemm, bias) alone, calibrated on fc1's ReLU outputs of the 269 "
             "search samples (90 held out): held-out layer error ||X(W - W')|| / ||XW||, and median latency of each "
             "form against the dense Gemm (ORT CPU, ORT_ENABLE_ALL, 1 thread, every model of a batch size timed in "
             "one round robin; speed-up over dense in brackets):", "",
             f"| method, parameters | plan | held-out layer error | form | {' | '.join(f'batch {b}' for b in batches)} |",
             "|---|---|---|---|" + "---|" * len(batches), *layer, ""]
    if not args.skip_synthetic:
        lines += [f"Synthetic Gaussian {args.width}x{args.width} layer (as above): held-out ||X(W - W')|| / ||XW|| "
                  f"at 50 / 25 / 10% of the parameters (fit time per density):", "",
                  "| method | 50% | 25% | 10% | fit time |", "|---|---|---|---|---|",
                  *synthetic(args.width, args.rows, list(STRUCTURED)), ""]
    table, _ = digits(list(STRUCTURED), DENSITIES)
    lines += ["Digits MLP, every layer factorized in order (a layer whose sides 4 does not divide stays dense under "
              "`blocks`: fc3, 1024x10), written whatever its speed (`--layout parallel`):", "",
              "| method, parameters | test accuracy | held-out output error (per layer) | pass time |",
              "|---|---|---|---|", *table, ""]
    table, notes, split = lm(list(STRUCTURED), DENSITIES)
    lines += ["Byte LM, every layer factorized in order (as above):", "",
              "| method, parameters | bits per byte | perplexity per byte | held-out output error (per layer) | pass time |",
              "|---|---|---|---|---|", *table, *notes, ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1024, help="side of the synthetic layer (1024)")
    p.add_argument("--rows", type=int, default=4096, help="calibration (and held-out) rows of the synthetic layer")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seconds", type=float, default=2.0, help="timing per model and round")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--encodings-only", action="store_true", help="only the encodings table (its own section)")
    p.add_argument("--lm-only", action="store_true", help="only the byte LM table (its own section)")
    p.add_argument("--structured-only", action="store_true",
                   help="only the structured factorizations (blocks, lowrank): trained-layer latency and error, the "
                        "synthetic layer, digits and the byte LM (its own section)")
    p.add_argument("--out", default=str(ROOT / "docs" / "FACTORIZE.md"))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    meta = meta_lines(run_meta(argv))
    if args.encodings_only:
        lines = _encodings_section(args, meta)
        write_section(Path(args.out), "bench_factorize_encodings", lines)
        print("\n".join(lines))
        return 0
    if args.structured_only:
        lines = _structured_section(args, meta)
        write_section(Path(args.out), "bench_factorize_structured", lines)
        print("\n".join(lines))
        return 0
    if args.lm_only:
        lines = _lm_section(methods, meta)
        write_section(Path(args.out), "bench_factorize_lm", lines)
        print("\n".join(lines))
        return 0
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
