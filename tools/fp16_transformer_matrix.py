"""Export an fp16 torch TransformerEncoder, split it with every layout, and open each written model in
ONNX Runtime at every optimization level in a child process (onnx_split.isolate), so that a model
that crashes ORT shows up as a row of the table instead of ending this script.

    .venv/bin/pip install torch            # once; torch is not a dependency of onnx_split
    .venv/bin/python tools/fp16_transformer_matrix.py --out /tmp/fp16 --parts 4
    .venv/bin/python tools/fp16_transformer_matrix.py --out /tmp/fp16 --blocks 4 --dynamo   # needs onnxscript

The encoder is d_model 256, 4 heads, ffn 1024, 2 layers, ``.half()`` (options change each). A random
encoder has no zeros, so nothing splits at --threshold 0: give a budget (--parts G) or plant exact
blocks in every Linear weight (--blocks B: B dense blocks under random permutations; linear1's
hidden permutation is linear2's, so they chain). Each cell is "ok", or the one-line reason
(an ORT error, or "crashed (SIGSEGV) ..." for a native crash). Every run of onnx_split itself is a
subprocess too, so its exit code (139 on a segfault) is reported rather than inherited.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from onnx_split.isolate import LEVELS, Probe, probe_models

LAYOUTS = ("parallel", "batched", "function", "auto")


def export(path: Path, args) -> None:
    import torch

    torch.manual_seed(args.seed)
    layer = torch.nn.TransformerEncoderLayer(args.d_model, args.heads, args.ffn, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False).eval()
    if args.blocks:
        plant_blocks(torch, encoder, args.blocks)
    encoder = encoder.half()
    x = torch.randn(args.batch, args.seq, args.d_model).half()
    torch.onnx.export(encoder, (x,), str(path), dynamo=args.dynamo, input_names=["x"], output_names=["y"])


def plant_blocks(torch, encoder, blocks: int) -> None:
    """Zero every Linear weight outside ``blocks`` diagonal blocks under random permutations."""
    g = torch.Generator().manual_seed(1)

    def mask(n_out: int, n_in: int, rows=None, cols=None):
        rows = torch.randperm(n_out, generator=g) if rows is None else rows
        cols = torch.randperm(n_in, generator=g) if cols is None else cols
        block_out, block_in = torch.arange(n_out) * blocks // n_out, torch.arange(n_in) * blocks // n_in
        return (block_out[:, None] == block_in[None, :]).float()[rows][:, cols], rows

    with torch.no_grad():
        for layer in encoder.layers:
            attn = layer.self_attn
            attn.in_proj_weight.mul_(mask(*attn.in_proj_weight.shape)[0])
            attn.out_proj.weight.mul_(mask(*attn.out_proj.weight.shape)[0])
            m1, hidden = mask(*layer.linear1.weight.shape)
            layer.linear1.weight.mul_(m1)
            layer.linear2.weight.mul_(mask(*layer.linear2.weight.shape, cols=hidden)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the exported and written models")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dynamo", action="store_true", help="torch's dynamo exporter (default: legacy)")
    parser.add_argument("--blocks", type=int, default=0, help="plant this many exact blocks in every Linear")
    parser.add_argument("--parts", type=int, default=None, help="budget passed to onnx_split (lossy)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.out / "encoder_fp16.onnx"
    export(source, args)
    x = np.random.default_rng(0).standard_normal((args.batch, args.seq, args.d_model)).astype(np.float16)
    written, runs = {"original": source}, {}
    for layout in args.layouts.split(","):
        out = args.out / f"encoder_fp16.{layout}.onnx"
        out.unlink(missing_ok=True)
        command = [sys.executable, "-m", "onnx_split", str(source), str(out), "--layout", layout, "--no-verify",
                   "--no-bench", "--quiet"] + (["--parts", str(args.parts)] if args.parts else [])
        done = subprocess.run(command, capture_output=True, text=True)
        runs[layout] = (done.returncode, (done.stderr.strip().splitlines() or [""])[-1])
        if out.exists():
            written[layout] = out
    for layout, (code, last) in runs.items():
        print(f"onnx_split --layout {layout}: exit {code}{': ' + last if last else ''}")
    probes = [Probe(str(path), name, optimization=level, feeds={"x": x})
              for name, path in written.items() for level in LEVELS]
    results = iter(probe_models(probes))
    print(f"{'model':<10} " + " ".join(f"{LEVELS[level]:<20}" for level in LEVELS))
    for name, path in written.items():
        split = sum(n.name.find("/split/") >= 0 for n in onnx.load(str(path), load_external_data=False).graph.node)
        cells = [next(results) for _ in LEVELS]
        print(f"{name:<10} " + " ".join(f"{'ok' if r.ok else 'FAIL':<20}" for r in cells) + f"  ({split} new nodes)")
        for r in cells:
            if not r.ok:
                print(f"    {r.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
