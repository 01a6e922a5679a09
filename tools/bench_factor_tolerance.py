"""``--factorize METHOD --tolerance E`` on the shipped digits MLP, for docs/FACTORIZE.md ("--tolerance").

Per method and tolerance (and, with ``--densities``, per uniform density, to compare): the density chosen per site (fc1 / fc2 / fc3), the written file's bytes
against the dense model's, the relative output error on the search and held-out calibration samples
(models/digits_calibration.npz), the test accuracy on models/digits_test.npz (which no step of the
pass sees) and the pass time. Verification and timing are off (the tests verify); prints Markdown rows.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/bench_factor_tolerance.py --methods sparsegpt --tolerances 0.02,0.05,0.1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx_split import SplitConfig, split_model  # noqa: E402
from onnx_split.runtime import CPU, make_session  # noqa: E402
from benchdocs import meta_lines, run_meta  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _accuracy(model: onnx.ModelProto, test) -> float:
    session = make_session(model.SerializeToString(), CPU, "enabled", 1)
    return 100.0 * float((session.run(None, {"pixels": test["pixels"]})[0].argmax(axis=1) == test["labels"]).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="sparsegpt")
    ap.add_argument("--tolerances", default="0.02,0.05,0.1")
    ap.add_argument("--densities", default="", help="also every site at each of these densities (--density D), to compare")
    args = ap.parse_args(argv)
    model_path, cal = ROOT / "models" / "digits_mlp.onnx", str(ROOT / "models" / "digits_calibration.npz")
    test = np.load(ROOT / "models" / "digits_test.npz")
    dense = onnx.load(str(model_path))
    lines = [*meta_lines(run_meta(argv)), "",
             "| method, --tolerance | density fc1 / fc2 / fc3 | file (vs dense) | output error search / held out "
             "| test accuracy | pass time |", "|---|---|---|---|---|---|",
             f"| dense | - | {dense.ByteSize():,} B | - | {_accuracy(dense, test):.2f}% | - |"]
    print("\n".join(lines), flush=True)
    for method in args.methods.split(","):
        budgets = [("tolerance", float(t)) for t in args.tolerances.split(",") if t] + \
            [("density", float(d)) for d in args.densities.split(",") if d]
        for option, value in budgets:
            config = SplitConfig(factorize=method, calibration=cal, verify=False, bench=False, **{option: value})
            start = time.perf_counter()
            result = split_model(str(model_path), config)
            seconds = time.perf_counter() - start
            report = result.report
            densities = " / ".join(f"{s.details['factorized']['density']:.0%}" if s.decision == "split" else "dense"
                                   for s in report.sites)
            size = result.model.ByteSize()
            line = (f"| {method} {'' if option == 'tolerance' else '--density '}{value:g} | {densities} | {size:,} B ({size / dense.ByteSize():.2f}x) | "
                    f"{report.error.search:.4f} / {report.error.held_out:.4f} | {_accuracy(result.model, test):.2f}% | "
                    f"{seconds:.0f} s |")
            lines.append(line)
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
