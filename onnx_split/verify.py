"""Numerical equivalence of two models in ONNX Runtime, per provider and optimization level.

An element passes when ``|got - ref| <= atol + rtol * max(|ref|, rms(ref))``: relative to the
element, but never tighter than relative to the output's typical size, so that accumulation-order
rounding of outputs near zero does not fail a lossless split while a dropped significant weight
(an error of about 1/sqrt(K) of the output's size) does.

The default ``atol`` (by dtype) is a floor for outputs of ordinary size; it is scaled down to
``rtol * rms(ref)`` for an output whose size is below ``atol / rtol`` (and not all zero), so that an
output of size 1e-8 cannot pass with a 100% error under an atol of 1e-6. Rounding is relative to
the output's size, so lossless splits pass either way. An ``atol`` given explicitly is used as given.

A verification must compare something: an entry whose outputs hold no finite element on any input
set (all-NaN inputs, a zero-size dim) is ``not verified``, and so is one where a rewritten branch
of an ``If`` of the main graph was taken by none of the input sets. Both count as not passed.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import isolate
from .errors import InputError, first_line
from .memory import give_back
from .spill import loaded, refers_outside
from .model_io import is_large, save_model
from .runtime import CPU, make_session, model_source, ort_error, provider_status

log = logging.getLogger(__name__)

_DEFAULTS = {  # (rtol, atol) by output dtype
    "float64": (1e-9, 1e-12),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 1e-2),
}
REFERENCE = "onnx.reference"


def default_tolerances(dtype) -> tuple[float, float]:
    return _DEFAULTS.get(np.dtype(dtype).name, _DEFAULTS["float32"])


@dataclass
class OutputComparison:
    name: str
    max_abs: float
    max_rel: float
    """max |got - ref| / max(|ref|, rms(ref))"""
    passed: bool
    min_rtol: float
    """the smallest rtol that would pass with this atol"""
    rtol: float
    atol: float
    """the atol applied (the default one scaled to the output's size, see the module docstring)"""
    note: str = ""
    compared: int = 0
    """finite elements compared (every element of an exactly compared integer or bool output)"""


@dataclass
class VerificationEntry:
    provider: str
    optimization: str
    passed: bool | None  # None: could not run (provider unavailable); False also when not verified
    status: str  # passed | failed | unavailable | not verified (nothing compared, see the module docstring)
    detail: str = ""
    outputs: list[OutputComparison] = field(default_factory=list)


def compare(name: str, ref: np.ndarray, got: np.ndarray, rtol: float | None = None,
            atol: float | None = None) -> OutputComparison:
    if isinstance(ref, list) or isinstance(got, list):
        return _compare_sequences(name, ref, got, rtol, atol)
    ref, got = np.asarray(ref), np.asarray(got)
    d_rtol, d_atol = default_tolerances(ref.dtype)
    rtol = d_rtol if rtol is None else rtol
    scaled = atol is None
    atol = d_atol if atol is None else atol
    if ref.shape != got.shape or ref.dtype != got.dtype:
        note = f"shape/dtype {got.shape}/{got.dtype} differs from {ref.shape}/{ref.dtype}"
        return OutputComparison(name, float("inf"), float("inf"), False, float("inf"), rtol, atol, note)
    if ref.dtype.kind not in "fcV":
        equal = bool(np.array_equal(ref, got))
        return OutputComparison(name, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"),
                                equal, 0.0 if equal else float("inf"), rtol, atol, "compared exactly", int(ref.size))
    with np.errstate(all="ignore"):  # inf - inf, overflowing squares: handled below, never printed
        return _compare_floats(name, ref, got, rtol, atol, scaled)


def _compare_floats(name: str, ref: np.ndarray, got: np.ndarray, rtol: float, atol: float,
                    scaled: bool) -> OutputComparison:
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    same_nan = np.isnan(r) == np.isnan(g)
    same_inf = np.where(np.isinf(r) | np.isinf(g), r == g, True)
    finite = np.isfinite(r) & np.isfinite(g)
    if not (same_nan.all() and same_inf.all()):
        return OutputComparison(name, float("inf"), float("inf"), False, float("inf"), rtol, atol,
                                "NaN/inf positions differ")
    diff = np.where(finite, np.abs(g - r), 0.0)
    scale_all = _rms(r[finite])
    note = ""
    if scaled and 0 < rtol * scale_all < atol:
        atol = max(rtol * scale_all, _rounding_floor(ref.dtype))
        note = f"default atol scaled to the output's size (rms {scale_all:.3g})"
    scale = np.maximum(np.abs(np.where(finite, r, 0.0)), scale_all)
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = np.where(scale > 0, diff / scale, np.where(diff > 0, np.inf, 0.0))
    need = np.where(diff > atol, (diff - atol) / scale, 0.0)
    max_rel = float(rel.max()) if rel.size else 0.0
    min_rtol = float(need.max()) if need.size else 0.0
    passed = bool(np.all(diff <= atol + rtol * scale)) and bool(np.isfinite(diff).all())  # 1e308 - -1e308
    compared = int(finite.sum())
    if not compared:
        note = "no finite element to compare"
    return OutputComparison(name, max_abs, max_rel, passed, min_rtol, rtol, atol, note, compared)


def _rms(values: np.ndarray) -> float:
    """Root mean square without overflow (values near the float64 limit square to inf)."""
    if not values.size:
        return 0.0
    peak = float(np.abs(values).max())
    return peak * float(np.sqrt(np.mean(np.square(values / peak)))) if peak > 0 else 0.0


def _rounding_floor(dtype) -> float:
    """A few steps of the dtype's smallest subnormal: the absolute rounding no output can avoid."""
    try:
        info = np.finfo(dtype)
    except (TypeError, ValueError):  # bfloat16 and the other ml_dtypes types
        import ml_dtypes

        info = ml_dtypes.finfo(dtype)
    return 8 * float(info.smallest_subnormal)


def _compare_sequences(name: str, ref, got, rtol, atol) -> OutputComparison:
    """A sequence output: element by element; it passes when every element does."""
    if not (isinstance(ref, list) and isinstance(got, list)) or len(ref) != len(got):
        inf = float("inf")
        return OutputComparison(name, inf, inf, False, inf, rtol or 0.0, atol or 0.0, "sequences differ in length")
    parts = [compare(f"{name}[{i}]", a, b, rtol, atol) for i, (a, b) in enumerate(zip(ref, got))]
    if not parts:
        return OutputComparison(name, 0.0, 0.0, True, 0.0, rtol or 0.0, atol or 0.0, "empty sequences")
    return OutputComparison(name, max(p.max_abs for p in parts), max(p.max_rel for p in parts),
                            all(p.passed for p in parts), max(p.min_rtol for p in parts), parts[0].rtol,
                            max(p.atol for p in parts), f"sequence of {len(parts)} tensors, compared one by one",
                            sum(p.compared for p in parts))


def verify_models(original: onnx.ModelProto, rewritten: onnx.ModelProto,
                  feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]], *, providers: list[str],
                  rtol: float | None = None, atol: float | None = None, threads: int = 1) -> list[VerificationEntry]:
    """Run both models on every provider with graph optimizations disabled and enabled, on one set
    of feeds or on each of a list of them (one session per model, provider and level serves all
    sets; an output's figures are the worst over the sets, and it passes when it passes on each).

    A provider that does not really run here gives an entry with status ``unavailable``. When ONNX
    Runtime cannot run the *original* model at all (e.g. bfloat16 MatMul on CPU), both models are
    compared in onnx's reference evaluator instead, and the entry says so. An entry that compared no
    finite element, or whose inputs never took a rewritten ``If`` branch of the main graph, is
    ``not verified`` (``passed`` False).
    """
    sets = [feeds] if isinstance(feeds, dict) else list(feeds)
    if not sets:
        raise ValueError("verify_models needs at least one set of feeds")
    entries: list[VerificationEntry] = []
    with model_source(original) as src_a, model_source(rewritten) as src_b:
        for provider in providers:
            why = provider_status(provider)
            for optimization in ("disabled", "enabled"):
                if why:
                    entries.append(VerificationEntry(provider, optimization, None, "unavailable", why))
                    continue
                try:
                    session_a = make_session(src_a, provider, optimization, threads)
                    refs = [session_a.run(None, f) for f in sets]
                except Exception as exc:  # ORT raises its own types
                    reason = ort_error(exc)
                    if provider == CPU and optimization == "disabled":
                        entries.append(_reference(original, rewritten, sets, rtol, atol, reason))
                    else:
                        entries.append(VerificationEntry(provider, optimization, None, "unavailable",
                                                         f"the original model does not run here: {reason}"))
                    continue
                names = [o.name for o in session_a.get_outputs()]
                del session_a  # one model in memory at a time: large models need it
                give_back(collect=False)
                try:
                    session_b = make_session(src_b, provider, optimization, threads)
                    gots = [session_b.run(None, f) for f in sets]
                except Exception as exc:
                    entries.append(VerificationEntry(provider, optimization, False, "failed",
                                                     f"the rewritten model does not run: {ort_error(exc)}"))
                    continue
                del session_b
                give_back(collect=False)
                entries.append(_entry(provider, optimization, names, refs, gots, rtol, atol))
    if any(e.status == "passed" for e in entries):
        missed = unreached_branches(original, rewritten, sets, threads)
        if missed:
            why = (f"{'; '.join(missed)}: the rewrite there was never run, so nothing checks it; give --inputs "
                   f"that reach it (or --force)")
            for e in entries:
                if e.status == "passed":
                    e.status, e.passed = "not verified", False
                    e.detail = f"{e.detail}; {why}" if e.detail else why
    return entries


def _entry(provider, optimization, names, refs, gots, rtol, atol, detail="") -> VerificationEntry:
    """One entry from the outputs of each input set (``refs[i]``, ``gots[i]``: one list per set)."""
    outputs = [_worst([compare(n, ref[j], got[j], rtol, atol) for ref, got in zip(refs, gots)])
               for j, n in enumerate(names)]
    passed = all(o.passed for o in outputs)
    status = "passed" if passed else "failed"
    if passed and not sum(o.compared for o in outputs):
        status, passed = "not verified", False
        what = "no output element" if not any(np.size(r) for ref in refs for r in ref if not isinstance(r, list)) \
            else "every output element is NaN or infinite"
        note = (f"nothing was compared ({what} on {len(refs)} input set{'s' if len(refs) != 1 else ''}): "
                f"give inputs with --inputs or --input-shape whose outputs are finite and not empty")
        detail = f"{detail}; {note}" if detail else note
    return VerificationEntry(provider, optimization, passed, status, detail, outputs)


def _worst(parts: list[OutputComparison]) -> OutputComparison:
    """One output compared on several input sets: the worst figures; it passes if it passes on each."""
    if len(parts) == 1:
        return parts[0]
    worst = max(parts, key=lambda p: (not p.passed, p.max_rel))
    notes = list(dict.fromkeys(p.note for p in parts if p.note))
    return OutputComparison(worst.name, max(p.max_abs for p in parts), max(p.max_rel for p in parts),
                            all(p.passed for p in parts), max(p.min_rtol for p in parts), worst.rtol, worst.atol,
                            "; ".join(notes), sum(p.compared for p in parts))


def unreached_branches(original: onnx.ModelProto, rewritten: onnx.ModelProto, sets: list[dict],
                       threads: int = 1) -> list[str]:
    """The branches of ``If`` nodes of the main graph that the rewrite changed and that none of the
    input ``sets`` takes (their condition read from a CPU run of ``original``).

    If nodes inside subgraphs, and Loop/Scan bodies, are not followed: they are verified as far as
    the inputs reach them.
    """
    before = {tuple(n.output): n for n in original.graph.node if n.op_type == "If" and n.domain in ("", "ai.onnx")}
    changed = []  # (node, branch attribute names changed)
    for node in rewritten.graph.node:
        old = before.get(tuple(node.output)) if node.op_type == "If" else None
        if old is None:
            continue
        graphs = {a.name: a.g for a in old.attribute if a.type == onnx.AttributeProto.GRAPH}
        moved = [a.name for a in node.attribute if a.type == onnx.AttributeProto.GRAPH and a.name in graphs
                 and a.g.SerializeToString(deterministic=True) != graphs[a.name].SerializeToString(deterministic=True)]
        if moved:
            changed.append((old, moved))
    if not changed:
        return []
    from .runtime import capture

    conds = list(dict.fromkeys(node.input[0] for node, _ in changed))
    try:
        values = capture(original, conds, sets, threads)
    except Exception as exc:  # ORT raises its own types; the check is a help, not a requirement
        log.info("could not read the If conditions to see which branches ran: %s", first_line(exc))
        return []
    missed = []
    for node, moved in changed:
        taken = {bool(np.asarray(v[node.input[0]]).reshape(-1)[0]) for v in values}
        for branch in moved:
            if (branch == "then_branch" and True not in taken) or (branch == "else_branch" and False not in taken):
                missed.append(f"the {branch} of If {node.name or node.output[0]!r} was taken by none of the "
                              f"{len(sets)} input set{'s' if len(sets) != 1 else ''}")
    return missed


