"""``--factorize METHOD --tolerance E``: a density per site, chosen so that the model's relative
output error stays within E on the calibration search samples (the counterpart, for factorized
weights, of lossy.py's ``--tolerance`` search; its progress stages, and ``refit``).

1. ``fit``: every candidate site is fitted at each density of :data:`LADDER`, on the moments of
   its *original* activations over the first half of the search samples (the first-level moments, X' = X, as if no
   other site were factorized). So the fits are independent of one another and of the choice made
   from them: one pass of fits serves the whole search. Each option's gain is the stored bytes it
   saves (the dense weight's bytes minus what the compressed form writes, rewrite/compressed.py);
   its local error ||X(W − W')|| / ||XW|| is read off the moments of the second half (no model
   run). Every whole-model run below reads that second half, so the error a choice is accepted at
   was measured on samples none of its fits saw (with fewer than lossy.FOLD_SAMPLES search samples
   the fits and the runs share them).
2. ``sensitivity``: one whole-model run per site (its option of median local error, on the first
   ``lossy.sensitivity_samples`` search samples, as lossy.survey estimates) measures how its local
   error reaches the outputs; every option's estimated output error is its local error times that
   factor.
3. allocate.py orders the choices: its greedy knapsack, run without a limit, gives a path of
   nested choices from all dense to every site at its smallest density, each step the one that
   saves the most bytes per unit of added (estimated, squared) error.
4. ``confirm``: whole-model runs on the second half bisect that path for a choice whose
   measured output error is within E (the empty choice is): about log2 of its length runs, and
   since neither the fits nor the estimates depend on E, a looser tolerance never ends on an
   earlier step of the same path (never more stored bytes; the refit keeps the densities). The
   estimates only order the steps; the measured errors decide how far along to go.
5. ``refit``: the chosen densities are fitted again level by level as plan_factorized does (each
   site on what the already-factorized sites before it hand on, against the original output),
   and that is kept only if it measures no worse on the search samples (and within E).

``--search-seconds`` is honoured as in lossy.py: when it runs out, sites not yet fitted or measured
stay dense (with why), and the last choice confirmed within E is kept (nothing, if none was).
The output error in the report is measured afterwards on the held-out samples, as with --density.
The search's trace has, per point, ``bytes`` (the stored fraction of the candidates' dense bytes)
where lossy's has ``flops`` (None here: the form runs one dense MatMul, the FLOPs do not change).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from types import MappingProxyType

import onnx

from . import fitting
from .allocate import Option, allocate, estimate, probe_rung, propagated
from .chains import Chain
from .config import SplitConfig
from .decisions import Kept, Planned, Unit
from .factorization import _fit, _moments, factorize_reason
from .factorize.sparse import layer_error
from .lossy import FOLD_SAMPLES, Lossy, _calibration, sensitivity_samples
from .planning import eligible
from .pruned import Evaluator
from .sites import Site, default_opset

log = logging.getLogger(__name__)

LADDER = (0.75, 0.5, 0.35, 0.25, 0.15, 0.1)
"""The densities each site is fitted at for ``--tolerance`` (the fraction of the weight's entries
kept as non-zeros, over all factors), from the safest to the smallest."""


def plan_factorized_within(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, progress=None) -> Lossy:
    """One decision per site (a factorized plan at its chosen density, or kept with why) and one
    unit per planned site, the output error within ``config.tolerance`` on the search samples."""
    progress = progress or (lambda stage, done, total: None)
    deadline = None if config.search_seconds is None else time.monotonic() + config.search_seconds
    out_of_time = lambda: deadline is not None and time.monotonic() > deadline  # noqa: E731
    tol = config.tolerance
    opset = default_opset(model)
    decisions, candidates = eligible(sites, config, lambda site: factorize_reason(site, opset, config))
    calibration = _calibration(model, config, required=True, wanted=True,
                               purpose=f"--factorize {config.factorize} --tolerance")
    evaluator = Evaluator(model, sites, candidates, config.base_threads,
                          capture=tuple(sites[i].activation for i in candidates))
    result = Lossy(decisions, calibration, evaluator)
    # fitted on the first half of the search samples, every whole-model run on the second (as lossy.py)
    halves = calibration.n_search >= FOLD_SAMPLES
    parts = {"search": calibration.batches("search", fold=0 if halves else None),
             "held_out": calibration.batches("held_out")}
    if halves:
        parts["check"] = calibration.batches("search", fold=1)
    originals = {p: fitting.collect(evaluator, sites, candidates, b) for p, b in parts.items()}
    facts = MappingProxyType({"factorize": config.factorize})
    reasons: dict[int, str] = {}

    raw: dict[int, list] = {}  # site -> [(plan, bytes saved)]
    for n, i in enumerate(candidates):
        progress("fit", n, len(candidates))
        if out_of_time():
            reasons[i] = f"--search-seconds {config.search_seconds:g} ran out before this site was fitted"
            continue
        moments = _moments(sites[i], originals, None)
        if moments["search"] is None:
            decisions[i] = Kept("plan", "not factorized: its activation was not captured")
            continue
        dense = sites[i].weight.nbytes
        opts = []
        for density in LADDER:
            plan = _fit(sites[i], moments, at_density(config, density))
            if dense - plan.stored_bytes > 0:
                opts.append((plan, float(dense - plan.stored_bytes), _checked(sites[i], plan, moments)))
        if opts:
            raw[i] = opts
        else:
            reasons[i] = (f"--tolerance {tol:g}: no density of {_ladder_text()} stores fewer bytes than the dense "
                          f"weight")
    progress("fit", len(candidates), len(candidates))

    search = lambda plans, limit=None: evaluator.error(  # noqa: E731
        calibration.batches("search", limit, fold=1 if halves else None), *fitting.values(sites, plans))
    options: dict[int, list[Option]] = {}
    samples = sensitivity_samples(evaluator, calibration) if raw else 0
    for n, i in enumerate(raw):
        progress("sensitivity", n, len(raw))
        if out_of_time():
            reasons[i] = f"--search-seconds {config.search_seconds:g} ran out before this site was measured"
            continue
        opts = raw[i]
        local = [checked for _, _, checked in opts]
        probe = probe_rung(local)  # as lossy.survey
        errors = propagated(local, probe, search({i: opts[probe][0]}, samples))
        options[i] = [Option(p, gain, e) for (p, gain, _), e in zip(opts, errors)]
    progress("sensitivity", len(raw), len(raw))

    dense_bytes = sum(sites[i].weight.nbytes for i in candidates) or 1
    stored = lambda choice: 1 - sum(options[i][r].gain for i, r in choice.items()) / dense_bytes  # noqa: E731
    path: list[dict] = [{}]
    allocate(options, math.inf, path)  # every step of the greedy order, each saving more bytes than the last
    trace = [{"flops": None, "bytes": stored(step), "error": estimate(options, step), "accepted": None,
              "estimated": True, "sites": len(step)} for step in path[1:]]
    low, high = 0, len(path)  # path[low] is within the tolerance (the empty choice is), path[high] not known to be
    accepted_err, measured = 0.0, {}
    while high - low > 1 and not out_of_time():
        mid = (low + high) // 2
        choice = path[mid]
        err = search({i: options[i][r].plan for i, r in choice.items()})
        measured[mid] = err
        trace.append({"flops": None, "bytes": stored(choice), "error": err, "accepted": bool(err <= tol),
                      "estimate": estimate(options, choice), "sites": len(choice)})
        progress("confirm", len(measured), len(measured) + math.ceil(math.log2(max(high - low, 2))) - 1)
        if err <= tol:
            low, accepted_err = mid, err
        else:
            high = mid
    accepted = path[low]
    # the first step past the choice that measured above the tolerance: its sites were backed off
    backed = {i: measured[high] for i in (path[high] if high < len(path) and high in measured else {})
              if accepted.get(i) != path[high][i]}
    chosen = {i: options[i][r].plan for i, r in accepted.items()}
    refitted = False
    if len(chosen) > 1 and not out_of_time():
        refitted = True
        again = _level_by_level(model, sites, evaluator, parts, originals, chosen, config, progress)
        err = search(again)
        better = err <= min(tol, accepted_err)
        trace.append({"flops": None, "bytes": 1 - sum(sites[i].weight.nbytes - p.stored_bytes for i, p in again.items())
                      / dense_bytes, "error": err, "accepted": better, "estimate": None, "sites": len(again),
                      "sequential": True})
        log.info("refitted level by level: search error %.4g (on the original activations: %.4g)%s", err,
                 accepted_err, "" if better else "; not kept")
        if better:
            chosen = again
    runs = len(measured) + refitted
    progress("confirm", runs, runs)

    for i in candidates:
        if i in chosen:
            alone = options[i][accepted[i]].error
            decisions[i] = Planned(chosen[i], f"{chosen[i].label}; estimated output error {alone:.3g} alone", facts)
            log.info("factorized %s: %s, layer error %.4g (held out %s)", sites[i].name, chosen[i].label,
                     chosen[i].error, "-" if chosen[i].held_out is None else f"{chosen[i].held_out:.4g}")
        elif i in options:
            safest = min(options[i], key=lambda o: o.error)
            decisions[i] = Kept("budget", (
                f"--tolerance {tol:g}: the search's next step, factorizing it too, measured an output error of "
                f"{backed[i]:.3g}; its safest factorization ({safest.plan.label}) alone is estimated at "
                f"{safest.error:.3g}" if i in backed else
                f"--tolerance {tol:g}: its safest factorization ({safest.plan.label}) would add an estimated output "
                f"error of {safest.error:.3g}; the tolerance went to sites that save more bytes per error"), facts)
        elif i in reasons:
            decisions[i] = Kept("budget", reasons[i], facts)
    result.trace = trace
    result.evaluations = evaluator.runs // max(1, len(parts["search"]))
    result.units = [Unit((i,), Chain([sites[i]], []), chosen[i], (decisions[i].reason,)) for i in sorted(chosen)]
    return result


def _checked(site: Site, plan, moments: dict) -> float:
    """The plan's layer error on the samples the whole-model runs read (the second half of the search
    samples; the fitted ones where there are too few to halve)."""
    if moments.get("check") is None:
        return plan.error
    return layer_error(site.weight, plan.effective_weight(0, site.weight), *moments["check"])


def at_density(config: SplitConfig, density: float) -> SplitConfig:
    """``config`` as ``--factorize METHOD --density density`` (what factorization._fit reads)."""
    return dataclasses.replace(config, density=density, tolerance=None, search_seconds=None)


def _ladder_text() -> str:
    return "/".join(f"{d:g}" for d in LADDER)


def _level_by_level(model, sites: list[Site], evaluator: Evaluator, parts: dict, originals: dict, chosen: dict,
                    config: SplitConfig, progress) -> dict:
    """The chosen sites fitted again at their densities in dependency order, each on the activations
    that the already-refitted sites before it produce (plan_factorized's order)."""
    level = fitting.levels(list(chosen), fitting.upstream(model, sites, list(chosen)))
    plans: dict[int, object] = {}
    for lvl in sorted(set(level.values())):
        here = sorted(i for i in chosen if level[i] == lvl)
        weights = {j: plan.effective_weight(0, sites[j].weight) for j, plan in plans.items()}
        news = {p: fitting.collect(evaluator, sites, here, b, weights=weights, original=True) if weights else {}
                for p, b in parts.items()}
        for i in here:
            progress("refit", len(plans), len(chosen))
            moments = _moments(sites[i], originals, news if weights else None)
            plans[i] = chosen[i] if moments["search"] is None or not weights else \
                _fit(sites[i], moments, at_density(config, chosen[i].density))
    progress("refit", len(chosen), len(chosen))
    return plans


__all__ = ["LADDER", "at_density", "plan_factorized_within"]
