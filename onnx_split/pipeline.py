"""``split_model``: load -> sites -> plan -> units -> forms -> rewrite -> verify -> bench -> report.

Each step returns new values (decisions per site, units, forms, measurements); the report is
built once at the end from them. The lossless and the lossy path differ in the plan step
(planning.py or lossy.py: decisions and units) and in that a lossy run measures what its dropped
weights cost at the outputs; every later step is shared. The library never prints or exits: it logs, raises
:class:`OnnxSplitError` for bad input, and returns a :class:`SplitResult`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from .bench import benchmark_models
from .blas import limited
from .config import DEFAULT_LOSSY, SplitConfig
from .decisions import Split, after_forms, after_rewrite, undone
from .errors import InputError
from .inputs import verification_sets
from .dynamic import AGAINST as DYNAMIC_AGAINST, dynamic_units, plan_dynamic, restrict_forms, with_dynamic, \
    written_dynamic
from .factorization import AGAINST as FACTORIZED, plan_factorized, structured
from .lossy import SurveyRow, plan_lossy, survey
from .rewrite.dynamic_fallback import FALLBACK_NOTE
from .rewrite.dynamic_kernel import LOAD_NOTE
from .memory import give_back
from .model_io import load_model
from .protos import without_weights
from .planning import exact_units, plan_exact
from .points import measuring_points, providers_for
from .pruned import reference_model
from .report import SplitReport, Written, build_report, metadata_entries, size
from .rewrite import AUTO, FORMS, LAYOUTS, Job, rewrite_model
from .rewrite.neighbours import fold_neighbours, regions
from .sites import find_sites, release_weights
from .spill import load_weights, spilled, to_disk
from .stats import model_stats
from .structure import SiteStructure, site_structures
from .tune import static_choice, tune_chains, whole_model_verdict
from .runtime import provider_status
from .where import left_out, unmatched
from .verify import check, crash_entry, crashed, loads_in_ort, screen_sessions, verify_models

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances (the CLI draws a bar with it)."""


@dataclass
class SplitResult:
    model: onnx.ModelProto
    report: SplitReport
    structures: list[SiteStructure] = field(default_factory=list)
    """with ``structures=True``: per layer of every planned unit, |W| before and after its parts'
    permutation, downsampled (structure.py; plots.py draws them)"""


def split_model(model_or_path: onnx.ModelProto | str | os.PathLike, config: SplitConfig | None = None, *,
                progress: Progress | None = None, structures: bool = False) -> SplitResult:
    """Split every constant MatMul/Gemm weight of a model along its near-zero structure.

    The input is never modified: the result holds a rewritten copy and the report. Verification
    and timing run as ``config`` asks; their outcome is in the report (the caller decides what a
    failure means). With ``structures``, the result also holds each planned site's weight before
    and after its permutation into parts, for pictures (``--plots``, ``--html``).
    """
    config = _checked(config)
    clock = _Clock()
    source, loaded = _load(model_or_path, "split_model")
    held = [loaded]
    del loaded
    return _split_held(held, source, config, progress, structures, clock)


def split_held(held: list[onnx.ModelProto], config: SplitConfig | None = None, *, source: str | None = None,
               progress: Progress | None = None, structures: bool = False) -> SplitResult:
    """:func:`split_model` of the one model in ``held``, taken out of the list (which is left empty).

    For a caller that read the model only to hand it over (the CLI): it then holds no reference to
    the model during the run, so a large input's memory is free once its weights are on disk
    (spill.py), as when :func:`split_model` is given a path. ``source`` names it in the report.
    """
    config = _checked(config)
    if not isinstance(held, list) or len(held) != 1 or not isinstance(held[0], onnx.ModelProto):
        raise InputError("split_held wants a list holding one onnx.ModelProto")
    return _split_held(held, source, config, progress, structures, _Clock())


def _split_held(held: list, source: str | None, config: SplitConfig, progress: Progress | None, structures: bool,
                clock: "_Clock") -> SplitResult:
    progress = progress or (lambda stage, done, total: None)
    loaded = held.pop()
    before = model_stats(loaded)                           # (its size as stored, not as spilled)
    with spilled(loaded) as original:                      # a large input's weights on disk (spill.py)
        del loaded
        return _split(source, original, before, config, progress, structures, clock)


