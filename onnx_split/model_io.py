"""Load and save models: clear errors for bad files, external data, atomic writes.

The pass keeps the input's IR version and opsets; nothing here changes them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError

from .errors import ModelLoadError, OutputError, first_line
from .validate import check_shapes

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**20


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise :class:`ModelLoadError`."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, set[Path]]:
    """The model (external data loaded) and the external data files it was read from."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"input model not found: {p}")
    if not p.is_file():
        raise ModelLoadError(f"input model is not a file: {p}")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"input model is empty: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{p} is not a valid ONNX model (truncated or not ONNX): {first_line(exc)}") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{p} is not an ONNX model (no IR version, graph or opset)")
    files = external_data_files(model, p.parent)
    for f in sorted(files):
        if not f.is_file():
            raise ModelLoadError(f"external data file of the model is missing: {f}")
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:  # onnx raises OSError, ValueError or its ValidationError here
        raise ModelLoadError(f"{p}: cannot read external data: {first_line(exc)}") from None
    try:
        onnx.checker.check_model(str(p))
    except (onnx.checker.ValidationError, DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{p} is not a valid ONNX model: {first_line(exc)}") from None
    check_shapes(model, str(p))  # strict shape inference: a Gemm with a 3-D weight is bad input (exit 2)
    return model, files


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model)
    )


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialized as one protobuf (2 GB limit).

    Counted without serializing it: the main graph's weights from their dims, everything else from
    a copy without them (``ByteSize`` would serialize the whole model just to count it).
    """
    try:
        size = without_weights(model).ByteSize()
    except EncodeError:  # protobuf refuses to even size a message past its limit
        return True
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.STRING or t.data_location == onnx.TensorProto.EXTERNAL:
            size += t.ByteSize()
        else:
            count = 1
            for d in t.dims:
                count *= d
            size += count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            size += 32 + len(t.name) + 11 * len(t.dims)  # tags, lengths, name, dims: a safe upper bound
    return size >= PROTOBUF_LIMIT


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its main graph's initializers (cheap: no weight data)."""
    header = onnx.ModelProto()
    _copy_fields(model, header, skip="graph")
    _copy_fields(model.graph, header.graph, skip="initializer")
    return header


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; return the files written.

    ``external_data``: True writes tensors to ``<name>.data`` beside the model; None (default)
    does so only when the model would reach protobuf's 2 GB limit. ``protect``: paths (the input
    model) that must never be overwritten. Everything is first written to a temporary folder in the
    destination directory and renamed into place, so a failure leaves no partial output.
    """
    out = Path(path)
    parent = check_destination(out)
    if external_data is None:
        external_data = is_large(model)
    data_name = out.name + ".data"
    refuse_overwrite([out] + ([parent / data_name] if external_data else []), protect)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx_split-", dir=parent))
    try:
        tmp_model = tmp / out.name
        try:
            if external_data:
                _save_external(model, tmp_model, data_name)
            else:
                onnx.save_model(model, str(tmp_model))
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot write {out}: {first_line(exc)}") from None
        written = []
        if external_data:
            os.replace(tmp / data_name, parent / data_name)
            written.append(parent / data_name)
        os.replace(tmp_model, out)
        written.insert(0, out)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_external(model: onnx.ModelProto, path: Path, data_name: str, threshold: int = 1024) -> None:
    """Write the main graph's tensors of ``threshold`` bytes or more to ``data_name`` beside ``path``.

    Unlike ``onnx.save_model(save_as_external_data=True)`` this leaves ``model`` untouched and
    holds at most one tensor's bytes at a time, so a model near the memory limit can be saved.
    """
    header = without_weights(model)
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            raw = tensor.raw_data if tensor.HasField("raw_data") else None
            if raw is None or len(raw) < threshold:
                header.graph.initializer.append(tensor)
                continue
            pad = -offset % 4096  # page-aligned, so runtimes can map it
            data.write(b"\0" * pad)
            offset += pad
            data.write(raw)
            ref = header.graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                                               doc_string=tensor.doc_string)
            ref.data_location = onnx.TensorProto.EXTERNAL
            for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                ref.external_data.add(key=key, value=val)
            offset += len(raw)
            del raw
    with open(path, "wb") as f:
        f.write(header.SerializeToString())


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of message ``src`` into ``dst`` except ``skip``."""
    for desc, value in src.ListFields():
        if desc.name == skip:
            continue
        if desc.is_repeated:
            getattr(dst, desc.name).extend(value)
        elif desc.type == desc.TYPE_MESSAGE:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def external_data_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    files = set()
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc:
                files.add((base / loc).resolve())
    return files


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def check_destination(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise :class:`OutputError` unless a file can be written at ``path``; return its folder."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{what} directory does not exist: {parent}")
    if out.is_dir():
        raise OutputError(f"{what} path is a directory: {out}")
    return parent


def refuse_overwrite(targets, protect) -> None:
    """Raise :class:`OutputError` if any of ``targets`` is one of the ``protect`` paths (the input)."""
    for target in targets:
        for guarded in protect:
            if _same_file(Path(target), Path(guarded)):
                raise OutputError(f"refusing to overwrite the input: {target}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
