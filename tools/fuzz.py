"""Fuzz the CLI with random mutations of valid small models.

Each case takes one of a few valid seed models (MatMul with planted blocks, Gemm with a bias, a
two-layer chain, an If), applies one or two random mutations (flipped or truncated bytes, changed
dims, element types, attributes, op types, opsets, dangling or duplicated names, removed
initializers), writes it and runs ``python -m onnx_split IN OUT --report R.json`` with a few
option sets. Every run must hold the CLI's promises:

- exit code 0, 1 or 2 (a signal, e.g. a native crash, is a finding);
- at most one line on stderr, no "Traceback", no "internal error";
- exit 2: no output model, no report; exit 1: no output model (nothing written without --force);
- no temporary files left in the output folder; the input file's bytes unchanged.

Every case runs in its own subprocess (a native crash of ONNX Runtime kills only that case) with
a time limit; ``--in-process`` runs them in this process instead (faster; what the test suite
uses, from one subprocess). Run from the repository root:

    .venv/bin/python tools/fuzz.py --seconds 180 --seed 1
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
OPTION_SETS = [
    ["--min-elements", "0", "--layout", "parallel", "--no-bench"],
    ["--min-elements", "0", "--layout", "batched", "--no-bench", "--input-shape", "x:3,32"],
    ["--min-elements", "0", "--layout", "function", "--no-bench"],
    ["--min-elements", "0", "--bench-seconds", "0.02", "--tune-seconds", "0.2"],
    ["--min-elements", "0", "--layout", "parallel", "--no-verify", "--no-bench"],
    ["--min-elements", "0", "--layout", "parallel", "--no-bench", "--parts", "2"],
]
ELEM_TYPES = [t for t in TensorProto.DataType.values() if t != TensorProto.UNDEFINED] + [0, 99]


def _blocks(rng: np.random.Generator, k: int, n: int, parts: int) -> np.ndarray:
    w = np.zeros((k, n), np.float32)
    for r, c in zip(np.array_split(np.arange(k), parts), np.array_split(np.arange(n), parts)):
        w[np.ix_(r, c)] = rng.standard_normal((r.size, c.size))
    return w[rng.permutation(k)][:, rng.permutation(n)]


def seed_models() -> dict[str, onnx.ModelProto]:
    """Small valid models that onnx_split splits."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    opset = [helper.make_opsetid("", 17)]
    models = {}
    w = _blocks(rng, 32, 32, 4)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "mm",
                          [helper.make_tensor_value_info("x", f, ["batch", 32])],
                          [helper.make_tensor_value_info("y", f, ["batch", 32])], [numpy_helper.from_array(w, "W")])
    models["matmul"] = helper.make_model(g, opset_imports=opset, ir_version=8)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="gemm", transB=1, alpha=0.5)], "gemm",
                          [helper.make_tensor_value_info("x", f, [3, 32])], [helper.make_tensor_value_info("y", f, [3, 32])],
                          [numpy_helper.from_array(np.ascontiguousarray(_blocks(rng, 32, 32, 2).T), "B"),
                           numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "C")])
    models["gemm"] = helper.make_model(g, opset_imports=opset, ir_version=8)
    perm = [rng.permutation(32) for _ in range(3)]
    ws = []
    for i in range(2):
        b = np.kron(np.eye(4), np.ones((8, 8))) * rng.standard_normal((32, 32))
        ws.append(b[perm[i]][:, perm[i + 1]].astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="fc0"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W1"], ["y"], name="fc1")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", f, ["batch", 32])],
                          [helper.make_tensor_value_info("y", f, ["batch", 32])],
                          [numpy_helper.from_array(ws[0], "W0"), numpy_helper.from_array(ws[1], "W1")],
                          value_info=[helper.make_tensor_value_info("h", f, ["batch", 32])])
    models["chain"] = helper.make_model(g, opset_imports=opset, ir_version=8)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_fc")], "then", [],
                               [helper.make_tensor_value_info("t", f, [2, 32])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "V"], ["e"], name="else_fc")], "else", [],
                               [helper.make_tensor_value_info("e", f, [2, 32])],
                               [numpy_helper.from_array(_blocks(rng, 32, 32, 2), "V")])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
                          "if", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                 helper.make_tensor_value_info("x", f, [2, 32])],
                          [helper.make_tensor_value_info("y", f, [2, 32])], [numpy_helper.from_array(w, "W")])
    models["if"] = helper.make_model(g, opset_imports=opset, ir_version=8)
    return models


# --- mutations: each takes (model copy, rng) and returns bytes to write, and a label ---------

def _value_infos(m: onnx.ModelProto):
    return [v for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)
            if v.type.HasField("tensor_type")]