def _checked(config: SplitConfig | None) -> SplitConfig:
    config = config or SplitConfig()
    if config.lossy and config.budget is None:
        raise InputError(f"--partitioner {config.partitioner} drops weights: give a budget "
                         f"(--parts, --keep, --flops or --tolerance), or --dry-run to see what each would keep")
    return config


def _split(source: str | None, original: onnx.ModelProto, before, config: SplitConfig, progress: Progress,
           structures: bool, clock: "_Clock") -> SplitResult:
    model = without_weights(original)                      # the working copy: its weights come at the rewrite
    clock.lap("load")
    sites = find_sites(model, min_elements=config.min_elements, weights=original)
    notes: list[str] = unmatched(sites, config.include, config.exclude)  # --include/--exclude apply in the plan step

    original_loads = functools.cache(lambda: loads_in_ort(original))  # checked in a child once, if at all
    providers, points, inputs = [], [], []                 # where to measure
    if config.verify or config.bench or config.layout == AUTO:
        providers, more = providers_for(config)
        notes += more
        points, inputs = measuring_points(original, config)

    with limited(config.base_threads):                     # blas.py: the planners' numpy on --threads BLAS threads
        lossy, decisions, units = _plan(original, sites, config, points, providers, progress, original_loads)
    if lossy is not None:
        notes += lossy.notes
    give_back()                                            # what the planning held

    clock.lap("analyse")

    compressed = config.factorize is not None and not structured(config)
    if compressed:                                         # which form: one dense MatMul either way
        forms, tuning = {u: "compressed" for u in range(len(units))}, {}
    else:
        forms, tuning = _forms(original, units, config, points, providers, notes, progress, original_loads)
    if config.dynamic_keep is not None:
        forms = restrict_forms(units, forms, tuning, config, original)
    decisions = after_forms(decisions, units, forms, {u: t.reason for u, t in tuning.items()})
    if config.layout == AUTO and not compressed:
        clock.lap("tune")

    # the working copy's weights, copied now: where the input was spilled, references to its file (read in at
    # the end, once verified and timed: a weight the rewrite replaces is never read into the copy)
    model.graph.initializer.extend(original.graph.initializer)
    written, refused = _rewrite(model, sites, units, forms, config)                       # rewrite
    decisions = after_rewrite(decisions, units, {u: (w.form, w.layout) for u, w in written.items()}, refused)

    approximated, biases = {}, {}                          # what the rewrite multiplies by (and adds)
    dynamic = written_dynamic(units, written)              # per call: verified against dynamic_reference
    for u in written:
        if units[u].plan.approximates and units[u].plan.kind != "dynamic":
            for layer, i in enumerate(units[u].sites):
                approximated[i] = units[u].plan.effective_weight(layer, sites[i].weight)
                if sites[i].bias_value is not None:
                    biases[i] = units[u].plan.effective_bias(layer, sites[i].bias_value)
    clock.lap("rewrite")
    error = None
    if lossy is not None:                                  # what that costs at the outputs
        error, more = lossy.error(approximated, config.tolerance, biases, **({"dynamic": dynamic} if dynamic else {}))
        notes += [n for n in more if n not in notes]
        lossy.evaluator = None                             # its ORT session is done with
        clock.lap("error")
    if not structures:                                     # the parts are cut: verifying needs the memory
        release_weights(sites + [s for unit in units for s in getattr(unit.chain, "sites", ())])
    give_back()

    def reference() -> onnx.ModelProto:                    # built for verification, let go before timing
        found = reference_model(original, sites, approximated, biases) if approximated else original
        found = with_dynamic(found, sites, dynamic)
        approximated.clear()                               # (the reference holds them now)
        biases.clear()
        return to_disk(found)                              # (in a spilled run, beside the input's weights)
    against = (REFITTED if any(getattr(units[u].plan, "refitted", False) for u in written) else PRUNED) \
        if approximated else (DYNAMIC_AGAINST if dynamic else "the original")
    if config.factorize is not None and approximated:
        against = FACTORIZED
    if error is not None and against == REFITTED and error.unseen is None:
        error = dataclasses.replace(error, fitted=True)   # (a --tolerance search fits on one half only)
    n_split = sum(isinstance(d, Split) for d in decisions.values())
    entries = metadata_entries(config, n_split, len(sites), error)
    if any(w.form == "dynamic-kernel" for w in written.values()):  # how to load it
        entries["onnx_split.load"] = LOAD_NOTE
        notes.append(f"the written model {LOAD_NOTE}")
    elif any(w.form == "dynamic-fallback" for w in written.values()):
        entries["onnx_split.load"] = FALLBACK_NOTE
        notes.append(f"the written model {FALLBACK_NOTE}")
    _set_metadata(model, entries)

    checker = check(model)                                 # verify and time
    verification, latency = [], []
    if not config.verify:
        loads = checker["ort_loads"] = loads_in_ort(model, "the rewritten model")
        if crashed(loads):  # never write a model that crashes ORT
            verification = [crash_entry(loads)]
    if points and not verification:
        verification, latency = _verify_and_time(original, model, reference, config, points, providers,
                                                 n_split > 0, notes, inputs, progress, clock)
    else:
        clock.lap("verify")
    why = None
    if config.layout == AUTO and config.bench and points and n_split and not compressed:  # must pay
        why = whole_model_verdict(latency, config.min_speedup)
        if not any(e.status == "measured" and e.speedup for e in latency):
            notes.append("the whole rewritten model could not be timed: written without that check")
    if why is not None:
        notes.append(why)
        model, decisions, error = _undo(original, decisions, error, why)
    else:
        load_weights(model)                                # (where they were references to the spill)
        notes += shared_weight_notes(sites, decisions, units, written)

    report = build_report(config=json.loads(config.to_json()), source=source, sites=sites, decisions=decisions,
                          units=units, written=written, before=before, after=model_stats(model),
                          tuning=list(tuning.values()), checker=checker, verification=verification,
                          latency=latency, inputs=inputs, notes=notes, error=error, reverted=why is not None,
                          verified_against=against if any(v.passed is not None for v in verification) else None,
                          stage_seconds=clock.seconds, search_trace=lossy.trace if lossy is not None else ())
    pictures = []
    if structures:
        labels = {i: (f"split ({s.layout})" if s.decision == "split" else f"kept: {s.reason}")
                  for i, s in enumerate(report.sites)}
        pictures = site_structures(sites, decisions, units, labels)
    return SplitResult(model, report, pictures)


