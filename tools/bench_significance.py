"""Lossy splitting of real trained models: FLOPs, held-out accuracy, output error and latency.

For each model (the digits MLPs of models/, see models/README.md) this measures:

1. **Retained significance** per site at 2/4/8/16 parts for metis, spectral co-clustering and a
   random balanced partition (activation-aware scores from the calibration samples), and the
   partitioners' run time.
2. **The table**: for each ``--flops`` budget, applied to every site or to fc2 only (the big
   layer, via ``--min-elements``), the default partitioner (metis), the other one
   (spectral), static tiles and a random balanced partition, each written in the batched layout,
   and unstructured magnitude pruning at metis's per-site density (an accuracy reference: ORT runs
   it as a dense MatMul, so it gains no speed). Columns: the whole model's FLOPs fraction, test
   accuracy, relative output error ||y'-y||/||y|| on the test split, and the latency ratio
   original/rewritten in ORT CPU at batch 1 and 256 (interleaved, medians, 1 thread).
3. **Tolerance rows**: ``--tolerance E`` with the default partitioner and ``--layout auto``; the
   error on the search samples, on the held-out calibration samples the search never saw, and on
   the test split.

4. **Pass time** of the lossy analysis (significance, partitions, the budget or the tolerance
   search; no verification or timing) on a 3-layer MLP 4096 wide (192 MB fp32) whose weights are 8
   blocks under hidden permutations plus noise of 1% of the blocks' mean |w|; written to its own
   section, ``bench_significance_pass`` (``--pass-time-only`` runs just this).

The test split is used by nothing but this table. Run from the repository root:

    .venv/bin/python tools/bench_significance.py --quick --out /tmp/significance.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx_split  # noqa: E402
from onnx_split.bench import benchmark_models  # noqa: E402
from onnx_split.pipeline import survey_model  # noqa: E402
from onnx_split.pruned import pruned_model, relative_error  # noqa: E402
from onnx_split.report import percent  # noqa: E402
from onnx_split.runtime import CPU, make_session  # noqa: E402
from onnx_split.sites import find_sites  # noqa: E402
from benchdocs import meta_lines, parse_with_presets, run_meta, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["models/digits_mlp.onnx", "models/digits_block.onnx"]
FULL = dict(flops=[0.5, 0.25, 0.125], tolerances=[0.01, 0.05, 0.2, 0.5], seconds=2.0, tune_seconds=5.0,
            batches=(1, 256), levels=(2, 4, 8, 16), pass_width=4096)
QUICK = dict(flops=[0.5], tolerances=[0.05], seconds=0.1, tune_seconds=1.0, batches=(1, 8), levels=(2, 4),
             pass_width=256)
PASS_BUDGETS = [dict(tolerance=0.05), dict(keep=0.9), dict(flops=0.125), dict(parts=8)]
SCOPES = [("every site", 4096), ("fc2 only", 100_000)]
"""Which sites a budget applies to: ``--min-elements`` 4096 (the default: fc1, fc2 and fc3) or
100000 (only the 1024 x 1024 fc2, 93% of the FLOPs; fc1 and fc3 are fully connected in both
models, see the retained-significance table)."""
METHODS = [("metis", "default", "batched"), ("spectral", "other partitioner", "batched"),
           ("tiles", "static 64x64 tiles", "parallel"), ("random", "random balanced", "batched")]
"""(partitioner, row label, layout): tiles in the parallel layout, where each output block reads
only its kept input tiles (the batched layout pads every block to the one reading the most)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one budget, short timings: a smoke run")
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--calibration", default="models/digits_calibration.npz")
    p.add_argument("--test", default="models/digits_test.npz")
    p.add_argument("--out", default="docs/SIGNIFICANCE.md", help="Markdown output; raw rows go to <out>.json")
    p.add_argument("--pass-time-only", action="store_true", help="only measure the pass time (section 4)")
    args = parse_with_presets(p, argv, FULL, QUICK)
    return args


