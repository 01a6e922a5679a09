"""Calibration data: samples of the model's inputs that significance and error budgets are measured on.

``--calibration FILE.npz`` holds one array per graph input name, first axis = samples. The samples
are split once, by a seeded shuffle, into the *search* part (feature norms, the budget search) and
a *held-out* part the search never sees, on which the error of the result is checked. Without a
file, seeded random inputs stand in, and :attr:`Calibration.source` says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError
from .inputs import batch_shapes, graph_inputs, make_feeds, read_npz, tensor_dtype

RANDOM_SAMPLES = 64
"""Samples of seeded random inputs used when no calibration file is given."""


CAPTURE_BYTES = 128 * 2**20
"""A streamed run's captured site activations are held under about this many bytes: on a deep
model, a batch of samples captured at every site at once would otherwise be a sizeable part of
the run's memory (``Calibration.fit_batches``)."""


@dataclass
class Calibration:
    search: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    source: str
    """Where the samples come from, for the report (file and counts, or "seeded random inputs")."""
    random: bool = False
    batched: tuple[str, ...] = ()
    """The inputs whose first axis is the sample axis (the others, scalars, go with every batch)."""
    batch_size: int = 64
    """Samples per run when the calibration is streamed (``--calibration-batch``)."""

    def first_sample(self) -> dict[str, np.ndarray]:
        """The first search sample alone, as feeds."""
        return {k: (v[:1] if k in self.batched else v) for k, v in self.search.items()}

    def fit_batches(self, per_sample: int) -> int:
        """Cut the samples per run so that a run's captured activations, ``per_sample`` bytes a
        sample, stay under :data:`CAPTURE_BYTES` (never below one sample); only before any batches
        are made (they are kept by identity). Returns the samples per run."""
        if "_batches" not in self.__dict__ and per_sample > 0:
            self.batch_size = max(1, min(self.batch_size, CAPTURE_BYTES // per_sample))
        return self.batch_size

    def batches(self, part: str, limit: int | None = None, fold: int | None = None) -> list[dict[str, np.ndarray]]:
        """``search`` or ``held_out`` (with ``fold`` 0 or 1, the first or second half of its
        samples; with ``limit``, only the first ``limit`` of those) as feeds of at most ``batch_size`` samples each
        (views, not copies); the same list object every time, so evaluators can keep its
        reference outputs."""
        cache = self.__dict__.setdefault("_batches", {})
        if (part, limit, fold) not in cache:
            feeds = getattr(self, part)
            n, size = _count(feeds), max(1, self.batch_size)
            lo, hi = (0, n) if fold is None else ((0, n // 2) if fold == 0 else (n // 2, n))
            hi = hi if limit is None else min(hi, lo + limit)
            cache[part, limit, fold] = [{k: (v[start:min(start + size, hi)] if k in self.batched else v)
                                         for k, v in feeds.items()} for start in range(lo, max(hi, lo + 1), size)]
        return cache[part, limit, fold]

    @property
    def n_search(self) -> int:
        return _count(self.search)

    @property
    def n_held_out(self) -> int:
        return _count(self.held_out)


def _samples(feeds: dict[str, np.ndarray]) -> str:
    n = _count(feeds)
    return f"{n} sample{'s' if n != 1 else ''}"


def _count(feeds: dict[str, np.ndarray]) -> int:
    return max((int(v.shape[0]) for v in feeds.values() if v.ndim), default=0)


def load_calibration(path: str | Path, model: onnx.ModelProto, *, holdout: float = 0.25, seed: int = 0,
                     batch_size: int = 64) -> Calibration:
    """Read and check ``path`` against the model's inputs; split it into search and held-out samples."""
    p = Path(path)
    specs = graph_inputs(model)
    names = [s.name for s in specs]
    for spec in specs:
        tensor_dtype(spec)
    arrays, members = read_npz(p, "--calibration", names)  # only the members named like graph inputs are read
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"--calibration {p} has no array named {missing[0]!r}: it needs one array per graph input "
                         f"({', '.join(names)}), it has {', '.join(sorted(members)) or 'none'}")
    extra = sorted(set(members) - set(names))
    if extra:
        raise InputError(f"--calibration {p} has arrays that are not graph inputs: {', '.join(extra)} "
                         f"(the graph inputs are {', '.join(names)})")
    counts, batched = set(), []
    for spec in specs:
        value = arrays[spec.name]
        want = tensor_dtype(spec)
        if value.dtype != want:
            raise InputError(f"--calibration array {spec.name!r} has dtype {value.dtype}, the model wants {want}")
        dims = _dims(spec)
        shown = ["?" if d is None else d for d in dims]
        if value.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], value.shape[1:])):
            raise InputError(f"--calibration array {spec.name!r} has shape {list(value.shape)}, the model wants "
                             f"{shown} (first axis = samples)")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise InputError(f"--calibration array {spec.name!r} holds NaN or infinite values")
        if not dims:  # a scalar input (a flag, a scale): the same for every sample
            continue
        if dims[0] is not None:  # samples are split (search / held out), so the count must be free
            raise InputError(f"--calibration needs graph input {spec.name!r} to have a dynamic first (batch) dim, "
                             f"but it is fixed at {dims[0]}: export the model with a dynamic batch dim")
        counts.add(int(value.shape[0]))
        batched.append(spec.name)
    if len(counts) > 1:
        raise InputError(f"--calibration arrays disagree on the number of samples: {sorted(counts)}")
    n = counts.pop() if counts else 0
    if n < 2:
        raise InputError(f"--calibration needs at least 2 samples (some are held out), {p} has {n}")
    search, held = _split(arrays, batched, n, holdout, seed)
    return Calibration(search, held, f"{p.name}: {_samples(search)} searched, {_count(held)} held out",
                       batched=tuple(batched), batch_size=batch_size)