def _plan(original, sites, config: SplitConfig, points, providers, progress, original_loads):
    """(the lossy planning or None, a decision per site, the units): what each site would become.
    The planners read the original (the working copy has no weights yet; both have the same graph,
    and the sites are addressed by scope and node position)."""
    if config.factorize is not None:
        lossy = plan_factorized(original, sites, config, progress)
        return lossy, lossy.decisions, lossy.units
    if config.dynamic_keep is not None:
        lossy = plan_dynamic(original, sites, config, progress)
        return lossy, lossy.decisions, dynamic_units(sites, lossy.decisions)
    if config.lossy:
        lossy = plan_lossy(original, sites, config, progress,
                           speed=_speed(original, config, points, providers, progress, original_loads))
        return lossy, lossy.decisions, lossy.units
    decisions = plan_exact(sites, config, progress)
    return None, decisions, exact_units(sites, decisions, config)


def shared_weight_notes(sites, decisions: dict, units, written: dict[int, Written]) -> list[str]:
    """What a stored weight read by several sites cost once some of them were split: parts shared
    between sites whose plans agree, parts stored per site where they differ, and the weight itself
    kept beside the parts where a reader stays dense."""
    readers: dict[tuple[str, str], list[int]] = {}
    for i, site in enumerate(sites):
        if site.reason is None:
            readers.setdefault((site.scope, site.weight_name), []).append(i)
    notes = []
    for (_, name), group in readers.items():
        split_units = list(dict.fromkeys(decisions[i].unit for i in group if isinstance(decisions[i], Split)))
        if len(group) < 2 or not split_units:
            continue
        kept = sum(not isinstance(decisions[i], Split) for i in group)
        n_split = len(group) - kept
        if len(split_units) > 1:
            shared = sum(written[u].shared_bytes for u in split_units)
            extra = sum(written[u].stored_bytes for u in split_units[1:])
            if extra == 0:
                notes.append(f"weight '{name}' is read by {n_split} split sites whose plans agree: their parts are "
                             f"stored once ({size(shared)} shared)")
            else:
                notes.append(f"weight '{name}' is read by {n_split} split sites whose splits differ: each stores "
                             f"its own parts, {size(extra)} more than one copy" +
                             (f" ({size(shared)} of equal tensors shared)" if shared else ""))
        if kept:
            notes.append(f"weight '{name}' is also read by {kept} site{'s' if kept != 1 else ''} kept dense, so it stays "
                         f"in the model beside the split's parts ({size(written[split_units[0]].stored_bytes)} more)")
    return notes


