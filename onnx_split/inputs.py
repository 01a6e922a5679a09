"""Inputs for verification and timing: seeded random of the right dtype, or real ones from .npz."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError, first_line

MAX_FEED_BYTES = 1 << 30
"""Seeded random inputs are made only up to this many bytes per set (all graph inputs together): a
declared dim of 2**25 or 1e12 is refused with the options to use instead of a MemoryError."""
VERIFY_SETS = 3
"""Sets of seeded random inputs verification runs on by default (seeds ``seed .. seed + 2``), so
that one draw does not leave a branch of the model unchecked (onnxsim checks three as well)."""


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
    for spec in specs:
        tensor_dtype(spec)  # a sequence, optional or map input: one clear error before any work
    if inputs_path is not None:
        return _load_npz(inputs_path, specs), [f"inputs from {inputs_path}"]
    rng = np.random.default_rng(seed)
    feeds, notes, defaulted = {}, [], []
    planned = []
    for spec in specs:
        dtype = tensor_dtype(spec)
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
        planned.append((spec, dtype, shape))
    _check_size(planned, shapes)
    for spec, dtype, shape in planned:
        feeds[spec.name] = _random(rng, dtype, shape)
    notes.append(f"seeded random inputs (seed {seed})")
    if defaulted:
        notes.append(f"dynamic dims set to 1 for {', '.join(defaulted)} (use --input-shape name:d0,d1,..)")
    return feeds, notes


def feed_sets(model: onnx.ModelProto, feeds: dict[str, np.ndarray], seed: int = 0,
              count: int = VERIFY_SETS) -> list[dict[str, np.ndarray]]:
    """``feeds`` (made with ``seed``) and ``count - 1`` more sets of seeded random inputs of the same
    shapes, with seeds ``seed + 1, seed + 2, ..``: what verification runs on by default."""
    shapes = {name: tuple(np.shape(value)) for name, value in feeds.items()}
    return [feeds] + [make_feeds(model, shapes, None, seed + i)[0] for i in range(1, count)]


def verification_sets(model: onnx.ModelProto, feeds: dict[str, np.ndarray], inputs_path: str | None, seed: int,
                      notes: list[str]) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """The input sets verification runs on, and ``notes`` (what :func:`make_feeds` said) updated
    to say so: the given inputs alone, or :data:`VERIFY_SETS` sets of seeded random ones."""
    if inputs_path is not None:
        return [feeds], notes
    sets = feed_sets(model, feeds, seed)
    label = f"seeded random inputs (seed {seed})"
    seeds = ", ".join(str(seed + i) for i in range(len(sets)))
    told = f"seeded random inputs (seeds {seeds}; tuning and timing on seed {seed})"
    return sets, [told if n == label else n for n in notes]


def tensor_dtype(spec: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of a tensor-typed graph input; a one-line InputError for any other type."""
    kind = spec.type.WhichOneof("value")
    if kind != "tensor_type":
        what = {"sequence_type": "a sequence", "optional_type": "an optional", "map_type": "a map",
                "sparse_tensor_type": "a sparse tensor"}.get(kind, "untyped")
        raise InputError(f"graph input {spec.name!r} is {what}, not a tensor: onnx_split makes and reads inputs for "
                         f"tensors only, so it cannot verify, time or autotune this model; run with --no-verify "
                         f"--no-bench --layout parallel (or batched, function)")
    elem = spec.type.tensor_type.elem_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        dtype = None
    if dtype is None or elem == onnx.TensorProto.STRING:
        name = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)
        raise InputError(f"graph input {spec.name!r} has element type {name}, for which onnx_split cannot make "
                         f"inputs; run with --no-verify --no-bench --layout parallel (or batched, function)")
    return dtype


def _check_size(planned, shapes: dict) -> None:
    """Refuse random inputs above :data:`MAX_FEED_BYTES` before allocating them."""
    sizes = [(int(np.prod(shape, dtype=object)) * dtype.itemsize, spec.name, shape, dtype)
             for spec, dtype, shape in planned]
    total = sum(s[0] for s in sizes)
    if total <= MAX_FEED_BYTES:
        return
    nbytes, name, shape, dtype = max(sizes, key=lambda s: s[0])
    given = f"--input-shape {name}:{','.join(map(str, shapes[name]))} asks" if name in shapes else "its declared dims ask"
    raise InputError(f"random inputs for verification and timing would take {_gib(total)} (input {name!r} "
                     f"{list(shape)} {dtype}: {given} for {_gib(nbytes)}), over the {_gib(MAX_FEED_BYTES)} limit: "
                     f"give smaller dynamic dims with --input-shape, real inputs with --inputs FILE.npz, or skip "
                     f"with --no-verify --no-bench --layout parallel")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB" if nbytes < 2**60 else f"{nbytes:.3g} bytes"


def _dims(spec: onnx.ValueInfoProto) -> list[int | None]:
    tt = spec.type.tensor_type
    tensor_dtype(spec)
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


def read_npz(path: str | Path, option: str, names=None) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays of the .npz file ``path`` (given with ``option``) whose names are in ``names``
    (None: all), and the names of every array it holds. Only the arrays asked for are decompressed:
    the names come from the zip directory, so a huge member nobody needs costs nothing. A one-line
    InputError if the file is missing or not an .npz (pickled objects are refused)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{option} file not found: {p}")
    try:
        if not zipfile.is_zipfile(p):  # (numpy would try it as a pickle and say so: misleading)
            with open(p, "rb") as f:
                npy = f.read(6) == b"\x93NUMPY"
            raise ValueError("a single .npy array, not an .npz archive of named arrays" if npy else
                             "it is not a zip archive (an .npz is one)")
        with np.load(p, allow_pickle=False) as data:  # (a zip archive: an NpzFile)
            members = list(data.files)
            wanted = members if names is None else [k for k in members if k in set(names)]
            return {k: data[k] for k in wanted}, members
    except Exception as exc:  # numpy and zipfile raise several types for a file that is not an .npz
        raise InputError(f"{option} {p} is not a readable .npz file (numpy.savez output, one array per graph "
                         f"input): {first_line(exc, 120)}") from None


def _load_npz(path: str, specs: list[onnx.ValueInfoProto]) -> dict[str, np.ndarray]:
    p = Path(path)
    arrays, members = read_npz(p, "--inputs", [s.name for s in specs])
    feeds = {}
    for spec in specs:
        if spec.name not in arrays:
            raise InputError(f"--inputs {p} has no array named {spec.name!r} (it has: {', '.join(sorted(members)) or 'none'})")
        value = arrays[spec.name]
        want = tensor_dtype(spec)
        if value.dtype != want:
            raise InputError(f"--inputs {spec.name!r} has dtype {value.dtype}, the model wants {want}")
        dims = _dims(spec)
        if value.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, value.shape)):
            shown = ["?" if d is None else d for d in dims]
            raise InputError(f"--inputs {spec.name!r} has shape {list(value.shape)}, the model wants {shown}")
        feeds[spec.name] = value
    return feeds