def m_dims(m, rng):
    vis = _value_infos(m)
    if not vis:
        return m, "dims: none"
    vi = rng.choice(vis)
    shape = vi.type.tensor_type.shape
    choice = rng.choice(["value", "drop", "add", "param"])
    if choice == "value" and shape.dim:
        d = rng.choice(list(shape.dim))
        d.dim_value = rng.choice([0, 1, 2, 7, 33, 2**25, 10**12, 10**15, 2**62])
    elif choice == "drop" and shape.dim:
        del shape.dim[rng.randrange(len(shape.dim))]
    elif choice == "add":
        shape.dim.add().dim_value = rng.choice([1, 3, 32])
    elif shape.dim:
        rng.choice(list(shape.dim)).dim_param = rng.choice(["n", "batch", ""])
    return m, f"dims: {choice} of {vi.name}"


def m_dtype(m, rng):
    t = rng.choice(ELEM_TYPES)
    target = rng.choice(["value_info", "initializer"])
    if target == "initializer" and m.graph.initializer:
        init = rng.choice(list(m.graph.initializer))
        init.data_type = t
        return m, f"dtype: initializer {init.name} -> {t}"
    vi = rng.choice(_value_infos(m))
    vi.type.tensor_type.elem_type = t
    return m, f"dtype: {vi.name} -> {t}"


def m_attribute(m, rng):
    nodes = [n for n in m.graph.node if n.attribute] or list(m.graph.node)
    node = rng.choice(nodes)
    choice = rng.choice(["int", "float", "remove", "add"])
    if choice == "add" or not node.attribute:
        node.attribute.append(helper.make_attribute(rng.choice(["transA", "transB", "axis", "perm", "alpha"]),
                                                    rng.choice([2, -1, 0.5, [1, 0]])))
        return m, f"attribute: add to {node.op_type}"
    attr = rng.choice(list(node.attribute))
    if choice == "remove":
        node.attribute.remove(attr)
    elif choice == "int":
        attr.type, attr.i = onnx.AttributeProto.INT, rng.choice([-1, 2, 7, 2**40])
    else:
        attr.type, attr.f = onnx.AttributeProto.FLOAT, rng.choice([float("nan"), float("inf"), -0.0, 1e30])
    return m, f"attribute: {choice} {attr.name} of {node.op_type}"


def m_names(m, rng):
    node = rng.choice(list(m.graph.node))
    choice = rng.choice(["dangling input", "duplicate output", "rename output", "empty input"])
    if choice == "dangling input" and node.input:
        node.input[rng.randrange(len(node.input))] = "nowhere"
    elif choice == "duplicate output" and len(m.graph.node) > 1:
        other = rng.choice([n for n in m.graph.node if n is not node])
        node.output[0] = other.output[0]
    elif choice == "rename output":
        node.output[0] = node.output[0] + "_renamed"
    elif node.input:
        node.input[rng.randrange(len(node.input))] = ""
    return m, f"names: {choice} on {node.op_type}"