PRUNED = "the pruned original (dropped weights zeroed)"
"""The reference a lossy split is verified against: the original with the plans' effective weights."""
REFITTED = "the refitted original (dropped weights zeroed, kept blocks refitted)"
"""The same, where a plan's kept weights were refitted (refit.py)."""


class _Clock:
    """Wall time per stage: each ``lap`` charges the time since the last one to a stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + (now - self._last)
        self._last = now


def survey_model(model_or_path: onnx.ModelProto | str | os.PathLike, config: SplitConfig | None = None, *,
                 progress: Progress | None = None) -> list[SurveyRow]:
    """``--dry-run``: per site, the retained significance and FLOPs of 2/4/8/16 parts (tiles:
    1/2 .. 1/16 of them) with the configured partitioner (metis for ``components``) and score."""
    config = config or SplitConfig()
    if not config.lossy:
        config = dataclasses.replace(config, partitioner=DEFAULT_LOSSY)
    _, loaded = _load(model_or_path, "survey_model")
    with spilled(loaded) as model, limited(config.base_threads):  # blas.py: the refits' solves on --threads BLAS threads
        del loaded
        return survey(model, find_sites(model, min_elements=config.min_elements), config, progress)


def _load(model_or_path, caller: str) -> tuple[str | None, onnx.ModelProto]:
    if isinstance(model_or_path, (str, os.PathLike)):
        return str(model_or_path), load_model(model_or_path)
    if isinstance(model_or_path, onnx.ModelProto):
        return None, model_or_path
    raise InputError(f"{caller} wants an onnx.ModelProto or a path, not {type(model_or_path).__name__}")


def _undo(original, decisions: dict, error, why: str):
    """The original model written instead of the rewrite: every split undone (with why), and an
    output error of 0."""
    decisions = undone(decisions, why)
    if error is not None:
        error = dataclasses.replace(error, data=error.data + "; the original was written, so its error is 0",
                                    search=0.0, held_out=0.0, met=None if error.tolerance is None else True)
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    return load_weights(copy), decisions, error


def _speed(original, config: SplitConfig, points, providers, progress, original_loads):
    """``--tolerance`` with ``--layout auto``: the tuner's measurements of candidate plans, so the
    search spends its error budget only on splits measured faster (None: the search counts FLOPs)."""
    if config.tolerance is None or config.layout != AUTO or not config.bench or not points:
        return None
    if original_loads() != "yes":
        return None

    def speed(pairs):
        return tune_chains(original, pairs, points, providers=providers, seconds=config.tune_seconds,
                           threads=config.threads, margin=config.min_speedup, progress=progress)
    return speed


def _forms(original, units, config: SplitConfig, points, providers, notes: list[str], progress, original_loads):
    """{unit: form or "dense"} and, with ``--layout auto``, {unit: its TuneResult}."""
    if config.layout != AUTO:
        layout = LAYOUTS[config.layout]
        return {u: layout.pick(unit.chain, unit.plan) if unit.plan.kind in FORMS[layout.cost_form].accepts
                else static_choice(unit.chain, unit.plan) for u, unit in enumerate(units)}, {}
    why = None if points else "no inputs to measure with"
    if why is None:
        loads = original_loads()
        why = None if loads == "yes" else f"onnxruntime cannot load the original: {loads}"
    if why is not None:
        notes.append(f"--layout auto could not measure ({why}): the static parallel rule chose the layouts")
        return {u: static_choice(unit.chain, unit.plan) for u, unit in enumerate(units)}, {}
    results = tune_chains(original, [(unit.chain, unit.plan) for unit in units], points, providers=providers,
                          seconds=config.tune_seconds, threads=config.threads, margin=config.min_speedup,
                          progress=progress)
    return {u: r.choice for u, r in enumerate(results)}, dict(enumerate(results))


def _rewrite(model, sites, units, forms: dict[int, str], config: SplitConfig):
    """Write every unit not kept dense, then fold the permutations at their ends into the dense
    layers next to them (rewrite/neighbours.py): ({unit: Written}, {unit: why it could not be written})."""
    chosen = [u for u in range(len(units)) if forms.get(u, "dense") != "dense"]
    layout = LAYOUTS.get(config.layout)
    wrapper = layout if layout is not None and layout.wrap is not None else None
    jobs = [Job(units[u].chain, units[u].plan, forms[u], wrapper) for u in chosen]
    stored: dict[int, tuple[int, int]] = {}
    ends: dict[int, dict[str, str]] = {}
    found = regions(sites) if config.fold and chosen else []  # before the rewrite changes the graphs
    refused_jobs, gathers = rewrite_model(model, jobs, stored=stored, ends=ends)
    folds = fold_neighbours(model, sites, found, {j: (units[chosen[j]].sites, e) for j, e in ends.items()
                                                  if j not in refused_jobs},
                            untouched=set(left_out(sites, config.include, config.exclude))) if found else {}
    written = {u: Written(forms[u], wrapper.name if wrapper else forms[u], gathers[j] - len(folds.get(j, ())),
                          *stored[j], folded=tuple(f.describe() for f in folds.get(j, ())))
               for j, u in enumerate(chosen) if j not in refused_jobs}
    return written, {chosen[j]: why for j, why in refused_jobs.items()}


def _verify_and_time(original, model, make_reference, config: SplitConfig, points, providers, modified: bool,
                     notes: list[str], inputs: list[str], progress, clock: _Clock):
    """Verification against ``make_reference()`` (the original, or the model with the approximating
    plans' effective weights: a copy of the model, made here and let go before the timing, which
    holds two sessions) on the first point's inputs and more seeded sets like them (``inputs``, how
    they were made, is updated); timing against the original at every point."""
    verification, latency = [], []
    _, feeds = points[0]
    opens = config.verify or (config.bench and modified)
    reference = make_reference() if opens else None
    if opens:  # no session of a model that crashes ORT opens here
        levels = ("disabled", "enabled") if config.verify else ("enabled",)
        crash = screen_sessions(reference, model, providers=[p for p in providers if not provider_status(p)],
                                levels=levels, feeds_list=[f for _, f in points] if config.bench else [feeds],
                                threads=config.base_threads)
        if crash is not None:
            clock.lap("verify")
            return [crash_entry(crash)], []
    if config.verify:
        progress("verify", 0, 1)
        sets, inputs[:] = verification_sets(original, feeds, config.inputs_path, config.seed, inputs)
        verification = verify_models(reference, model, sets, providers=providers, rtol=config.rtol,
                                     atol=config.atol, threads=config.base_threads)
        progress("verify", 1, 1)
    del reference
    give_back()
    clock.lap("verify")
    if config.bench and modified:
        for n, (label, feeds) in enumerate(points):
            progress("bench", n, len(points))
            for count in config.thread_counts:
                for entry in benchmark_models(original, model, feeds, providers=providers,
                                              seconds=config.bench_seconds, threads=count):
                    latency.append(dataclasses.replace(entry, inputs=label))
        progress("bench", len(points), len(points))
        clock.lap("bench")
    elif config.bench:
        notes.append("nothing was split: latency not measured")
    elif config.layout == AUTO and modified:
        notes.append("--no-bench: the whole rewritten model was not timed against the original, so "
                     "only the per-site measurements chose what to write")
    return verification, latency


def _set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """The run's ``onnx_split.*`` metadata; a rerun replaces every such key."""
    kept = [p for p in model.metadata_props if not p.key.startswith("onnx_split.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
