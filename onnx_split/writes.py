"""Files that appear whole or not at all, and the cleanup of what a killed run left behind.

Every file the pass writes is first written in the folder of its destination under a name no reader
uses: ``.onnx_split-tmp-<pid>-<random><suffix>`` for the model and the report, which one rename then
publishes, and ``<output>.<random>.data`` for a model's external data, which only the published model
refers to. While a file is being written its writer holds an exclusive ``flock`` on it; the kernel
drops the lock when the writer exits, even on SIGKILL. A later run removes a leftover only when it is
provably one: a temporary name whose pid is not alive and whose lock is free, or a data file that
starts with :data:`DATA_MAGIC`, whose lock is free and that the output model no longer refers to.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Callable

from .errors import OutputError, first_line

try:
    import fcntl
except ImportError:  # no flock (Windows): files are still written the same way; leftovers are never removed
    fcntl = None

_O_CLOEXEC, _O_NOFOLLOW = getattr(os, "O_CLOEXEC", 0), getattr(os, "O_NOFOLLOW", 0)

TMP_PREFIX = ".onnx_split-tmp-"
_TMP_NAME = re.compile(r"\.onnx_split-tmp-(\d+)-[0-9a-f]{12}(\.[a-z]+)?")
DATA_MAGIC = b"onnx_split external data v1\n"
DATA_HEADER = 4096  # the magic, zero-padded; the first tensor starts here, page-aligned
_TOKEN_BYTES = 6  # 12 hex digits


def data_name_pattern(output_name: str) -> re.Pattern:
    """Names of the external data files onnx_split writes for the model ``output_name``."""
    return re.compile(re.escape(output_name) + r"\.[0-9a-f]{12}\.data")


def create_locked(path: Path) -> int:
    """Create ``path`` (which must not exist) and hold an exclusive lock on it; return the descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | getattr(os, "O_BINARY", 0), 0o666)
    if fcntl is None:
        return fd
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks: write anyway; cleanup then never removes it
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    return fd


def temp_file(directory: Path, suffix: str = "") -> tuple[Path, int]:
    """A new, locked, empty file with a temporary name in ``directory``: its path and descriptor."""
    while True:
        path = directory / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(_TOKEN_BYTES)}{suffix}"
        try:
            return path, create_locked(path)
        except FileExistsError:
            continue


def new_data_file(output: Path) -> tuple[Path, int]:
    """A new, locked external data file for the model ``output``, its header written."""
    while True:
        path = output.parent / f"{output.name}.{secrets.token_hex(_TOKEN_BYTES)}.data"
        try:
            fd = create_locked(path)
        except FileExistsError:
            continue
        try:
            write_all(fd, DATA_MAGIC + b"\0" * (DATA_HEADER - len(DATA_MAGIC)))
        except BaseException:
            discard(path, fd)
            raise
        return path, fd


def probe_writable(directory: Path, what: str) -> None:
    """Raise :class:`OutputError` unless a file can be created in ``directory`` (nothing is left there).

    A real attempt, not ``os.access``: that answers yes to root on a read-only filesystem or in /proc.
    """
    try:
        path, fd = temp_file(directory, ".probe")
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise OutputError(f"cannot write in the {what} directory {directory}: {reason}") from None
    discard(path, fd)


class Staged:
    """A destination's complete content under a temporary name; :meth:`publish` makes it visible.

    ``extra``: files (a model's external data) already under their final names, locked until the
    destination is published, removed by :meth:`discard`. ``after``: called once published.
    """

    def __init__(self, dest: Path, tmp: Path, fd: int, extra: list[tuple[Path, int]] = (),
                 after: Callable[[], object] | None = None):
        self.dest, self.tmp, self.fd, self.extra, self.after = dest, tmp, fd, list(extra), after
        self.done = False

    @property
    def files(self) -> list[Path]:
        return [self.dest] + [p for p, _ in self.extra]

    def publish(self) -> list[Path]:
        """One rename puts the destination in place; the locks are released only then."""
        for _, fd in self.extra:
            os.fsync(fd)
        os.fsync(self.fd)
        try:
            os.replace(self.tmp, self.dest)
        except OSError as exc:
            self.discard()
            raise OutputError(f"cannot write {self.dest}: {exc.strerror or first_line(exc)}") from None
        self.done = True
        _fsync_dir(self.dest.parent)
        for fd in [self.fd] + [fd for _, fd in self.extra]:
            os.close(fd)
        if self.after is not None:
            self.after()
        return self.files

    def discard(self) -> None:
        if self.done:
            return
        self.done = True
        discard(self.tmp, self.fd)
        for path, fd in self.extra:
            discard(path, fd)


def stage_bytes(dest: Path, data: bytes) -> Staged:
    """``data`` written in full beside ``dest`` under a temporary name, ready to publish."""
    tmp, fd = temp_file(dest.parent if str(dest.parent) else Path("."), ".tmp")
    try:
        write_all(fd, data)
    except BaseException as exc:
        discard(tmp, fd)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {dest}: {exc.strerror or first_line(exc)}") from None
        raise
    return Staged(dest, tmp, fd)


def discard(path: Path, fd: int | None) -> None:
    _unlink(path)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove temporary files of dead onnx_split runs from ``directory``; return what was removed.

    Only names matching onnx_split's own pattern, only when the pid in the name is not alive (and is
    not this process), and only when no one holds the file's lock.
    """
    removed = []
    for name in _listdir(directory):
        match = _TMP_NAME.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        path = directory / name
        if _remove_if_unused(path, lambda fd: True):
            removed.append(path)
    return removed


def is_onnx_split_data(path: Path) -> bool:
    """Whether ``path`` is an external data file onnx_split wrote (its magic header)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(DATA_MAGIC)) == DATA_MAGIC
    except OSError:
        return False


def remove_unreferenced_data(output: Path, referenced: Callable[[], set[Path] | None],
                             keep: set[Path] = frozenset()) -> list[Path]:
    """Remove onnx_split's external data files of ``output`` that its current model does not use
    (never one of ``keep``: the run's inputs, e.g. the input model's own data).

    ``referenced()`` reads the files the model at ``output`` refers to now (None: unknown, remove
    nothing); it is asked only once a file's lock is held, so a file about to be published (whose
    writer still holds its lock) is never taken for a leftover.
    """
    pattern = data_name_pattern(output.name)
    removed = []
    for name in _listdir(output.parent):
        if not pattern.fullmatch(name):
            continue
        path = output.parent / name

        def unused(fd: int, path: Path = path) -> bool:
            if os.pread(fd, len(DATA_MAGIC), 0) != DATA_MAGIC:
                return False  # not a file onnx_split wrote
            refs = referenced()
            return refs is not None and path.resolve() not in refs and path.resolve() not in keep

        if _remove_if_unused(path, unused):
            removed.append(path)
    return removed


def _remove_if_unused(path: Path, unused: Callable[[int], bool]) -> bool:
    """Unlink ``path`` if it is a regular file whose lock is free and ``unused(fd)`` holds."""
    if fcntl is None:
        return False  # without locks a live writer's file cannot be told from a leftover
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it (or locks do not work here: keep it)
        try:
            now = os.lstat(path)
        except OSError:
            return False
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino) or not unused(fd):
            return False
        _unlink(path)
        return True
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