def random_calibration(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], *, holdout: float = 0.25,
                       seed: int = 0, samples: int = RANDOM_SAMPLES, purpose: str = "--tolerance",
                       batch_size: int = 64) -> Calibration:
    """Seeded random samples (standard normal floats) in place of real calibration data.

    ``purpose`` names what needs the samples, for the error raised when the model's inputs have a
    fixed first dim (random samples need a free batch dim, as a calibration file does).
    """
    batched = []
    for spec in graph_inputs(model):
        dims = _dims(spec)
        if not dims:
            continue
        if dims[0] is not None:
            raise InputError(f"{purpose} needs calibration samples, which need every graph input to have a dynamic "
                             f"first (batch) dim; {spec.name!r} has it fixed at {dims[0]}: export the model with a "
                             f"dynamic batch dim")
        batched.append(spec.name)
    feeds, _ = make_feeds(model, batch_shapes(model, samples, shapes), None, seed)
    search, held = _split(feeds, batched, samples, holdout, seed)
    return Calibration(search, held, f"seeded random inputs (seed {seed}): {_samples(search)} searched, "
                                     f"{_count(held)} held out; give --calibration FILE.npz for real data", random=True,
                       batched=tuple(batched), batch_size=batch_size)


def _split(arrays: dict[str, np.ndarray], batched: list[str], n: int, holdout: float, seed: int):
    """Search and held-out samples of the ``batched`` arrays; the others (scalars) go to both as they are."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(n - 1, max(1, math.ceil(holdout * n)))
    held, search = np.sort(order[:n_held]), np.sort(order[n_held:])
    pick = lambda index: {k: (v[index] if k in batched else v) for k, v in arrays.items()}  # noqa: E731
    return pick(search), pick(held)


def _dims(spec: onnx.ValueInfoProto) -> list[int | None]:
    tt = spec.type.tensor_type
    if not spec.type.HasField("tensor_type") or not tt.HasField("shape"):
        raise InputError(f"graph input {spec.name!r} has no tensor shape: calibration data cannot be checked against it")
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
