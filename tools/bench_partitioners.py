"""Benchmark the lossy balanced partitioners: retained significance and run time, metis vs spectral.

Matrices (scores = |W|):

- planted: W has G dense blocks (entries N(0, 1)) under hidden row/column permutations and
  ``noise * N(0, 1)`` everywhere else, for noise 0.1, 0.5, 1 and 2, at 1024 x 1024 and 4096 x 4096;
- dense: W is N(0, 1) with no structure, 1024 x 1024;

each split into G = 2, 4, 8, 16 parts by ``metis_blocks``, ``spectral_blocks`` and the
``random_blocks`` baseline. *Retained* is the fraction of sum |W| inside the parts; *planted* is
that of the hidden blocks themselves. Seconds: median of 3 calls each.

Writes section ``bench_partitioners`` of docs/PARTITIONERS.md and prints a one-line verdict.
Run from the repository root:

    .venv/bin/python tools/bench_partitioners.py --quick --out /tmp/partitioners.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnx_split.partition import metis_blocks, random_blocks, retained, spectral_blocks  # noqa: E402
from onnx_split.partition.balance import index_labels, plan_from_labels  # noqa: E402
from benchdocs import meta_lines, parse_with_presets, run_meta, write_section  # noqa: E402

FULL = dict(sizes=[1024, 4096], noises=[0.1, 0.5, 1.0, 2.0], dense_size=1024, groups=[2, 4, 8, 16])
QUICK = dict(sizes=[256], noises=[0.5], dense_size=256, groups=[2, 4])
TIMED = {"metis": metis_blocks, "spectral": spectral_blocks}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one noise level, G 2 and 4")
    p.add_argument("--repeats", type=int, default=3, help="calls per partitioner (median time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/PARTITIONERS.md", help="Markdown output")
    args = parse_with_presets(p, argv, FULL, QUICK)
    return args


def planted(rng: np.random.Generator, size: int, groups: int, noise: float):
    """|W| of G hidden blocks plus noise, and the plan of the hidden blocks."""
    row_part = rng.permutation(index_labels(size, groups))
    col_part = rng.permutation(index_labels(size, groups))
    w = noise * rng.standard_normal((size, size))
    inside = row_part[:, None] == col_part[None, :]
    w[inside] = rng.standard_normal(int(inside.sum()))
    return np.abs(w), plan_from_labels(row_part, col_part, groups, "planted")


def measure(scores: np.ndarray, groups: int, repeats: int, seed: int) -> dict:
    row = {"random": retained(random_blocks(scores, groups, seed=seed), scores)}
    for name, partition in TIMED.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            plan = partition(scores, groups, seed=seed)
            times.append(time.perf_counter() - start)
        row[name] = retained(plan, scores)
        row[f"{name}_s"] = statistics.median(times)
    return row


def cases(args, rng):
    """(label, G, scores, planted plan or None) in benchmark order."""
    for size in args.sizes:
        for noise in args.noises:
            for groups in args.groups:
                scores, truth = planted(rng, size, groups, noise)
                yield f"planted {size}×{size}, noise {noise:g}", groups, scores, truth
    dense = np.abs(rng.standard_normal((args.dense_size, args.dense_size)))
    for groups in args.groups:
        yield f"dense Gaussian {args.dense_size}×{args.dense_size}", groups, dense, None


def verdict(rows: list[dict]) -> str:
    metis = statistics.fmean(r["metis"] for r in rows)
    spectral = statistics.fmean(r["spectral"] for r in rows)
    wins = sum(r["metis"] > r["spectral"] + 1e-9 for r in rows)
    losses = sum(r["spectral"] > r["metis"] + 1e-9 for r in rows)
    t_metis = sum(r["metis_s"] for r in rows)
    t_spectral = sum(r["spectral_s"] for r in rows)
    better, worse = ("metis", "spectral") if metis >= spectral else ("spectral", "metis")
    faster, slower = ("metis", "spectral") if t_metis <= t_spectral else ("spectral", "metis")
    return (f"{better} retained more on average: metis {metis:.4f} vs spectral {spectral:.4f} "
            f"(difference {abs(metis - spectral) * 100:.2f} points; metis ahead on {wins}, spectral on {losses}, "
            f"tied on {len(rows) - wins - losses} of {len(rows)} cases); {faster} is "
            f"{max(t_metis, t_spectral) / max(min(t_metis, t_spectral), 1e-12):.2f}× faster in total "
            f"(metis {t_metis:.2f} s, spectral {t_spectral:.2f} s summed over all cases; {slower} slower)")


def markdown(meta: dict, rows: list[dict], line: str) -> list[str]:
    lines = ["# Lossy partitioners: metis vs spectral", "", "## How this was made", "", *meta_lines(meta),
             f"- Seed {meta['seed']}; seconds are the median of {meta['repeats']} calls; scores = |W|", "",
             "*retained*: fraction of sum |W| inside the parts' blocks (what a balanced split keeps); *planted*: "
             "that of the hidden blocks (— for the dense matrix, which has none); random: `random_blocks`.", "",
             "| matrix | G | planted | retained metis | retained spectral | retained random | s metis | s spectral |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        truth = "—" if r["planted"] is None else f"{r['planted']:.4f}"
        lines.append(f"| {r['matrix']} | {r['groups']} | {truth} | {r['metis']:.4f} | {r['spectral']:.4f} | "
                     f"{r['random']:.4f} | {r['metis_s']:.3f} | {r['spectral_s']:.3f} |")
    return lines + ["", f"**Verdict**: {line}.", ""]


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    meta = run_meta(argv, seed=args.seed, repeats=args.repeats)
    rows = []
    for label, groups, scores, truth in cases(args, rng):
        row = dict(matrix=label, groups=groups, planted=None if truth is None else retained(truth, scores),
                   **measure(scores, groups, args.repeats, args.seed))
        rows.append(row)
        print(f"{label:<32} G {groups:>2}: metis {row['metis']:.4f} ({row['metis_s']:.2f} s), spectral "
              f"{row['spectral']:.4f} ({row['spectral_s']:.2f} s), random {row['random']:.4f}", file=sys.stderr)
    line = verdict(rows)
    write_section(Path(args.out), "bench_partitioners", markdown(meta, rows, line))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
