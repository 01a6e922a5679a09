"""Check every external data reference of a model before reading it, and say what is wrong.

Checked in this order, so that an error never tells which files exist outside the model's folder:
the location's text (empty, NUL, absolute, ``..``), where it resolves (a symbolic link out of the
folder), then whether the file exists, what kind of file it is, and whether it holds the tensor.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from .errors import ModelLoadError

_PACKED_BITS = {name: bits for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2),
                                               ("UINT2", 2))}
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_external_data(model: onnx.ModelProto, model_path: Path) -> set[Path]:
    """The resolved external data files of ``model`` (read from ``model_path``), each checked.

    Raises :class:`ModelLoadError` with the reason for the first reference that cannot be read.
    """
    from onnx.external_data_helper import _get_all_tensors

    folder = model_path.parent if str(model_path.parent) else Path(".")
    real_folder = Path(os.path.realpath(folder))
    files = set()
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        files.add(_check_tensor(tensor, model_path, folder, real_folder))
    return files


def _check_tensor(tensor: onnx.TensorProto, model_path: Path, folder: Path, real_folder: Path) -> Path:
    entries = {e.key: e.value for e in tensor.external_data}
    where = f"{model_path}: cannot read external data of tensor {tensor.name!r}"
    location = entries.get("location", "")
    if not location:
        raise ModelLoadError(f"{where}: it has no location")
    if "\0" in location:
        raise ModelLoadError(f"{where}: its location {location!r} contains a NUL character")
    if os.path.isabs(location) or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
        raise ModelLoadError(f"{where}: its location {location!r} is an absolute path; external data must "
                             f"lie in the model's folder")
    if ".." in PurePosixPath(location.replace("\\", "/")).parts:
        raise ModelLoadError(f"{where}: its location {location!r} leaves the model's folder ('..')")
    path = folder / location
    real = Path(os.path.realpath(path))
    if real != real_folder and real_folder not in real.parents:
        raise ModelLoadError(f"{where}: its location {location!r} is a symbolic link out of the model's folder")
    offset = _whole_number(entries, "offset", where)
    length = _whole_number(entries, "length", where)
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise ModelLoadError(f"external data file of the model is missing: {real} "
                             f"(tensor {tensor.name!r})") from None
    except OSError as exc:
        raise ModelLoadError(f"{where}: {location!r}: {exc.strerror}") from None
    for test, kind in _KINDS:
        if test(info.st_mode):
            raise ModelLoadError(f"{where}: its location {location!r} is {kind}, not a regular file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{where}: its location {location!r} is not a regular file")
    if not os.access(real, os.R_OK):
        raise ModelLoadError(f"{where}: {location!r} is not readable")
    offset = offset or 0
    needed = tensor_bytes(tensor)
    if length is not None and needed is not None and length < needed:
        raise ModelLoadError(f"{where}: its length {length} is shorter than the tensor ({needed} bytes for "
                             f"dims {list(tensor.dims)})")
    want = length if length is not None else needed
    if want is not None and offset + want > info.st_size:
        raise ModelLoadError(f"{where}: {location!r} is shorter than the tensor: it needs bytes {offset} to "
                             f"{offset + want}, the file has {info.st_size}")
    return real


def tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's data, or None where that is not fixed by its type and dims (strings)."""
    count = math.prod(tensor.dims)
    name = onnx.TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in onnx.TensorProto.DataType.values() \
        else None
    if name in _PACKED_BITS:
        return (count * _PACKED_BITS[name] + 7) // 8
    if name in (None, "UNDEFINED", "STRING"):
        return None
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _whole_number(entries: dict, key: str, where: str) -> int | None:
    if key not in entries:
        return None
    text = entries[key]
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ModelLoadError(f"{where}: its {key} {text!r} is not a whole number >= 0")
    return value
