"""ONNX Runtime sessions opened in a child process, so that a native crash of ORT (a segfault or
an abort while optimizing or running a model) becomes a one-line reason instead of ending the
tool with no message.

One child opens every model of a batch in turn (and runs it once on feeds, when given). When it
dies, the model it was working on is reported as crashed, and a fresh child goes on with the
rest. The child's output is captured, never shown: ORT's own messages come back in the reasons.

Models travel as serialized bytes, or as a path (large models and models with external data:
:func:`probe_source` writes those to a temporary folder). Feeds travel pickled in the same
temporary job file.

Typical use, before opening a model in this process::

    with probe_source(model) as source:
        results = probe_models([Probe(source, "the rewritten model", optimization=level)
                                for level in ("disabled", "enabled")])
    reason = first_crash(results)  # None, or "onnxruntime crashed (SIGSEGV) loading ..."
"""
from __future__ import annotations

import json
import logging
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from .model_io import model_source
from .runtime import CPU, ort_error

log = logging.getLogger(__name__)

CHILD_SCRIPT = Path(__file__).with_name("_probe_child.py")
"""What the child runs (executed by path, so the child imports onnxruntime but not onnx_split)."""

LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "enabled": "ORT_ENABLE_ALL",
}
"""Optimization levels by the names :mod:`onnx_split.runtime` uses ("enabled" is ORT's default)."""

BYTES_LIMIT = 100 * 2**20
"""Models serializing to more than this go to the child as a file, not as bytes."""

_BOOT = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; sys.argv = sys.argv[1:]; "
         "runpy.run_path(sys.argv[0], run_name='__main__')")
"""``python -c`` bootstrap: drops the working directory from sys.path (a file there must not shadow
a module), then runs the child script."""


@dataclass(frozen=True)
class Probe:
    """One session to open in the child (and run once, when ``feeds`` is given)."""

    source: bytes | str
    """The serialized model, or the path of a model file (its external data beside it)."""
    label: str
    """What the model is, for the reason: "the rewritten model", "candidate 'batched' of fc1"."""
    provider: str = CPU
    optimization: str = "enabled"
    """A key of :data:`LEVELS`."""
    threads: int = 1
    feeds: Mapping[str, np.ndarray] | None = None

    @property
    def level(self) -> str:
        return LEVELS[self.optimization]


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    ok: bool
    crashed: bool = False
    """True when the child died (a signal, a non-zero exit or a timeout) on this probe."""
    reason: str | None = None
    """None when ``ok``; else one line: ORT's error, or how the child died and doing what."""
    providers: tuple[str, ...] = ()
    """The providers the session really used (when ``ok``)."""


@dataclass(frozen=True)
class BatchStats:
    """How many children a :func:`probe_models` call started, and its wall time."""

    children: int
    seconds: float


def probe_models(probes: Sequence[Probe], *, timeout: float | None = None, skip_crashed_labels: bool = False,
                 stats: list[BatchStats] | None = None) -> list[ProbeResult]:
    """Open every probe's session in a child process, in order; one result per probe.

    One child serves the whole batch; after a crash, a fresh child resumes with the next probe.
    ``timeout`` (seconds) bounds each child: the probe it was on when killed is reported as
    crashed, and the rest go on in a fresh child. With ``skip_crashed_labels``, the later probes of
    a label that crashed are not tried (their reason says so). ``stats``, when given, receives one
    :class:`BatchStats`. Never raises for what a model does to ORT; an OSError starting Python
    itself propagates.
    """
    unknown = sorted({p.optimization for p in probes} - LEVELS.keys())
    if unknown:
        raise ValueError(f"unknown optimization level {unknown[0]!r}: one of {', '.join(LEVELS)}")
    started = time.perf_counter()
    results: dict[int, ProbeResult] = {}
    children = 0
    if probes:
        with tempfile.TemporaryDirectory(prefix="onnx_split-probe-") as tmp:
            job_path = Path(tmp) / "job.pickle"
            with open(job_path, "wb") as f:
                pickle.dump([_job(p) for p in probes], f, protocol=pickle.HIGHEST_PROTOCOL)
            start = 0
            while True:
                if skip_crashed_labels:
                    crashed = {r.probe.label for r in results.values() if r.crashed}
                    for i in range(start, len(probes)):
                        if probes[i].label in crashed and i not in results:
                            results[i] = ProbeResult(probes[i], False, reason=f"not tried: {probes[i].label} "
                                                                               f"crashed onnxruntime already")
                while start < len(probes) and start in results:
                    start += 1
                if start == len(probes):
                    break
                children += 1
                skip_path = Path(tmp) / f"skip{children}.json"
                skip_path.write_text(json.dumps(sorted(i for i in results if i >= start)))
                start = _run_child(probes, job_path, Path(tmp) / f"results{children}.jsonl", skip_path, start,
                                   timeout, results)
    if stats is not None:
        stats.append(BatchStats(children, time.perf_counter() - started))
    return [results[i] for i in range(len(probes))]


def first_crash(results: Sequence[ProbeResult]) -> str | None:
    """The reason of the first probe that crashed the child, or None."""
    return next((r.reason for r in results if r.crashed), None)


def first_failure(results: Sequence[ProbeResult]) -> str | None:
    """The reason of the first probe that did not succeed (crash or ORT error), or None."""
    return next((r.reason for r in results if not r.ok), None)


@contextmanager
def probe_source(model: onnx.ModelProto, limit: int = BYTES_LIMIT) -> Iterator[bytes | str]:
    """The model as :attr:`Probe.source`: its bytes when small, else the path of a temporary copy
    with external data (removed on exit)."""
    with model_source(model, limit=limit) as source:
        yield source


