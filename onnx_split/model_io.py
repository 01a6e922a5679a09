"""Load and save models: clear errors for bad files, external data, atomic writes.

The pass keeps the input's IR version and opsets; nothing here changes them.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError, EncodeError

from . import spill, writes
from .errors import ModelLoadError, OutputError, first_line
from .external_data import check_external_data
from .protos import serialized_pieces, without_weights
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
    files = check_external_data(model, p)
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
    """True when the model cannot be serialized as one protobuf (2 GB limit)."""
    return serialized_bytes(model) >= PROTOBUF_LIMIT


SOURCE_BYTES = 64 * 2**20
"""Models larger than this are handed to ONNX Runtime by path (:func:`model_source`)."""


@contextmanager
def model_source(model: onnx.ModelProto, *, limit: int = SOURCE_BYTES, outputs: tuple[str, ...] = ()
                 ) -> Iterator[bytes | str]:
    """The model as ONNX Runtime takes it: its serialized bytes when they are at most ``limit``,
    else the path of a temporary copy (removed on exit) whose main-graph tensors are external data,
    written from ``model`` a tensor at a time. The bytes of a large model would be one more copy of
    it in memory for as long as a session is being made from them (two, where two sessions are
    compared). ``outputs``: main-graph tensors made graph outputs as well; ``model`` is not changed."""
    outside = spill.refers_outside(model)
    if not outside and serialized_bytes(model) <= limit:
        copy = model
        if outputs:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            _add_outputs(copy, outputs)
        yield copy.SerializeToString()
        return
    folder = spill.directory()
    if outside and folder is None:
        raise ValueError("the model refers to external data and no spill is active")
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnx_split-")))
        # in a spill's directory, beside the weights the model refers to: names of its own
        path, data = (Path(p) for p in (_new_file(folder, ".onnx", stack), _new_file(folder, ".data", stack)))
        fd = os.open(data, os.O_WRONLY)
        try:
            header = _write_external(model, fd, data.name)
        finally:
            os.close(fd)
        _add_outputs(header, outputs)
        path.write_bytes(header.SerializeToString())
        del header
        yield str(path)


def _new_file(folder: Path, suffix: str, stack: contextlib.ExitStack) -> str:
    """A new empty file in ``folder``, removed when ``stack`` closes."""
    fd, name = tempfile.mkstemp(dir=folder, prefix="source-", suffix=suffix)
    os.close(fd)
    stack.callback(lambda: Path(name).unlink(missing_ok=True))
    return name


def _add_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> None:
    known = {o.name for o in model.graph.output}
    for name in dict.fromkeys(names):
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))


def serialized_bytes(model: onnx.ModelProto) -> int:
    """About how many bytes the model serializes to (an upper bound), counted without serializing
    it: the main graph's weights from their dims, everything else from a copy without them
    (``ByteSize`` would serialize the whole model just to count it)."""
    try:
        size = without_weights(model).ByteSize()
    except EncodeError:  # protobuf refuses to even size a message past its limit
        return PROTOBUF_LIMIT
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.STRING or t.data_location == onnx.TensorProto.EXTERNAL:
            size += t.ByteSize()
        else:
            count = 1
            for d in t.dims:
                count *= d
            size += count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            size += 32 + len(t.name) + 11 * len(t.dims)  # tags, lengths, name, dims: a safe upper bound
    return size


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> list[Path]:
    """Write ``model`` to ``path`` all or nothing; return the files written (model first).

    ``external_data``: True writes the tensors to a new file ``<name>.<random>.data`` beside the model;
    None (default) does so only when the model would reach protobuf's 2 GB limit. ``protect``: paths
    (the input model) that must never be overwritten. The data file is complete before the model that
    refers to it appears, by one rename, so a reader of ``path`` sees the old model with its data or
    the new one with its data, never a mix; the data file of the replaced model is removed then.
    """
    return stage_model(model, path, external_data=external_data, protect=protect).publish()


def stage_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> writes.Staged:
    """Write everything :func:`save_model` writes but publish nothing yet (see :class:`writes.Staged`)."""
    out = Path(path)
    parent = check_destination(out)
    refuse_overwrite([out], protect)
    writes.remove_stale_temps(parent)
    if external_data is None:
        external_data = is_large(model)
    extra: list[tuple[Path, int]] = []
    tmp = fd = None
    try:
        if external_data:
            data_path, data_fd = writes.new_data_file(out)
            extra.append((data_path, data_fd))
            pieces = [_write_external(model, data_fd, data_path.name).SerializeToString()]
        else:
            pieces = serialized_pieces(model)  # a weight at a time: no second copy of them all
        tmp, fd = writes.temp_file(parent, ".onnx")
        for piece in pieces:
            writes.write_all(fd, piece)
        del pieces
    except BaseException as exc:
        if tmp is not None:
            writes.discard(tmp, fd)
        for p, f in extra:
            writes.discard(p, f)
        if isinstance(exc, (OSError, ValueError, EncodeError)):
            raise OutputError(f"cannot write {out}: {first_line(exc)}") from None
        raise
    kept = {Path(p).resolve() for p in protect}  # the input's own data is never a leftover
    return writes.Staged(out, tmp, fd, extra, after=lambda: writes.remove_unreferenced_data(
        out, lambda: _references(out), keep=kept))


def _references(model_path: Path) -> set[Path] | None:
    """The external data files the model at ``model_path`` refers to now (None: it cannot be read)."""
    try:
        header = onnx.load(str(model_path), load_external_data=False)
    except FileNotFoundError:
        return set()
    except Exception:  # not readable as ONNX: refer to nothing we can tell
        return None
    try:
        return external_data_files(header, model_path.parent)
    except (ValueError, OSError):
        return None


EXTERNAL_MIN_BYTES = 1024
"""Main-graph tensors of at least this many bytes (raw data) are the ones written as external data."""


def _write_external(model: onnx.ModelProto, data_fd: int, data_name: str,
                    threshold: int = EXTERNAL_MIN_BYTES) -> onnx.ModelProto:
    """Write the main graph's tensors of ``threshold`` bytes or more to the open data file; return the
    model without them, referring to ``data_name`` (a location relative to the model's folder).

    Unlike ``onnx.save_model(save_as_external_data=True)`` this leaves ``model`` untouched and
    holds at most one tensor's bytes at a time, so a model near the memory limit can be saved.
    """
    header = without_weights(model)
    offset = writes.DATA_HEADER
    with open(data_fd, "wb", closefd=False) as data:
        data.seek(offset)
        for tensor in model.graph.initializer:
            raw = tensor.raw_data if tensor.HasField("raw_data") else None
            if raw is None or len(raw) < threshold:
                header.graph.initializer.append(tensor)
                continue
            pad = -offset % 4096  # page-aligned, so runtimes can map it
            data.write(b"\0" * pad)
            offset += pad
            data.write(raw)
            ref = header.graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
            _copy_set_fields(tensor, ref)
            ref.data_location = onnx.TensorProto.EXTERNAL
            for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                ref.external_data.add(key=key, value=val)
            offset += len(raw)
            del raw
    return header


def _copy_set_fields(tensor: onnx.TensorProto, ref: onnx.TensorProto) -> None:
    """The tensor's other fields that are set (not its data), so that reading the data back gives
    the tensor as it was (spill.load_weights)."""
    if tensor.HasField("doc_string"):
        ref.doc_string = tensor.doc_string
    if tensor.HasField("segment"):
        ref.segment.CopyFrom(tensor.segment)
    if "metadata_props" in tensor.DESCRIPTOR.fields_by_name:
        ref.metadata_props.extend(tensor.metadata_props)


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
    """Raise :class:`OutputError` unless a file can be put at ``path``; return its folder."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{what} directory does not exist: {parent}")
    if not parent.is_dir():
        raise OutputError(f"{what} directory is not a directory: {parent}")
    if out.is_dir():
        raise OutputError(f"{what} path is a directory: {out}")
    try:
        info = out.stat()  # through a link: what the name stands for now
    except FileNotFoundError:
        info = None  # a new name, or a dangling link (the link is replaced)
    except OSError as exc:
        raise OutputError(f"{what} path cannot be examined: {out}: {first_line(exc)}") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise OutputError(f"{what} path is not a regular file (a device, FIFO or socket): {out}; "
                          f"onnx_split replaces the file at its destination, choose a file path")
    return parent


