"""The dynamic side of the pass (``--dynamic-keep F``): which sites skip input blocks per call.

Every candidate site whose weight is float32, in the main graph, with at least two blocks of
``--dynamic-block`` inputs, gets a :class:`~onnx_split.plans.dynamic.DynamicPlan` keeping ``F`` of
its blocks (``--dynamic-rule topk``: exactly, per call; ``threshold``: on average, with a per-site
threshold calibrated on the calibration samples). With ``--tolerance E``, a greedy search makes
sites dynamic, largest saving first, while the relative output error on the calibration search
samples stays within E; the result is then measured on the held-out samples, as for static splits.

The output error and the verification reference both come from
:func:`onnx_split.dynamic_reference.reference_model` (the original with each dynamic site's input
masked by its selection, in standard ONNX ops), never from the rewrite forms.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import onnx

from .chains import Chain
from .config import SplitConfig
from .decisions import Decision, Kept, Planned, Unit
from .dynamic_reference import reference_model
from .errors import InputError
from .fitting import levels, upstream
from .planning import eligible
from .plans.dynamic import dynamic_reason, make_plan
from .pruned import ErrorReport, ErrorSum
from .runtime import CPU, capture, make_session, model_source
from .sites import Site, default_opset

log = logging.getLogger(__name__)

FORMS = {"kernel": "dynamic-kernel", "portable": "dynamic-portable", "fallback": "dynamic-fallback"}
AGAINST = "the original with the dynamic sites' block selection applied (dynamic_reference)"


@dataclass
class DynamicPlanning:
    decisions: dict[int, Decision]
    calibration: object | None
    model: onnx.ModelProto
    sites: list[Site]
    threads: int = 1
    notes: list[str] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    evaluations: int = 0

    def error(self, weights, tolerance, biases=None, dynamic: dict | None = None):
        """The relative output error of the written dynamic sites ``dynamic`` ({site: plan}) on the
        search and held-out calibration samples (``weights`` and ``biases``: static plans, none here)."""
        if self.calibration is None:
            return None, []
        plans = dynamic or {}
        cal = self.calibration
        search = output_error(self.model, self.sites, plans, cal.batches("search"), self.threads)
        held = output_error(self.model, self.sites, plans, cal.batches("held_out"), self.threads)
        met = None if tolerance is None else bool(held <= tolerance)
        return ErrorReport(cal.source, search, held, cal.n_search, cal.n_held_out, tolerance, met,
                           self.evaluations), []


def output_error(model: onnx.ModelProto, sites: list[Site], plans: dict, batches: list[dict], threads: int = 1
                 ) -> float:
    """||y' - y|| / ||y|| over all outputs: ``model`` against its dynamic reference with ``plans``."""
    if not plans:
        return 0.0
    total = ErrorSum()
    masked = reference_model(model, sites, plans)
    with model_source(model) as a, model_source(masked) as b:
        dense, dyn = make_session(a, CPU, "enabled", threads), make_session(b, CPU, "enabled", threads)
        batched = {i.name for i in model.graph.input if _batched(i)}
        for feeds in batches:
            for one in _calls(feeds, batched):
                total.add(dense.run(None, one), dyn.run(None, one))
    return total.value


def _batched(value_info) -> bool:
    dims = value_info.type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def _calls(feeds: dict, batched: set[str]):
    """One sample per call: a dynamic site selects its blocks per call, over the call's rows, so the
    error is measured the way a decoder meets it (one sample at a time)."""
    n = max((len(v) for k, v in feeds.items() if k in batched), default=0)
    if n <= 1:
        yield feeds
        return
    for j in range(n):
        yield {k: (v[j:j + 1] if k in batched else v) for k, v in feeds.items()}