def m_structure(m, rng):
    choice = rng.choice(["op_type", "opset", "ir_version", "drop initializer", "initializer data", "drop output",
                         "domain"])
    if choice == "op_type":
        rng.choice(list(m.graph.node)).op_type = rng.choice(["Gemm", "MatMul", "Add", "Conv", "Nope", "If", "Relu"])
    elif choice == "opset":
        m.opset_import[0].version = rng.choice([1, 6, 7, 12, 13, 21, 99])
    elif choice == "ir_version":
        m.ir_version = rng.choice([0, 1, 3, 4, 7, 11, 99])
    elif choice == "drop initializer" and m.graph.initializer:
        del m.graph.initializer[rng.randrange(len(m.graph.initializer))]
    elif choice == "initializer data" and m.graph.initializer:
        init = rng.choice(list(m.graph.initializer))
        if rng.random() < 0.5:
            init.raw_data = init.raw_data[: len(init.raw_data) // 2]
        else:
            init.dims[0] = init.dims[0] * 2 if init.dims else 3
    elif choice == "drop output":
        del m.graph.output[:]
    else:
        rng.choice(list(m.graph.node)).domain = rng.choice(["com.example", "ai.onnx.ml", "onnx_split"])
    return m, f"structure: {choice}"


PROTO_MUTATIONS = [m_dims, m_dtype, m_attribute, m_names, m_structure]


def mutate(model: onnx.ModelProto, rng: random.Random) -> tuple[bytes, str]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    labels = []
    for _ in range(rng.choice([1, 1, 2])):
        copy, label = rng.choice(PROTO_MUTATIONS)(copy, rng)
        labels.append(label)
    data = copy.SerializeToString()
    if rng.random() < 0.3:  # byte level, on top
        data = bytearray(data)
        kind = rng.choice(["flip", "truncate", "zero run"])
        if kind == "flip":
            for _ in range(rng.choice([1, 2, 8])):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            start = rng.randrange(len(data))
            data[start:start + 16] = bytes(len(data[start:start + 16]))
        labels.append(f"bytes: {kind}")
        data = bytes(data)
    return data, "; ".join(labels)


# --- running one case and checking the promises -------------------------------------------

@dataclass
class Case:
    index: int
    model: str
    mutation: str
    argv: list[str]
    rc: int | None = None
    stderr: str = ""
    problems: list[str] = field(default_factory=list)


def _run_in_process(argv: list[str]) -> tuple[int, str, str]:
    from onnx_split.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # main never exits; a leak of SystemExit is a finding too
            rc = exc.code if isinstance(exc.code, int) else 99
    return rc, out.getvalue(), err.getvalue()


def _run_subprocess(argv: list[str], timeout: float) -> tuple[int | None, str, str]:
    try:
        proc = subprocess.run([sys.executable, "-m", "onnx_split", *argv], capture_output=True, text=True,
                              cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout, proc.stderr


def run_case(case: Case, data: bytes, folder: Path, in_process: bool, timeout: float) -> Case:
    src, out, report = folder / "in.onnx", folder / "out" / "out.onnx", folder / "out" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in out.parent.iterdir():
        p.unlink()
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    argv = [str(src), str(out), "--report", str(report), *case.argv]
    rc, _, err = _run_in_process(argv) if in_process else _run_subprocess(argv, timeout)
    case.rc, case.stderr = rc, err.strip()
    lines = err.strip().splitlines()
    if rc is None:
        case.problems.append(err)
    elif rc not in (0, 1, 2):
        case.problems.append(f"exit code {rc}")
    if len(lines) > 1:
        case.problems.append(f"{len(lines)} lines on stderr")
    if "Traceback" in err:
        case.problems.append("traceback")
    if "internal error" in err:
        case.problems.append("internal error")
    left = sorted(p.name for p in out.parent.iterdir())
    if rc == 2 and left:
        case.problems.append(f"exit 2 left {left}")
    elif rc == 1 and out.exists():
        case.problems.append("exit 1 wrote the model")
    stray = [name for name in left if name not in ("out.onnx", "out.onnx.data", "report.json")]
    if stray:
        case.problems.append(f"left behind {stray}")
    if hashlib.sha256(src.read_bytes()).hexdigest() != digest:
        case.problems.append("input modified")
    return case


def fuzz(cases: int | None, seconds: float | None, seed: int, in_process: bool, timeout: float,
         log=None, save: Path | None = None) -> list[Case]:
    rng = random.Random(seed)
    models = seed_models()
    names = sorted(models)
    done: list[Case] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="onnx_split-fuzz-") as tmp:
        i = 0
        while (cases is None or i < cases) and (seconds is None or time.monotonic() - start < seconds):
            name = rng.choice(names)
            data, label = mutate(models[name], rng)
            case = run_case(Case(i, name, label, rng.choice(OPTION_SETS)), data, Path(tmp), in_process, timeout)
            done.append(case)
            if save is not None and case.problems:
                save.mkdir(parents=True, exist_ok=True)
                (save / f"case{seed}-{i}.onnx").write_bytes(data)
            if log is not None and case.problems:
                print(f"case {i} ({name}; {label}; {' '.join(case.argv)}): {case.problems}: {case.stderr[:300]}",
                      file=log)
            i += 1
    return done


def summary(done: list[Case]) -> dict:
    codes: dict[str, int] = {}
    for c in done:
        codes[str(c.rc)] = codes.get(str(c.rc), 0) + 1
    return {"cases": len(done), "exit_codes": codes, "problems": [asdict(c) for c in done if c.problems]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=None, help="number of cases (default: until --seconds)")
    p.add_argument("--seconds", type=float, default=None, help="time budget (default 60 without --cases)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-process", action="store_true", help="run cases in this process (no crash isolation)")
    p.add_argument("--timeout", type=float, default=120.0, help="time limit of one case in a subprocess")
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    p.add_argument("--save", default=None, help="write the model of every case with a problem to this folder")
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None or args.cases is not None else 60.0
    done = fuzz(args.cases, seconds, args.seed, args.in_process, args.timeout, log=sys.stderr,
                save=Path(args.save) if args.save else None)
    result = summary(done)
    print(json.dumps({k: v for k, v in result.items() if k != "problems"} | {"with_problems": len(result["problems"])}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