@dataclass(frozen=True)
class Destinations:
    """Every path a run writes, checked by :func:`plan_destinations`."""

    model: Path
    report: Path | None
    data_pattern: str  # the model's external data file, if any: a new name of this form

    @property
    def directories(self) -> list[Path]:
        dirs = [self.model.parent]
        if self.report is not None and not same_file(self.report.parent, self.model.parent):
            dirs.append(self.report.parent)
        return dirs


def plan_destinations(
    output: str | os.PathLike,
    *,
    report: str | os.PathLike | None = None,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> Destinations:
    """Check, before any work, every path a run will write; raise :class:`OutputError` if one cannot be.

    The model, its external data file and the report must be distinct from each other and from
    every input file (``inputs``: the model, its external data, the npz files); the report must not
    take a name that belongs to the model's data (``OUT.data`` or onnx_split's ``OUT.<id>.data``) or a
    data file the existing ``output`` model uses. Every destination folder must exist and take a new
    file (tried for real). Leftover temporary files of dead runs are removed from those folders.
    """
    out = Path(output)
    out_dir = check_destination(out)
    refuse_overwrite([out], inputs)
    rep = None
    if report is not None:
        rep = Path(report)
        check_destination(rep, "--report")
        refuse_overwrite([rep], inputs)
        if same_file(rep, out):
            raise OutputError(f"--report {rep} is the output model's path; choose another")
        if same_file(rep.parent, out_dir) and (rep.name == out.name + ".data"
                                                 or writes.data_name_pattern(out.name).fullmatch(rep.name)):
            raise OutputError(f"--report {rep} is a name for the output model's external data; choose another")
        for used in (_references(out) or ()) if rep.exists() else ():  # only an existing file can be in use
            if same_file(rep, used):
                raise OutputError(f"--report {rep} is the external data of the existing {out}; choose another")
    for path, what in ((out, "output"), (rep, "--report")):
        if path is not None and writes.is_onnx_split_data(path):  # another model's weights
            raise OutputError(f"{what} path {path} is the external data file of a model onnx_split wrote; "
                              f"choose another")
    dest = Destinations(out, rep, f"{out.name}.<id>.data")
    for folder, what in zip(dest.directories, ("output", "--report")):
        writes.probe_writable(folder, what)
        writes.remove_stale_temps(folder)
    return dest


def refuse_overwrite(targets, protect) -> None:
    """Raise :class:`OutputError` if any of ``targets`` is one of the ``protect`` paths (the input)."""
    for target in targets:
        for guarded in protect:
            if same_file(Path(target), Path(guarded)):
                raise OutputError(f"refusing to overwrite the input: {target}")


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