def loads_in_ort(model: onnx.ModelProto, label: str = "the model", *, providers: Sequence[str] = (CPU,),
                 levels: Sequence[str] = ("disabled", "enabled"), timeout: float | None = None) -> str:
    """"yes" if ORT opens ``model`` at every level on every provider, else why not (one line).

    Each session is opened in a child process, so a model that crashes ORT gives a reason."""
    with probe_source(model) as source:
        results = probe_models([Probe(source, label, provider, level)
                                for provider in providers for level in levels], timeout=timeout)
    return first_failure(results) or "yes"


def crash_reason(model: onnx.ModelProto, label: str, *, providers: Sequence[str] = (CPU,),
                 levels: Sequence[str] = ("disabled", "enabled"), feeds: Mapping[str, np.ndarray] | None = None,
                 threads: int = 1, timeout: float | None = None) -> str | None:
    """None if ORT opens (and, with ``feeds``, runs once) ``model`` at every level on every
    provider without crashing; else the one-line reason of the first crash.

    ORT errors that are not crashes give None: the in-process session that follows reports them
    as it always has. Call this before opening a model in this process."""
    with probe_source(model) as source:
        return crash_screen({label: source}, providers=providers, levels=levels,
                            feeds_list=[feeds] if feeds is not None else [None], threads=threads,
                            timeout=timeout)[label]


def crash_screen(sources: Mapping[str, bytes | str], *, providers: Sequence[str] = (CPU,),
                 levels: Sequence[str] = ("disabled", "enabled"),
                 feeds_list: Sequence[Mapping[str, np.ndarray] | None] = (None,), threads: int = 1,
                 timeout: float | None = None) -> dict[str, str | None]:
    """Several models (label -> :attr:`Probe.source`) screened in one child: each is opened at every
    level on every provider and run once on each of ``feeds_list`` (None: opened only). Returns
    label -> None, or the reason of the first crash it caused. A crashed model is not tried again
    (its remaining probes are skipped), so one bad model costs one extra child."""
    probes = [Probe(source, label, provider, level, threads, feeds)
              for label, source in sources.items() for provider in providers for level in levels
              for feeds in feeds_list]
    found: dict[str, str | None] = {label: None for label in sources}
    for result in probe_models(probes, timeout=timeout, skip_crashed_labels=True):
        if result.crashed and found[result.probe.label] is None:
            found[result.probe.label] = result.reason
    return found


# -- the parent side of one child ------------------------------------------------------------------

def _job(probe: Probe) -> dict:
    feeds = None if probe.feeds is None else {k: np.asarray(v) for k, v in probe.feeds.items()}
    from .kernel import kernel_library

    return {"source": probe.source, "provider": probe.provider, "optimization": probe.level,
            "threads": probe.threads, "feeds": feeds, "custom_ops": kernel_library()}


def _run_child(probes: Sequence[Probe], job_path: Path, results_path: Path, skip_path: Path, start: int,
               timeout: float | None, results: dict[int, ProbeResult]) -> int:
    """Run one child from probe ``start`` (skipping those already in ``results``); fill ``results``;
    return where the next child starts."""
    command = [sys.executable, "-c", _BOOT, str(CHILD_SCRIPT), str(job_path), str(results_path), str(start),
               str(skip_path)]
    timed_out = False
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        except BaseException:  # KeyboardInterrupt: do not leave the child behind
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    current, phase, reached = None, "load", False
    for line in _lines(results_path):
        if "i" not in line:
            continue
        i, probe = line["i"], probes[line["i"]]
        reached = True
        if "phase" in line:
            current, phase = i, line["phase"]
        elif line.get("ok"):
            results[i] = ProbeResult(probe, True, providers=tuple(line.get("providers", ())))
            current = None
        elif "error" in line:
            text = ort_error(Exception(line["error"]))
            results[i] = ProbeResult(probe, False, reason=f"onnxruntime cannot {_doing(phase, probe, text)}")
            current = None
    how = _death(proc.returncode, timed_out, timeout, stderr)
    if not reached and not all(i in results for i in range(start, len(probes))):
        # the child failed before its first model: no model is to blame, none is tried
        for i in (i for i in range(start, len(probes)) if i not in results):
            results[i] = ProbeResult(probes[i], False, crashed=True,
                                     reason=f"the onnxruntime child process {how.replace('crashed', 'failed')} "
                                            f"before {_doing('load', probes[i])}")
        return len(probes)
    if current is None:
        if proc.returncode != 0 and not timed_out:
            log.debug("probe child exited %s after its last model: %s", proc.returncode, _last_line(stderr))
        return len(probes)
    probe = probes[current]
    results[current] = ProbeResult(probe, False, crashed=True, reason=f"onnxruntime {how} {_doing(phase, probe)}")
    log.info("ORT child %s on %s (%s, %s)", how, probe.label, probe.level, probe.provider)
    return current + 1


def _doing(phase: str, probe: Probe, error: str | None = None) -> str:
    verb = ("run" if error is not None else "running") if phase == "run" else (
        "load" if error is not None else "loading")
    text = f"{verb} {probe.label} with {probe.level} on {probe.provider}"
    return f"{text}: {error}" if error is not None else text


def _death(returncode: int | None, timed_out: bool, timeout: float | None, stderr: str) -> str:
    if timed_out:
        return f"did not finish in {timeout:g} s"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name})"
    last = _last_line(stderr)
    return f"crashed (child exit {returncode}{': ' + last if last else ''})"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _lines(path: Path) -> Iterator[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue

