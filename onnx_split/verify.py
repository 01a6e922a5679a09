"""Numerical equivalence of two models in ONNX Runtime, per provider and optimization level.

An element passes when ``|got - ref| <= atol + rtol * max(|ref|, rms(ref))``: relative to the
element, but never tighter than relative to the output's typical size, so that accumulation-order
rounding of outputs near zero does not fail a lossless split while a dropped significant weight
(an error of about 1/sqrt(K) of the output's size) does.
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
    note: str = ""


@dataclass
class VerificationEntry:
    provider: str
    optimization: str
    passed: bool | None  # None: could not run (provider unavailable)
    status: str  # passed | failed | unavailable
    detail: str = ""
    outputs: list[OutputComparison] = field(default_factory=list)


def compare(name: str, ref: np.ndarray, got: np.ndarray, rtol: float | None = None,
            atol: float | None = None) -> OutputComparison:
    if isinstance(ref, list) or isinstance(got, list):
        return _compare_sequences(name, ref, got, rtol, atol)
    ref, got = np.asarray(ref), np.asarray(got)
    d_rtol, d_atol = default_tolerances(ref.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if ref.shape != got.shape or ref.dtype != got.dtype:
        note = f"shape/dtype {got.shape}/{got.dtype} differs from {ref.shape}/{ref.dtype}"
        return OutputComparison(name, float("inf"), float("inf"), False, float("inf"), rtol, atol, note)
    if ref.dtype.kind not in "fcV":
        equal = bool(np.array_equal(ref, got))
        return OutputComparison(name, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"),
                                equal, 0.0 if equal else float("inf"), rtol, atol, "compared exactly")
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    same_nan = np.isnan(r) == np.isnan(g)
    same_inf = np.where(np.isinf(r) | np.isinf(g), r == g, True)
    finite = np.isfinite(r) & np.isfinite(g)
    if not (same_nan.all() and same_inf.all()):
        return OutputComparison(name, float("inf"), float("inf"), False, float("inf"), rtol, atol,
                                "NaN/inf positions differ")
    diff = np.where(finite, np.abs(g - r), 0.0)
    scale_all = float(np.sqrt(np.mean(np.square(r[finite])))) if finite.any() else 0.0
    scale = np.maximum(np.abs(np.where(finite, r, 0.0)), scale_all)
    max_abs = float(diff.max()) if diff.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, diff / scale, np.where(diff > 0, np.inf, 0.0))
        need = np.where(diff > atol, (diff - atol) / scale, 0.0)
    max_rel = float(rel.max()) if rel.size else 0.0
    min_rtol = float(need.max()) if need.size else 0.0
    passed = bool(np.all(diff <= atol + rtol * scale))
    return OutputComparison(name, max_abs, max_rel, passed, min_rtol, rtol, atol)


def _compare_sequences(name: str, ref, got, rtol, atol) -> OutputComparison:
    """A sequence output: element by element; it passes when every element does."""
    if not (isinstance(ref, list) and isinstance(got, list)) or len(ref) != len(got):
        inf = float("inf")
        return OutputComparison(name, inf, inf, False, inf, rtol or 0.0, atol or 0.0, "sequences differ in length")
    parts = [compare(f"{name}[{i}]", a, b, rtol, atol) for i, (a, b) in enumerate(zip(ref, got))]
    if not parts:
        return OutputComparison(name, 0.0, 0.0, True, 0.0, rtol or 0.0, atol or 0.0, "empty sequences")
    return OutputComparison(name, max(p.max_abs for p in parts), max(p.max_rel for p in parts),
                            all(p.passed for p in parts), max(p.min_rtol for p in parts), parts[0].rtol, parts[0].atol,
                            f"sequence of {len(parts)} tensors, compared one by one")


def verify_models(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict[str, np.ndarray], *,
                  providers: list[str], rtol: float | None = None, atol: float | None = None,
                  threads: int = 1) -> list[VerificationEntry]:
    """Run both models on every provider with graph optimizations disabled and enabled.

    A provider that does not really run here gives an entry with status ``unavailable``. When ONNX
    Runtime cannot run the *original* model at all (e.g. bfloat16 MatMul on CPU), both models are
    compared in onnx's reference evaluator instead, and the entry says so.
    """
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
                    ref = session_a.run(None, feeds)
                except Exception as exc:  # ORT raises its own types
                    reason = ort_error(exc)
                    if provider == CPU and optimization == "disabled":
                        entries.append(_reference(original, rewritten, feeds, rtol, atol, reason))
                    else:
                        entries.append(VerificationEntry(provider, optimization, None, "unavailable",
                                                         f"the original model does not run here: {reason}"))
                    continue
                names = [o.name for o in session_a.get_outputs()]
                del session_a  # one model in memory at a time: large models need it
                try:
                    session_b = make_session(src_b, provider, optimization, threads)
                    got = session_b.run(None, feeds)
                except Exception as exc:
                    entries.append(VerificationEntry(provider, optimization, False, "failed",
                                                     f"the rewritten model does not run: {ort_error(exc)}"))
                    continue
                entries.append(_entry(provider, optimization, names, ref, got, rtol, atol))
    return entries


def _entry(provider, optimization, names, ref, got, rtol, atol, detail="") -> VerificationEntry:
    outputs = [compare(n, a, b, rtol, atol) for n, a, b in zip(names, ref, got)]
    passed = all(o.passed for o in outputs)
    return VerificationEntry(provider, optimization, passed, "passed" if passed else "failed", detail, outputs)


def _reference(original, rewritten, feeds, rtol, atol, ort_reason: str) -> VerificationEntry:
    from onnx.reference import ReferenceEvaluator

    try:
        ref = ReferenceEvaluator(original).run(None, feeds)
    except Exception as exc:
        raise InputError(
            f"the input model runs neither in ONNX Runtime ({ort_reason}) nor in onnx's reference evaluator "
            f"({first_line(exc, 120)}); give input shapes with --input-shape or real inputs with --inputs, "
            f"or skip with --no-verify") from None
    names = [o.name for o in original.graph.output]
    try:
        got = ReferenceEvaluator(rewritten).run(None, feeds)
    except Exception as exc:
        return VerificationEntry(REFERENCE, "n/a", False, "failed",
                                 f"the rewritten model does not run: {first_line(exc)}")
    log.info("ONNX Runtime cannot run the original (%s); verified with onnx.reference", ort_reason)
    return _entry(REFERENCE, "n/a", names, ref, got, rtol, atol,
                  f"ONNX Runtime cannot run the original ({ort_reason}); compared in onnx's reference evaluator")


def check(model: onnx.ModelProto) -> dict:
    """onnx's full check (with shape inference) of the rewritten model."""
    try:
        if not is_large(model):
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
