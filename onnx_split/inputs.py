"""Inputs for verification and timing: seeded random of the right dtype, or real ones from .npz."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .errors import InputError, first_line


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (IR < 4 lists weights as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name:d0,d1,..`` -> (name, dims)."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    except ValueError:
        shape = None
    if not sep or not name or shape is None or any(d < 0 for d in shape):
        raise InputError(f"--input-shape wants name:d0,d1,.. with whole numbers, got {text!r}")
    return name, shape


def batch_shapes(model: onnx.ModelProto, batch: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``shapes`` with the first dim of every graph input whose first dim is dynamic set to
    ``batch`` (other dynamic dims as ``shapes`` gives them, else 1)."""
    result = dict(shapes)
    for spec in graph_inputs(model):
        if not spec.type.HasField("tensor_type"):
            continue
        dims = _dims(spec)
        if dims and dims[0] is None:
            given = shapes.get(spec.name)
            rest = given[1:] if given is not None and len(given) == len(dims) else tuple(1 if d is None else d for d in dims[1:])
            result[spec.name] = (batch,) + tuple(rest)
    return result


def make_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
               inputs_path: str | None = None, seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """Feeds for every graph input, and notes on what was assumed."""
    specs = graph_inputs(model)
    shapes = dict(shapes or {})
    known = {i.name for i in specs}
    for name in shapes:
        if name not in known:
            raise InputError(f"--input-shape names {name!r}, which is not a graph input ({', '.join(sorted(known))})")
    if inputs_path is not None:
        return _load_npz(inputs_path, specs), [f"inputs from {inputs_path}"]
    rng = np.random.default_rng(seed)
    feeds, notes, defaulted = {}, [], []
    for spec in specs:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
        dims = _dims(spec)
        if spec.name in shapes:
            given = shapes[spec.name]
            if len(given) != len(dims) or any(d is not None and d != g for d, g in zip(dims, given)):
                shown = ["?" if d is None else d for d in dims]
                raise InputError(f"--input-shape {spec.name}:{','.join(map(str, given))} does not fit its shape {shown}")
            shape = given
        else:
            if any(d is None for d in dims):
                defaulted.append(spec.name)
            shape = tuple(1 if d is None else d for d in dims)
        feeds[spec.name] = _random(rng, dtype, shape)
    notes.append(f"seeded random inputs (seed {seed})")
    if defaulted:
        notes.append(f"dynamic dims set to 1 for {', '.join(defaulted)} (use --input-shape name:d0,d1,..)")
    return feeds, notes


def _dims(spec: onnx.ValueInfoProto) -> list[int | None]:
    tt = spec.type.tensor_type
    if not spec.type.HasField("tensor_type"):
        raise InputError(f"graph input {spec.name!r} is not a tensor, so no input can be made for it: "
                         f"give real ones with --inputs, or skip with --no-verify --no-bench")
    if not tt.HasField("shape"):
        raise InputError(f"graph input {spec.name!r} has no shape: give it with --input-shape {spec.name}:d0,d1,.. "
                         f"(or skip verification and timing with --no-verify --no-bench)")
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _random(rng: np.random.Generator, dtype: np.dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        value = rng.random(shape) < 0.5
    elif dtype.kind in "iu":
        value = rng.integers(0, 2, size=shape)
    else:
        value = rng.standard_normal(shape)
    return np.asarray(value).astype(dtype)  # 0-d inputs must be arrays, not numpy scalars


def read_npz(path: str | Path, option: str) -> dict[str, np.ndarray]:
    """Every array of the .npz file ``path`` given with ``option``; a one-line InputError if it is
    missing or not an .npz (pickled objects are refused)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{option} file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # numpy raises several types for a file that is not an .npz
        raise InputError(f"{option} {p} is not a readable .npz file (numpy.savez output, one array per graph "
                         f"input): {first_line(exc, 120)}") from None


def _load_npz(path: str, specs: list[onnx.ValueInfoProto]) -> dict[str, np.ndarray]:
    p = Path(path)
    arrays = read_npz(p, "--inputs")
    feeds = {}
    for spec in specs:
        if spec.name not in arrays:
            raise InputError(f"--inputs {p} has no array named {spec.name!r} (it has: {', '.join(sorted(arrays)) or 'none'})")
        value = arrays[spec.name]
        want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type))
        if value.dtype != want:
            raise InputError(f"--inputs {spec.name!r} has dtype {value.dtype}, the model wants {want}")
        dims = _dims(spec)
        if value.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, value.shape)):
            shown = ["?" if d is None else d for d in dims]
            raise InputError(f"--inputs {spec.name!r} has shape {list(value.shape)}, the model wants {shown}")
        feeds[spec.name] = value
    return feeds