def plan_dynamic(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, progress=None) -> DynamicPlanning:
    """One decision per site: a dynamic plan, or kept with why."""
    from .lossy import _calibration

    progress = progress or (lambda stage, done, total: None)
    opset = default_opset(model)

    def refusal(site):
        why = dynamic_reason(site, config.dynamic_block, opset)
        return None if why is None else f"not dynamic: {why}"

    decisions, candidates = eligible(sites, config, refusal)
    needs = config.dynamic_rule == "threshold" or config.dynamic_compensate or config.tolerance is not None
    purpose = ("--tolerance" if config.tolerance is not None else "--dynamic-rule threshold"
               if config.dynamic_rule == "threshold" else "--dynamic-compensate")
    calibration = _calibration(model, config, required=needs, wanted=config.verify, purpose=purpose)
    snapshot = onnx.ModelProto()  # the rewrite edits ``model`` in place; the error is measured on this copy
    snapshot.CopyFrom(model)
    result = DynamicPlanning(decisions, calibration, snapshot, sites, config.base_threads)
    plans = _plans(snapshot, sites, candidates, calibration, config, progress)
    chosen, reasons = dict(plans), {}
    if config.tolerance is not None:
        chosen, reasons = _search(result, plans, config)
    facts = MappingProxyType({"score": config.dynamic_score})
    for i in candidates:
        plan = chosen.get(i)
        if plan is None:
            decisions[i] = Kept("budget", reasons[i], facts)
        elif plan.flops >= 1:
            decisions[i] = Kept("plan", f"no saving: {plan.label} keeps every block", facts)
        else:
            decisions[i] = Planned(plan, f"{plan.label} ({config.dynamic_score} score)", facts)
    return result


def _plans(model, sites, candidates, calibration, config, progress) -> dict:
    """One plan per candidate. Top-k plans need no data. Threshold and compensated plans are
    calibrated in order, level by level of the candidates' dependency graph: each site on the
    activations of the model whose upstream candidates are already dynamic (a site downstream of
    dynamic sites sees smaller activations than the dense model's; a threshold calibrated on those
    would keep fewer blocks than asked, and the skipped blocks' means would be off). Sites at one
    level do not feed one another, so each level costs one capture run. It assumes every upstream
    candidate is written dynamic: where ``--tolerance`` or the tuner keeps one dense, the sites
    below it were calibrated on activations the written model does not produce (they keep somewhat
    more blocks than asked; verification is unaffected, its reference is built from the written plans)."""
    def plan(i, activations=None):
        return make_plan(sites[i].weight, block=config.dynamic_block, keep=config.dynamic_keep,
                         rule=config.dynamic_rule, score=config.dynamic_score, activations=activations,
                         compensate=config.dynamic_compensate)

    if config.dynamic_rule != "threshold" and not config.dynamic_compensate:
        return {i: plan(i) for i in candidates}
    level = levels(candidates, upstream(model, sites, candidates))
    plans: dict = {}
    top = max(level.values(), default=-1)
    for lvl in range(top + 1):
        progress("calibrate", lvl, top + 1)
        here = [i for i in candidates if level[i] == lvl]
        source = reference_model(model, sites, plans) if plans else model
        samples = _activations(source, sites, here, calibration, config)
        plans.update({i: plan(i, samples.get(i)) for i in here})
    progress("calibrate", top + 1, top + 1)
    return {i: plans[i] for i in candidates}


def _activations(model, sites, candidates, calibration, config) -> dict[int, list[np.ndarray]]:
    """Per candidate: its input activation on every search sample, one array per sample (a call)."""
    if calibration is None or not candidates:
        return {}
    names = list(dict.fromkeys(sites[i].activation for i in candidates))
    per_sample: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for values in capture(model, names, calibration.batches("search"), config.base_threads):
        for name in names:
            value = np.asarray(values[name])
            if value.ndim > 1:
                per_sample[name].extend(value[j:j + 1] for j in range(value.shape[0]))
            else:
                per_sample[name].append(value)
    return {i: per_sample[sites[i].activation] for i in candidates}