def _quiet_run(evaluator, feeds):
    """A reference-evaluator run whose numpy warnings (NaN in a dot, overflow) are not printed: the
    comparison judges the values."""
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return evaluator.run(None, feeds)


def _reference(original, rewritten, sets, rtol, atol, ort_reason: str) -> VerificationEntry:
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(loaded(original))
        refs = [_quiet_run(evaluator, f) for f in sets]
    except Exception as exc:
        raise InputError(
            f"the input model runs neither in ONNX Runtime ({ort_reason}) nor in onnx's reference evaluator "
            f"({first_line(exc, 120)}); give input shapes with --input-shape or real inputs with --inputs, "
            f"or skip with --no-verify") from None
    names = [o.name for o in original.graph.output]
    try:
        evaluator = ReferenceEvaluator(rewritten)
        gots = [_quiet_run(evaluator, f) for f in sets]
    except Exception as exc:
        return VerificationEntry(REFERENCE, "n/a", False, "failed",
                                 f"the rewritten model does not run: {first_line(exc)}")
    log.info("ONNX Runtime cannot run the original (%s); verified with onnx.reference", ort_reason)
    return _entry(REFERENCE, "n/a", names, refs, gots, rtol, atol,
                  f"ONNX Runtime cannot run the original ({ort_reason}); compared in onnx's reference evaluator")


def check(model: onnx.ModelProto) -> dict:
    """onnx's full check (with shape inference) of the rewritten model."""
    try:
        if refers_outside(model):                          # a spilled run's model: by path, beside its weights
            with model_source(model) as path:
                onnx.checker.check_model(path, full_check=True)
        elif not is_large(model):
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory(prefix="onnx_split-") as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(model, path, external_data=True)
                onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # the checker raises several types
        return {"passed": False, "error": first_line(exc)}
    return {"passed": True, "error": None}


def loads_in_ort(model: onnx.ModelProto, label: str = "the model") -> str:
    """"yes", or why the installed ONNX Runtime cannot load the model (one line), with graph
    optimizations off and at ORT's default (ORT_ENABLE_ALL), each in a child process: a model
    that crashes ORT gives "onnxruntime crashed (SIGSEGV) loading ..." instead of ending the run."""
    return isolate.loads_in_ort(model, label)


def crashed(reason: str) -> bool:
    """Whether a load check's reason is a native crash (or hang) of ORT, not an error it reported."""
    return reason.startswith(("onnxruntime crashed", "onnxruntime did not finish"))


def crash_entry(reason: str) -> VerificationEntry:
    """A verification that failed because ONNX Runtime crashed on the rewritten model."""
    return VerificationEntry(CPU, "enabled", False, "failed", reason)


def screen_sessions(reference: onnx.ModelProto, model: onnx.ModelProto, *, providers: list[str],
                    levels: tuple[str, ...], feeds_list: list[dict], threads: int = 1) -> str | None:
    """Why ONNX Runtime crashes opening or running the rewritten ``model`` (on the providers, levels
    and inputs the in-process sessions will use), found in one child process before any of them
    opens it here; None if it does not. Raises InputError when the ``reference`` itself crashes ORT."""
    with isolate.probe_source(reference) as ref_source, isolate.probe_source(model) as new_source:
        found = isolate.crash_screen({"the original model": ref_source, "the rewritten model": new_source},
                                     providers=providers, levels=levels, feeds_list=feeds_list, threads=threads)
    if found["the original model"] is not None:
        raise InputError(f"{found['the original model']}; skip verification and timing with --no-verify --no-bench")
    return found["the rewritten model"]