class TestSet:
    """The digits test split, and what the original model does on it."""

    def __init__(self, path: str, model: onnx.ModelProto):
        with np.load(path) as data:
            self.pixels, self.labels = data["pixels"], data["labels"]
        self.reference = self.run(model)

    def run(self, model: onnx.ModelProto) -> np.ndarray:
        session = make_session(model.SerializeToString(), CPU, "enabled", 1)
        return session.run(None, {session.get_inputs()[0].name: self.pixels})[0]

    def score(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(test accuracy in %, relative output error against the original)."""
        logits = self.run(model)
        return 100.0 * float((logits.argmax(axis=1) == self.labels).mean()), relative_error([self.reference], [logits])


def model_flops(report) -> float:
    before = sum(s.flops_before for s in report.sites if s.flops_before)
    after = sum(s.flops_after if s.decision == "split" else s.flops_before for s in report.sites if s.flops_before)
    return after / before


def latency(original: onnx.ModelProto, model: onnx.ModelProto, batches, seconds: float) -> dict[int, float]:
    rng = np.random.default_rng(0)
    ratios = {}
    for batch in batches:
        feeds = {"pixels": rng.random((batch, 64), dtype=np.float32)}
        entry = benchmark_models(original, model, feeds, providers=[CPU], seconds=seconds, threads=1)[0]
        ratios[batch] = entry.speedup
    return ratios


def split_row(path: str, original, test: TestSet, args, label: str, **options) -> dict:
    config = onnx_split.SplitConfig(calibration=args.calibration, providers=("cpu",), bench=False,
                                    tune_seconds=args.tune_seconds, batches=args.batches, **options)
    start = time.perf_counter()
    result = onnx_split.split_model(path, config)
    seconds = time.perf_counter() - start
    report = result.report
    accuracy, error = test.score(result.model)
    split = [s for s in report.sites if s.decision == "split"]
    row = dict(method=label, options={k: v for k, v in options.items()}, flops=model_flops(report),
               accuracy=accuracy, test_error=error, pass_seconds=seconds,
               verified=report.verification_passed, layouts=sorted({s.layout for s in split}),
               sites={s.node: dict(parts=s.parts, retained=s.retained, flops=s.flops_after / s.flops_before)
                      for s in split},
               search_error=report.error.search if report.error else None,
               held_out_error=report.error.held_out if report.error else None,
               held_out_samples=report.error.held_out_samples if report.error else None,
               met=report.error.met if report.error else None)
    row["latency"] = latency(original, result.model, args.batches, args.seconds) if split else {}
    return row, result


def magnitude_row(original: onnx.ModelProto, test: TestSet, densities: dict[str, float]) -> dict:
    """Unstructured pruning: each site keeps its largest |w| at the given density (fraction kept)."""
    sites = find_sites(original)
    masks = {}
    for i, site in enumerate(sites):
        if site.name in densities and site.weight is not None:
            w = np.abs(site.weight.astype(np.float64))
            keep = int(round(densities[site.name] * w.size))
            cut = np.partition(w.ravel(), w.size - keep)[w.size - keep] if keep else np.inf
            masks[i] = w >= cut
    accuracy, error = test.score(pruned_model(original, sites, masks))
    kept = {s.name: float(masks[i].mean()) for i, s in enumerate(sites) if i in masks}
    return dict(method="unstructured magnitude", options={}, flops=None, accuracy=accuracy, test_error=error,
                latency={}, sites={k: dict(density=v) for k, v in kept.items()})


def retained_rows(path: str, args) -> list[dict]:
    rows = []
    for method in ("metis", "spectral", "random"):
        config = onnx_split.SplitConfig(partitioner=method, calibration=args.calibration, max_parts=max(args.levels))
        start = time.perf_counter()
        survey = survey_model(path, config)
        seconds = time.perf_counter() - start
        for site in survey:
            for level in site.levels:
                if level["level"] in args.levels:
                    rows.append(dict(method=method, site=site.node, parts=level["level"], retained=level["retained"],
                                     seconds=seconds))
    return rows


def run_model(path: str, args) -> dict:
    original = onnx.load(path)
    test = TestSet(args.test, original)
    dense_accuracy, _ = test.score(original)
    out = dict(model=Path(path).name, dense_accuracy=dense_accuracy, retained=retained_rows(path, args), budgets=[],
               tolerances=[])
    for scope, min_elements in SCOPES:
        for flops in args.flops:
            rows = []
            for method, label, layout in METHODS:
                row, result = split_row(path, original, test, args, label, partitioner=method, flops=flops,
                                        layout=layout, min_elements=min_elements)
                rows.append(row)
                if method == "metis":
                    density = {node: site["flops"] for node, site in row["sites"].items()}
                    auto_row, _ = split_row(path, original, test, args, "default, --layout auto",
                                            partitioner=method, flops=flops, layout="auto", min_elements=min_elements)
            rows.append(auto_row)
            rows.append(magnitude_row(original, test, density))
            out["budgets"].append(dict(scope=scope, flops=flops, rows=rows))
            print(f"{out['model']} {scope} --flops {flops}: done", file=sys.stderr)
    for tolerance in args.tolerances:
        row, _ = split_row(path, original, test, args, "default, --layout auto", tolerance=tolerance, layout="auto")
        out["tolerances"].append(dict(tolerance=tolerance, row=row))
    return out


def markdown(results: list[dict], meta: dict, args) -> list[str]:
    lines = ["## Lossy splitting of trained models (`tools/bench_significance.py`)", "", *meta_lines(meta), "",
             "Models, data and training: models/README.md. Accuracy and output error are on the digits test "
             "split, which no step of the pass sees; calibration (search + held out) is "
             f"`{args.calibration}`. Latency: original / rewritten median in ORT CPU, 1 thread, interleaved "
             "(> 1 means the rewrite is faster). FLOPs: the whole model's multiply-adds per sample after the "
             "rewrite (layout padding included) over the original's. \"every site\" rows apply the budget to fc1, "
             "fc2 and fc3 (the default `--min-elements 4096`); \"fc2 only\" rows pass `--min-elements 100000`, so "
             "only the 1024×1024 fc2 is a candidate.", ""]
    for res in results:
        lines += [f"### {res['model']} (dense test accuracy {res['dense_accuracy']:.2f}%)", ""]
        lines += ["Retained activation-aware significance per site (the default must beat random at every G):", "",
                  "| site | parts | metis | spectral | random |", "|---|---|---|---|---|"]
        by = {(r["method"], r["site"], r["parts"]): r["retained"] for r in res["retained"]}
        for site, parts in sorted({(r["site"], r["parts"]) for r in res["retained"]}, key=lambda t: (t[0], t[1])):
            cells = [percent(by[(m, site, parts)]) if (m, site, parts) in by else "-"
                     for m in ("metis", "spectral", "random")]
            lines.append(f"| {site} | {parts} | " + " | ".join(cells) + " |")
        lines += ["", "| budget | method | layout | FLOPs | test accuracy | rel. error (test) | "
                      + " | ".join(f"latency ratio b{b}" for b in args.batches) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(args.batches)]
        for budget in res["budgets"]:
            for row in budget["rows"]:
                lines.append(_row(f"{budget['scope']}: --flops {budget['flops']}", row, args))
        for entry in res["tolerances"]:
            lines.append(_row(f"every site: --tolerance {entry['tolerance']}", entry["row"], args))
        lines += ["", "Tolerance search: error on the samples it searched, on held-out calibration samples it never "
                      "saw, and on the test split:", "",
                  "| --tolerance | FLOPs | search error | held-out error | held out within? | test error | "
                  "test accuracy |", "|---|---|---|---|---|---|---|"]
        for entry in res["tolerances"]:
            row = entry["row"]
            lines.append(f"| {entry['tolerance']} | {100 * row['flops']:.1f}% | {row['search_error']:.4f} | "
                         f"{row['held_out_error']:.4f} ({row['held_out_samples']} samples) | "
                         f"{'yes' if row['met'] else 'NO'} | {row['test_error']:.4f} | {row['accuracy']:.2f}% |")
        lines.append("")
    return lines


def _row(budget: str, row: dict, args) -> str:
    flops = "-" if row["flops"] is None else f"{100 * row['flops']:.1f}%"
    layout = ", ".join(row.get("layouts") or []) or ("dense kernel" if row["flops"] is None else "nothing split")
    ratios = [f"{row['latency'][b]:.2f}x" if row["latency"].get(b) else "-" for b in args.batches]
    return (f"| {budget} | {row['method']} | {layout} | {flops} | {row['accuracy']:.2f}% | {row['test_error']:.4f} | "
            + " | ".join(ratios) + " |")


def pass_times(args) -> list[dict]:
    """Seconds of split_model's lossy analysis and rewrite (no verification, no timing) per budget."""
    sys.path.insert(0, str(ROOT / "tests"))
    from bench_chains import mlp
    from builders import chained_blocks

    rng = np.random.default_rng(0)
    weights = chained_blocks(rng, [args.pass_width] * 4, 8)
    weights = [w + 0.01 * float(np.abs(w[w != 0]).mean()) * rng.standard_normal(w.shape).astype(np.float32)
               for w in weights]
    model = mlp(weights, rng, "noisy_blocks")
    rows = []
    for budget in PASS_BUDGETS:
        config = onnx_split.SplitConfig(layout="batched", bench=False, verify=False, **budget)
        start = time.perf_counter()
        result = onnx_split.split_model(model, config)
        seconds = time.perf_counter() - start
        error = result.report.error
        rows.append(dict(budget=config.budget, seconds=seconds, parts=[s.parts for s in result.report.sites],
                         retained=[s.retained for s in result.report.sites],
                         evaluations=error.evaluations if error else None))
    return rows


def pass_markdown(rows: list[dict], meta: dict, args) -> list[str]:
    mb = 3 * args.pass_width ** 2 * 4 / 2 ** 20
    lines = ["## Pass time of lossy splitting (`tools/bench_significance.py --pass-time-only`)", "",
             *meta_lines(meta), "",
             f"A 3-layer MLP {args.pass_width} wide ({mb:.0f} MB fp32), each weight 8 blocks under hidden "
             "permutations plus noise of 1% of the blocks' mean |w|; the tolerance search runs on seeded random "
             "calibration samples (48 searched, 16 held out). "
             "Seconds of `split_model` with verification and timing off (significance, partitions, the budget "
             "or the tolerance search, rewrite, checker).", "",
             "| budget | seconds | parts per site | retained per site | model runs of the search |",
             "|---|---:|---|---|---:|"]
    for r in rows:
        retained = ", ".join("-" if v is None else f"{100 * v:.1f}%" for v in r["retained"])
        lines.append(f"| `{r['budget']}` | {r['seconds']:.1f} | {', '.join(map(str, r['parts']))} | {retained} | "
                     f"{r['evaluations'] if r['evaluations'] is not None else '-'} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = run_meta(argv)
    out = Path(args.out)
    if not args.pass_time_only:
        results = [run_model(str(ROOT / m) if not Path(m).is_absolute() else m, args) for m in args.models]
        write_section(out, "bench_significance", markdown(results, meta, args))
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=str))
    write_section(out, "bench_significance_pass", pass_markdown(pass_times(args), meta, args))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