def _search(result: DynamicPlanning, plans: dict, config: SplitConfig) -> tuple[dict, dict[int, str]]:
    """Greedy: the largest saving first, each site kept dynamic while the search error stays within
    the tolerance."""
    if result.calibration is None:
        raise InputError("--tolerance needs calibration samples (--calibration, or --input-shape for random ones)")
    batches = result.calibration.batches("search")
    order = sorted(plans, key=lambda i: -(plans[i].macs_dense() - plans[i].macs_kept()))
    chosen, reasons = {}, {}
    for i in order:
        trial = {**chosen, i: plans[i]}
        error = output_error(result.model, result.sites, trial, batches, result.threads)
        result.evaluations += 1
        accepted = error <= config.tolerance
        saved = sum(p.macs_kept() for p in trial.values())
        result.trace.append({"site": result.sites[i].name, "error": error, "accepted": accepted,
                             "flops": saved / max(1, sum(p.macs_dense() for p in trial.values()))})
        if accepted:
            chosen = trial
        else:
            reasons[i] = f"--tolerance {config.tolerance:g}: {plans[i].label} would raise the output error to {error:.3g}"
    return chosen, reasons


def dynamic_units(sites: list[Site], decisions: dict[int, Decision]) -> list[Unit]:
    return [Unit((i,), Chain([sites[i]], []), d.plan, (d.reason,)) for i, d in sorted(decisions.items())
            if isinstance(d, Planned)]


def restrict_forms(units: list[Unit], forms: dict[int, str], tuning: dict, config: SplitConfig,
                   model: onnx.ModelProto) -> dict[int, str]:
    """``--dynamic-form kernel|portable|fallback``: only that form (or dense, where the tuner measured it
    slower); ``auto``: what the tuner chose, written as ``dynamic-fallback`` where it chose the kernel
    and the fallback can be written (the same kernel, and a file that also runs without it). Without
    measurements: the fallback, else the kernel where it is installed, else the portable form."""
    from .rewrite import refusal
    from .tune import choose

    new = dict(forms)
    ir_version, opset = model.ir_version, default_opset(model)
    for u, unit in enumerate(units):
        if getattr(unit.plan, "kind", None) != "dynamic":
            continue
        wanted = FORMS.get(config.dynamic_form)
        result = tuning.get(u)
        if result is not None and result.times_ms:
            if wanted is not None:
                times = {k: v for k, v in result.times_ms.items() if k in ("dense", wanted)}
                if wanted in times:
                    result.choice, result.reason = choose(times, config.min_speedup)
                    new[u] = result.choice
                else:
                    new[u] = wanted  # not measured (refused or crashed): the rewrite says why
            elif new.get(u) == "dynamic-kernel" and refusal("dynamic-fallback", unit.chain, unit.plan) is None \
                    and _writes(unit, "dynamic-fallback", ir_version, opset):
                new[u] = "dynamic-fallback"
            continue
        if wanted is None:
            wanted = next((f for f in ("dynamic-fallback", "dynamic-kernel", "dynamic-portable")
                           if refusal(f, unit.chain, unit.plan) is None and _writes(unit, f, ir_version, opset)),
                          "dynamic-portable")
        new[u] = wanted
    return new


def _writes(unit: Unit, form: str, ir_version: int, opset: int) -> bool:
    """Whether ``form`` can write ``unit`` in a model of this IR version and opset (checked by emitting it)."""
    from .rewrite import Unsupported, emit_chain

    try:
        emit_chain(unit.chain, unit.plan, form, opset=opset, taken=set(), ir_version=ir_version)
    except Unsupported:
        return False
    return True


def written_dynamic(units: list[Unit], written: dict) -> dict[int, object]:
    """{site index: plan} of the dynamic units that were written."""
    return {i: units[u].plan for u in written if getattr(units[u].plan, "kind", None) == "dynamic"
            for i in units[u].sites}


def with_dynamic(reference: onnx.ModelProto, sites: list[Site], dynamic: dict) -> onnx.ModelProto:
    return reference_model(reference, sites, dynamic) if dynamic else reference


__all__ = ["AGAINST", "DynamicPlanning", "dynamic_units", "output_error", "plan_dynamic", "restrict_forms",
           "with_dynamic", "written_dynamic"]
