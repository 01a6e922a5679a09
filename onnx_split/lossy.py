"""The lossy side of the pass: calibration -> significance -> budget -> one decision per site.

Used by the pipeline when a budget is given (``--parts``, ``--keep``, ``--flops``,
``--tolerance``), and by :func:`survey` (``--dry-run``). Each site is planned on its own; then
linked planned sites (feature-wise ops between them) are partitioned jointly into one chain where
that costs no more and keeps the budget (partition/lossy_chain.py), so no Gather runs between
their layers. The budgets go through the plan and planner protocols (plans/base.py).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import onnx

from . import fitting
from .allocate import Option, allocate, back_off, estimate, probe_rung, propagated
from .budget import LEVELS, by_budget, make_planner, refusal
from .calibration import Calibration, load_calibration, random_calibration
from .chains import Chain, chains_from_links, find_links
from .config import SplitConfig
from .decisions import Decision, Kept, Planned, Unit
from . import moment_store
from .errors import InputError
from .moment_store import MomentStore
from .memory import give_back
from .partition import ahead
from .partition.lossy_chain import joint_balanced
from .planning import CHAIN_SLACK, MAX_CHAIN, site_decisions
from .plans.balanced import BalancedPlanner
from .plans.blocks import BlockPlan, coverage
from .pruned import ErrorReport, Evaluator, counted
from .rewrite import cost_form, cost_rule
from .significance import site_scores
from .sites import Site
from .text import percent

log = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 256
"""At most this many search samples feed the one propagation run per site (it scales layer errors
to an estimate; the choice is then confirmed on all the samples it is measured on). Small models
read all of them: on the scikit-learn digits MLP the first 32 samples of the half measured on gave
estimates 2.6-4x below what all 134 of them then measured, and the search backed off to nothing."""
SENSITIVITY_ELEMENTS = 1 << 16
"""The run reads no more samples than give this many floating-point output values (but at least
:data:`MIN_SENSITIVITY_SAMPLES`): it measures a ratio of output norms, which a few sequences of a
transformer estimate as well as 32 do (on the 12-site BERT-sized encoder, 4 samples' estimates
were within 2% of 32 samples'), while a run per site over all of them made most of the pass time."""
MIN_SENSITIVITY_SAMPLES = 4


def sensitivity_samples(evaluator: Evaluator, calibration: Calibration) -> int:
    """How many search samples a propagation run uses (:data:`SENSITIVITY_ELEMENTS`): the model's
    floating-point output values per sample read off one run on the first sample."""
    first = calibration.batches("search", 1)
    if not first:
        return SENSITIVITY_SAMPLES
    per_sample = sum(o.size for o in evaluator.run(first[0], {}) if counted(o))
    return max(MIN_SENSITIVITY_SAMPLES, min(SENSITIVITY_SAMPLES, math.ceil(SENSITIVITY_ELEMENTS / max(per_sample, 1))))


@dataclass
class Lossy:
    """What the budget decided per site, with what is needed to measure the output error later."""

    decisions: dict[int, Decision]
    calibration: Calibration | None
    evaluator: Evaluator | None
    evaluations: int = 0
    notes: list[str] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    """``--tolerance``: every whole-model confirmation of the search ({flops, error, accepted})"""
    units: list[Unit] = field(default_factory=list)
    """What the rewrite writes: one unit per planned site, or per chain of linked planned sites
    partitioned jointly (no Gather between their layers)"""
    measured_fold: int | None = None
    """The half of the search samples the search measured on and never fitted on (None: none)"""

    def error(self, weights: dict[int, object], tolerance: float | None,
              biases: dict[int, object] | None = None) -> tuple[ErrorReport | None, list[str]]:
        """The relative output error of the model whose sites ``weights`` (and Gemm ``biases``) read
        those values (the written plans' effective weights), and notes."""
        if self.calibration is None or self.evaluator is None:
            return None, []
        cal = self.calibration
        unseen, unseen_samples = None, 0
        try:
            search_err = self.evaluator.error(cal.batches("search"), weights, biases)
            held = self.evaluator.error(cal.batches("held_out"), weights, biases)
            if self.measured_fold is not None:
                unseen = self.evaluator.error(cal.batches("search", fold=self.measured_fold), weights, biases)
                n = cal.n_search
                unseen_samples = n // 2 if self.measured_fold == 0 else n - n // 2
        except InputError as exc:
            if tolerance is not None:
                raise
            return None, [f"the output error was not measured: {exc}"]
        met = None if tolerance is None else bool(held <= tolerance)
        return ErrorReport(cal.source, search_err, held, cal.n_search, cal.n_held_out, tolerance, met,
                           self.evaluations, unseen, unseen_samples), []


@dataclass
class _Context:
    """What every step of the lossy planning shares."""

    model: onnx.ModelProto
    sites: list[Site]
    candidates: list[int]
    config: SplitConfig
    progress: object
    calibration: Calibration | None = None
    evaluator: Evaluator | None = None
    moments: MomentStore | None = None
    """the candidates' activation moments over each half of the search samples (two folds; one when
    there are too few), a group of sites held at a time, and every site's feature norms"""
    deadline: float | None = None
    _fitters: dict = field(default_factory=dict)
    _sensitivity: int | None = None
    dampings: dict = field(default_factory=dict)
    fit_fold: int | None = None
    """0 where the fits are made on the first half of the search samples only and every
    whole-model measurement of the planning reads the second half (:meth:`check_batches`): the
    ``--tolerance`` search and the dry run's estimates, so that the error a plan is accepted on
    was measured on samples none of its fits saw. None: fits on every search sample"""
    first_fits: dict = field(default_factory=dict)
    """{site: (its plan's mask key, the plan refitted on the original activations)}: the last such
    fit per site, so a joint chain's refit of the other planned sites does not redo theirs"""
    ahead: object = None
    """partition/ahead.py's worker making the sites' partitions ahead of the fits, or None"""

    def close(self) -> None:
        """End the partitions' worker, if one was started."""
        if self.ahead is not None:
            self.ahead.close()

    def release_moments(self) -> None:
        """Let go of the moments held (the norms stay; a later fit collects what it needs again)."""
        if self.moments is not None:
            self.moments.release()
            give_back()

    def gram(self, i: int):
        """Whether site ``i``'s input moments were captured (with the weight's K features): their
        norms and row count over the folds (moment_store.Norms), or None."""
        m = None if self.moments is None else self.moments.norms(fitting._key(self.sites[i]))
        return None if m is None or m.k != self.sites[i].weight.shape[0] or m.count == 0 else m

    def fitter(self, i: int):
        """Site ``i``'s :class:`fitting.Fitter`, None where no moments were captured."""
        if self.gram(i) is None:
            return None
        if i not in self._fitters:
            key = fitting._key(self.sites[i])
            last = next(reversed(self.dampings.values()), None)  # the choice starts at the last site's
            self._fitters[i] = fitting.Fitter(self.sites[i], [fitting.Fold(s) for s in self.moments.sums(key)],
                                              self.dampings.get(i), start=last, final_fold=self.fit_fold)
        return self._fitters[i]

    def done_with(self, i: int) -> None:
        """Forget site ``i``'s fitter (its (K+1) x N products), keeping the damping it chose."""
        fitter = self._fitters.pop(i, None)
        if fitter is not None and fitter.damping is not None:
            self.dampings[i] = fitter.damping

    def fold_batches(self) -> list[list[dict]]:
        """The search samples' batches the fits are made on, per fold (:attr:`fit_fold`: that one)."""
        if self.fit_fold is not None:
            return [self.calibration.batches("search", fold=self.fit_fold)]
        return _folds(self.calibration, self.moments.n_folds)

    def check_batches(self, limit: int | None = None) -> list[dict]:
        """The search samples a whole-model measurement of the planning reads (the first ``limit``)."""
        return self.calibration.batches("search", limit, fold=None if self.fit_fold is None else 1 - self.fit_fold)

    def fit_on_one_fold(self) -> None:
        """Fit on the first half of the search samples and measure on the other (:attr:`fit_fold`),
        where the moments were summed per half."""
        if self.moments is not None and self.moments.n_folds == 2:
            self.fit_fold = 0

    def sensitivity(self, plans: dict) -> float:
        """The output error of ``plans`` on the first :func:`sensitivity_samples` search samples."""
        if self._sensitivity is None:
            self._sensitivity = sensitivity_samples(self.evaluator, self.calibration)
        return self.search_error(plans, self._sensitivity)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def search_error(self, plans: dict, limit: int | None = None) -> float:
        """The output error of ``plans`` on the search samples of :meth:`check_batches`."""
        weights, biases = fitting.values(self.sites, plans)
        return self.evaluator.error(self.check_batches(limit), weights, biases)


def plan_lossy(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, progress=None, speed=None) -> Lossy:
    """Choose each candidate site's lossy plan under the configured budget.

    ``speed``: optional; given (chain, plan) pairs, the tuner's measurements of each (tune.TuneResult):
    with it, a ``--tolerance`` search spends its error budget only on plans measured faster than
    the dense site, and ranks them by the time they save."""
    progress = progress or (lambda stage, done, total: None)
    decided = site_decisions(sites, config)
    ctx = _Context(model, sites, [i for i in range(len(sites)) if i not in decided], config, progress)
    if config.search_seconds is not None:
        ctx.deadline = time.monotonic() + config.search_seconds
    needs_data = config.tolerance is not None or config.resolved_score == "activation"
    purpose = "--tolerance" if config.tolerance is not None else "--score activation"
    ctx.calibration = _calibration(model, config, required=needs_data, wanted=config.verify or config.refit,
                                   purpose=purpose)
    result = Lossy(decided, ctx.calibration, None)
    _measure(ctx, result.notes)
    result.evaluator = ctx.evaluator
    planners = _planners(ctx, every_level=config.tolerance is not None)
    try:
        return _plan(ctx, planners, result, speed)
    finally:
        ctx.close()


def _plan(ctx: _Context, planners: dict, result: Lossy, speed) -> Lossy:
    """plan_lossy once the planners are made: the plans of the budget, the decisions, the units."""
    config = ctx.config
    if config.tolerance is not None:
        ctx.fit_on_one_fold()
        chosen, reasons, result.trace = _search(ctx, planners, speed)
        result.measured_fold = None if ctx.fit_fold is None else 1 - ctx.fit_fold
    else:
        chosen = {i: p for i in ctx.candidates if (p := by_budget(planners[i], config)) is not None}
        reasons = {}
        if ctx.evaluator is not None and config.refit:
            chosen = _refit_all(ctx, {i: p for i, p in chosen.items() if p.flops < 1})
    result.evaluations = ctx.evaluator.runs // max(1, len(ctx.check_batches())) if ctx.evaluator else 0
    form = cost_form(config.layout)
    for i in ctx.candidates:
        planner, plan = planners[i], chosen.get(i)
        facts = MappingProxyType({"partitioner": config.partitioner, "score": planner.score})
        if plan is not None and plan.flops >= 1:
            parts = plan.summary(0).get("parts")
            what = f"{parts} parts" if parts is not None else plan.label
            result.decisions[i] = Kept("plan", f"no saving: {what} in the {form.name} layout would cost "
                                               f"{form.cost(plan, None):,} multiply-adds per row, dense costs "
                                               f"{plan.macs_dense():,}", facts)
        elif plan is not None:
            result.decisions[i] = Planned(plan, _summary(plan, reasons.get(i)), facts)
        else:
            result.decisions[i] = Kept("budget", reasons.get(i) or _why_dense(planner, config), facts)
    result.units = _units(ctx, planners, result.decisions, result.notes)
    return result


def _units(ctx: _Context, planners: dict, decisions: dict[int, Decision], notes: list[str]) -> list[Unit]:
    """Per-site units, with each run of linked lossy-split sites (feature-wise ops between them, as
    lossless chains) replaced by one jointly partitioned unit where that costs at most
    ``CHAIN_SLACK`` times the separate splits and (with --tolerance) keeps the error within it."""
    single = {u.sites[0]: u for u in lossy_units(ctx.sites, decisions)}
    planned = {i: d for i, d in decisions.items() if isinstance(d, Planned)}
    eligible = sorted(i for i in planned if isinstance(planners.get(i), BalancedPlanner))
    links = find_links(ctx.sites, eligible) if ctx.config.chains and len(eligible) > 1 else []
    after = {link.a: link for link in links}
    joined: dict[int, Unit] = {}
    for path in chains_from_links(eligible, links) if links else []:
        for start in range(0, len(path), MAX_CHAIN):
            segment = path[start:start + MAX_CHAIN]
            unit = _joint(ctx, planners, planned, segment, after, joined, notes) if len(segment) > 1 else None
            if unit is not None:
                joined.update({i: unit for i in segment})
    units, seen = [], set()
    for i in sorted(single):
        unit = joined.get(i, single[i])
        if id(unit) not in seen:
            seen.add(id(unit))
            units.append(unit)
    return units


def _parts(plan) -> int:
    """The balanced parts of a per-site lossy plan (its extra one-input part of dead outputs aside)."""
    return sum(1 for p in plan.partition.parts if p.levels[0].size > 1 or plan.partition.sizes[0] == 1)


CHAIN_ERROR_SLACK = 1.25
"""Without --tolerance, a joint lossy chain replaces its layers' own splits only if its output error
(search samples) is at most this times theirs."""


def _effective(sites: list[Site], units: list[Unit]) -> tuple[dict, dict]:
    """{site: weight}, {site: C} of every layer of ``units``."""
    weights, biases = {}, {}
    for unit in units:
        for layer, i in enumerate(unit.sites):
            weights[i] = unit.plan.effective_weight(layer, sites[i].weight)
            if sites[i].bias_value is not None:
                biases[i] = unit.plan.effective_bias(layer, sites[i].bias_value)
    return weights, biases


def _joint(ctx: _Context, planners: dict, planned: dict, segment: list[int], after: dict, joined: dict,
           notes: list[str]) -> Unit | None:
    """One unit for the linked sites of ``segment``: a joint balanced partition with as many parts
    as the fewest of theirs, every layer refitted in order on what the layers before it hand on."""
    config, sites = ctx.config, ctx.sites
    parts = min(_parts(planned[i].plan) for i in segment)
    scores = [planners[i].scores for i in segment]
    joint = joint_balanced(scores, parts, seed=config.seed)
    if len(joint.parts) < 2:
        return None
    masks = tuple(coverage(joint, layer) for layer in range(len(segment)))
    names = " -> ".join(sites[i].name for i in segment)
    total = sum(float(s.sum()) for s in scores)
    kept = sum(float(s[m].sum()) for s, m in zip(scores, masks))
    label = f"{len(joint.parts)} joint {config.partitioner} parts"
    plan = BlockPlan(joint, masks, True, label, 1.0 if total == 0 else kept / total, planners[segment[0]].score)
    plan = plan.with_cost(cost_rule(config.layout)(plan) / joint.macs_dense)
    separate = sum(planned[i].plan.flops * planned[i].plan.macs_dense() for i in segment)
    if plan.flops * joint.macs_dense > CHAIN_SLACK * separate:
        log.info("lossy chain %s not joined: %s MACs per row jointly, %s separately", names,
                 f"{plan.flops * joint.macs_dense:,.0f}", f"{separate:,.0f}")
        return None
    others = {i: d.plan for i, d in planned.items() if i not in segment and i not in joined}
    layers = {i: BlockPlan(joint, (masks[layer],), True, label) for layer, i in enumerate(segment)}
    if config.refit and ctx.evaluator is not None:  # every layer refitted in dependency order
        plain = {**{i: others[i].with_fit(None) for i in others}, **layers}
        first = {i: _fit_once(ctx, i, p) for i, p in plain.items()}
        fitted, _ = _sequential(ctx, plain, first)
        layers = {i: fitted[i] for i in segment}
        others = {i: fitted[i] for i in others}
        plan = plan.with_fit(tuple((layers[i].effective_weight(0, sites[i].weight),
                                    layers[i].effective_bias(0, sites[i].bias_value) if layers[i].refitted else None)
                                   for i in segment))
    if ctx.evaluator is not None:
        prior = list({id(u): u for u in joined.values()}.values())
        base_w, base_b = fitting.values(sites, {i: d.plan for i, d in planned.items() if i not in joined})
        more_w, more_b = _effective(sites, prior)
        before = ctx.evaluator.error(ctx.check_batches(), {**base_w, **more_w}, {**base_b, **more_b})
        weights, biases = fitting.values(sites, {i: p for i, p in others.items()})
        weights.update(more_w)
        biases.update(more_b)
        for layer, i in enumerate(segment):
            weights[i] = plan.effective_weight(layer, sites[i].weight)
            if sites[i].bias_value is not None:
                biases[i] = plan.effective_bias(layer, sites[i].bias_value)
        err = ctx.evaluator.error(ctx.check_batches(), weights, biases)
        limit = config.tolerance if config.tolerance is not None else CHAIN_ERROR_SLACK * before
        if not err <= limit:
            seen = " (both on the samples the refits were fitted on)" if config.refit and ctx.fit_fold is None else ""
            notes.append(f"lossy chain {names} not joined: jointly its output error would be {err:.3g}, "
                         f"split one by one {before:.3g}{seen}" + (f" (--tolerance {config.tolerance:g})"
                                                                   if config.tolerance is not None else ""))
            return None
    chain_sites = []
    for layer, i in enumerate(segment):
        site = dataclasses.replace(sites[i], weight=plan.effective_weight(layer, sites[i].weight))
        if sites[i].bias_value is not None:
            site.bias_value = plan.effective_bias(layer, sites[i].bias_value)
        chain_sites.append(site)
    chain = Chain(chain_sites, [after[i] for i in segment[:-1]])
    fit = ", refitted" if plan.refitted else ""
    reasons = tuple(f"layer {layer + 1} of {len(segment)} of one network split into {len(joint.parts)} joint parts"
                    f"{fit} (keeps {percent(plan.retained)} of the chain's significance)" for layer in range(len(segment)))
    return Unit(tuple(segment), chain, plan, reasons)


def _measure(ctx: _Context, notes: list[str]) -> None:
    """The evaluator (weights as inputs, site activations captured) and one streamed pass of
    calibration moments; on failure without --tolerance, a note and no measurements."""
    if ctx.calibration is None or not ctx.candidates:
        return
    names = tuple(ctx.sites[i].activation for i in ctx.candidates if fitting.refittable(ctx.sites[i]))
    try:
        ctx.evaluator = Evaluator(ctx.model, ctx.sites, ctx.candidates, ctx.config.base_threads, capture=names)
        _fit_batches(ctx, names)
        _collect(ctx)
    except InputError as exc:
        if ctx.config.tolerance is not None or ctx.config.resolved_score == "activation":
            raise
        ctx.evaluator, ctx.moments = None, None
        notes.append(f"the output error was not measured: {exc}")


def _fit_batches(ctx: _Context, names: tuple[str, ...]) -> None:
    """The samples per calibration run cut to what its captured activations allow (calibration.
    CAPTURE_BYTES), from one sample's activations captured at every candidate site."""
    if not names:
        return
    feeds = ctx.calibration.first_sample()
    found = ctx.evaluator.activations(feeds, {}, None, list(names))
    per_sample = sum(v.nbytes for k, v in found.items() if k not in feeds)
    del found
    size, asked = ctx.calibration.fit_batches(per_sample), ctx.config.calibration_batch
    if size < asked:
        log.info("calibration runs of %d samples, not %d: %.1f MB of activations captured a sample",
                 size, asked, per_sample / 1e6)


FOLD_SAMPLES = 4
"""With at least this many search samples, the moments are summed per half so that each refit is
measured on samples it was not fitted on (refit.DAMPINGS chosen by that error)."""


def _folds(calibration: Calibration, n: int) -> list[list[dict]]:
    """The search samples' batches in ``n`` folds (two halves, or all of them in one)."""
    return [calibration.batches("search", fold=f) for f in range(n)] if n > 1 else [calibration.batches("search")]


def _collect(ctx: _Context) -> None:
    """The store of the candidate sites' calibration moments (moment_store.py), its first streamed
    pass over the search samples (per half, when there are enough of them) made."""
    keyed = {}
    for i in ctx.candidates:
        if fitting.refittable(ctx.sites[i]):
            keyed.setdefault(fitting._key(ctx.sites[i]), ctx.sites[i])
    folds = _folds(ctx.calibration, 2 if ctx.calibration.n_search >= FOLD_SAMPLES else 1)
    limit = moment_store.budget(ctx.sites, ctx.candidates)
    ctx.moments = MomentStore(ctx.evaluator, keyed, folds, limit, lambda d, t: ctx.progress("calibrate", d, t))


def _sequential(ctx: _Context, plain: dict, first: dict) -> tuple[dict, bool]:
    ups = fitting.upstream(ctx.model, ctx.sites, list(plain))
    dampings = {**ctx.dampings, **{i: f.damping for i, f in ctx._fitters.items() if f.damping is not None}}
    return fitting.sequential(ctx.evaluator, ctx.sites, plain, first, ups, ctx.fold_batches(), ctx.deadline, lambda d, t: ctx.progress("refit", d, t), dampings)


def _mask_key(plan) -> tuple:
    return plan.label, plan.masks.key(0)


def _remember(ctx: _Context, i: int, fitted) -> None:
    """Record ``fitted`` as site ``i``'s plan refitted on the original activations."""
    ctx.first_fits[i] = (_mask_key(fitted), fitted)


def _fit_once(ctx: _Context, i: int, plan):
    """``plan`` refitted on the original activations (as it is where no moments were captured);
    the site's fitter is let go afterwards. The same mask fitted before is not fitted again."""
    known = ctx.first_fits.get(i)
    if known is not None and known[0] == _mask_key(plan):
        return known[1]
    fitter = ctx.fitter(i)
    if fitter is None:
        return plan
    fitted = fitter.fit(plan)[0]
    ctx.done_with(i)
    _remember(ctx, i, fitted)
    return fitted


def _refit_all(ctx: _Context, chosen: dict) -> dict:
    """The chosen plans refitted: first each on the original activations, then level by level."""
    first = {i: _fit_once(ctx, i, p) for i, p in chosen.items()}
    return _sequential(ctx, chosen, first)[0]


def lossy_units(sites: list[Site], decisions: dict[int, Decision]) -> list[Unit]:
    """One unit per planned site, its weight (and a refitted Gemm's C) the plan's effective ones:
    what the plan drops is zero in the rewrite too."""
    units = []
    for i, d in sorted(decisions.items()):
        if isinstance(d, Planned):
            site = dataclasses.replace(sites[i], weight=d.plan.effective_weight(0, sites[i].weight))
            if sites[i].bias_value is not None:
                site.bias_value = d.plan.effective_bias(0, sites[i].bias_value)
            units.append(Unit((i,), Chain([site], []), d.plan, (d.reason,)))
    return units


def _search(ctx: _Context, planners: dict, speed) -> tuple[dict, dict[int, str], list[dict]]:
    """``--tolerance``: (site -> plan, site -> reason, the confirmations made).

    Linear in the number of sites: every rung of every site is refitted and its local error read
    off the calibration moments (no model run); one whole-model run per site measures how its
    local error propagates to the outputs; a greedy knapsack (allocate.py) shares the tolerance
    among the sites by gain per unit of estimated error; a few whole-model runs confirm the choice,
    backing off the costliest sites until the measured error is within the tolerance; the chosen
    plans are then refitted in dependency order and kept if that measures better."""
    config, sites, tol = ctx.config, ctx.sites, ctx.config.tolerance
    ladders = {i: planners[i].ladder() for i in ctx.candidates}
    reasons: dict[int, str] = {}
    gains = _gains(ctx, ladders, speed)
    raw: dict[int, list] = {}
    options: dict[int, list[Option]] = {}
    unfitted: dict[int, dict[int, object]] = {}
    with cf.ThreadPoolExecutor(1, thread_name_prefix="onnx_split-propagation") as runs:
        # each site's propagation run (ORT) runs in this thread while the next sites are fitted
        propagation: dict[int, tuple] = {}
        for n, i in enumerate(ctx.candidates):
            ctx.progress("fit", n, len(ctx.candidates))
            fitter, opts = ctx.fitter(i), []
            for plan, gain in zip(ladders[i], gains[i]):
                if not gain > 0:
                    continue
                fitted, local = fitter.fit(plan, config.refit) if fitter is not None else (plan, None)
                opts.append((plan, fitted, gain, local))
            ctx.done_with(i)
            if opts:
                raw[i] = opts
                if all(o[3] is not None for o in opts) and not ctx.out_of_time():
                    probe = opts[probe_rung([o[3] for o in opts], tol)]
                    propagation[i] = (probe, runs.submit(ctx.sensitivity, {i: probe[1]}))
            elif not ladders[i]:
                reasons[i] = "too small to split"
            else:
                reasons[i] = (f"--tolerance {tol:g}: no split of it ({ladders[i][0].label} .. {ladders[i][-1].label}) "
                              f"was measured faster than the dense node" if speed is not None else
                              f"--tolerance {tol:g}: no split of it saves multiply-adds")
        ctx.progress("fit", len(ctx.candidates), len(ctx.candidates))
        for n, i in enumerate(raw):
            ctx.progress("sensitivity", n, len(raw))
            opts = raw[i]
            if i in propagation and (propagation[i][1].done() or not ctx.out_of_time()):
                probe, run = propagation[i]
                errors = propagated([o[3] for o in opts], opts.index(probe), run.result())
            elif ctx.out_of_time():
                if i in propagation:
                    propagation[i][1].cancel()
                reasons[i] = f"--search-seconds {config.search_seconds:g} ran out before this site was measured"
                continue
            else:  # inside a subgraph: no moments, each rung measured (in the runs' thread too)
                errors = runs.submit(lambda opts=opts, i=i: [ctx.search_error({i: o[1]}) for o in opts]).result()
            options[i] = [Option(o[1], o[2], e) for o, e in zip(opts, errors)]
            unfitted[i] = {id(o[1]): o[0] for o in opts}
        ctx.progress("sensitivity", len(raw), len(raw))
    ctx.release_moments()  # every site is fitted: a lossy chain's refit collects its own again

    trace: list[dict] = []
    dense_macs = sum(sites[i].weight.size for i in ctx.candidates) or 1

    def confirm(choice: dict[int, int]) -> float:
        plans = {i: options[i][r].plan for i, r in choice.items()}
        err = ctx.search_error(plans)
        saved = sum((1 - p.flops) * p.macs_dense() for p in plans.values())
        trace.append({"flops": 1 - saved / dense_macs, "error": err, "accepted": bool(err <= tol),
                      "estimate": estimate(options, choice), "sites": len(choice)})
        ctx.progress("confirm", len(trace), len(trace) + 1)
        return err

    budget, backed, path = tol, {}, []
    choice = allocate(options, budget, path)

    def flops_of(choice: dict[int, int]) -> float:
        saved = sum((1 - options[i][r].plan.flops) * options[i][r].plan.macs_dense() for i, r in choice.items())
        return 1 - saved / dense_macs

    trace.extend({"flops": flops_of(step), "error": estimate(options, step), "accepted": None, "estimated": True,
                  "sites": len(step)} for step in path)
    accepted, accepted_err = {}, 0.0
    shrinks = 0
    while choice and not ctx.out_of_time():
        err = confirm(choice)
        if err <= tol:
            accepted, accepted_err = choice, err
            break
        est = estimate(options, choice)
        for i in choice:
            backed[i] = err
        if shrinks < 3 and est > 0:  # the estimate was optimistic by err / est: ask for less
            shrinks += 1
            budget = min(budget, est) * 0.9 * tol / err
            smaller = allocate(options, budget)
            choice = smaller if smaller != choice else back_off(options, choice) or {}
        else:
            choice = back_off(options, choice) or {}
    chosen = {i: options[i][r].plan for i, r in accepted.items()}
    if config.refit:
        for i, plan in chosen.items():
            _remember(ctx, i, plan)
    if chosen and config.refit and ctx.evaluator is not None and len(chosen) > 1 and not ctx.out_of_time():
        plain = {i: unfitted[i][id(p)] for i, p in chosen.items()}
        seq, finished = _sequential(ctx, plain, chosen)
        if seq is not chosen and any(seq[i] is not chosen[i] for i in chosen):
            err = ctx.search_error(seq)
            trace.append({"flops": trace[-1]["flops"], "error": err, "accepted": bool(err <= min(tol, accepted_err)),
                          "estimate": None, "sites": len(seq), "sequential": True})
            if err <= min(tol, accepted_err):
                chosen = seq
    for i, opts in options.items():
        if i in chosen:
            r = accepted[i]
            reasons[i] = f"estimated output error {opts[r].error:.3g} alone"
            continue
        safest = min(opts, key=lambda o: o.error)
        if i in backed:
            reasons[i] = (f"--tolerance {tol:g}: backed off after the whole choice measured {backed[i]:.3g}; "
                          f"its safest split ({safest.plan.label}) alone is estimated at {safest.error:.3g}")
        elif safest.error > tol:
            reasons[i] = (f"--tolerance {tol:g}: its safest split ({safest.plan.label}) alone would add an estimated "
                          f"output error of {safest.error:.3g}, more than the tolerance")
        elif not chosen:
            why = "--search-seconds ran out first" if ctx.out_of_time() else "none was confirmed within it"
            reasons[i] = (f"--tolerance {tol:g}: its safest split ({safest.plan.label}) alone is estimated at "
                          f"{safest.error:.3g}, but the search split nothing: {why}")
        else:
            reasons[i] = (f"--tolerance {tol:g}: its safest split ({safest.plan.label}) would add an estimated "
                          f"output error of {safest.error:.3g}; the budget went to sites that save more per error")
    return chosen, reasons, trace


def _gains(ctx: _Context, ladders: dict, speed) -> dict[int, list[float]]:
    """Per site, what each rung saves: measured milliseconds (summed over the tuner's points) with
    ``speed``, 0 where the tuner kept the site dense; else multiply-adds per row."""
    flops = {i: [(1 - p.flops) * p.macs_dense() for p in ladder] for i, ladder in ladders.items()}
    if speed is None:
        return flops
    pairs = [(i, p) for i in ctx.candidates for p in ladders[i]]
    results = speed([(Chain([ctx.sites[i]], []), p) for i, p in pairs]) if pairs else []
    ms, per_mac = {}, []
    for (i, p), r in zip(pairs, results):
        dense = r.times_ms.get("dense", {})
        if r.choice == "dense":
            ms[id(p)] = 0.0
        elif dense and r.choice in r.times_ms:
            ms[id(p)] = sum(dense[pt] - r.times_ms[r.choice][pt] for pt in dense)
            per_mac.append(sum(dense.values()) / max(p.macs_dense(), 1))
    scale = float(np.median(per_mac)) if per_mac else 1.0
    return {i: [ms.get(id(p), (1 - p.flops) * p.macs_dense() * scale) for p in ladder]
            for i, ladder in ladders.items()}


def _summary(plan, extra: str | None) -> str:
    kept = f"keeps {percent(plan.retained)} of its {plan.score} significance at " if plan.retained is not None else ""
    fit = ", refitted" if getattr(plan, "refitted", False) else ""
    text = f"{plan.label}{fit}: {kept}{plan.flops:.1%} of the dense FLOPs"
    return text + (f"; {extra}" if extra else "")


def _why_dense(planner, config: SplitConfig) -> str:
    if config.tolerance is None:
        return refusal(planner, config)
    return "too small to split" if not planner.ladder() else "--tolerance: not reached by the search"


def _calibration(model, config: SplitConfig, *, required: bool, wanted: bool,
                 purpose: str = "--score activation") -> Calibration | None:
    if config.calibration is not None:
        return load_calibration(config.calibration, model, holdout=config.holdout, seed=config.seed,
                                batch_size=config.calibration_batch)
    if not (required or wanted):
        return None
    try:
        return random_calibration(model, config.input_shapes, holdout=config.holdout, seed=config.seed,
                                  purpose=purpose, batch_size=config.calibration_batch)
    except InputError:
        if required:
            raise
        return None


def _planners(ctx: _Context, every_level: bool = False) -> dict:
    """Every candidate's planner; with ``every_level`` (the dry run, the --tolerance search: each
    site is planned at every level), their partitions are made ahead in a worker where that pays."""
    norms = {}
    if ctx.config.resolved_score == "activation":
        for i in ctx.candidates:
            m = ctx.gram(i)
            if m is not None:
                norms[i] = m.norms
    scores, used = site_scores(ctx.sites, ctx.candidates, ctx.config.resolved_score, norms)
    cost = cost_rule(ctx.config.layout)  # auto: the parts' blocks
    planners = {}
    for n, i in enumerate(ctx.candidates):
        ctx.progress("partition", n, len(ctx.candidates))
        planners[i] = make_planner(scores[i], ctx.config, cost, used[i])
    ctx.progress("partition", len(ctx.candidates), len(ctx.candidates))
    balanced = [i for i in ctx.candidates if isinstance(planners[i], BalancedPlanner) and planners[i].levels()]
    if every_level and ahead.wanted([planners[i].significance.size for i in balanced]):  # partitions made ahead, in a second process
        ctx.ahead = ahead.Ahead([(i, planners[i].significance, planners[i].levels()) for i in balanced],
                                ctx.config.partitioner, ctx.config.seed, ctx.config.base_threads)
        for i in balanced:
            planners[i].ahead = lambda i=i: ctx.ahead.take(i)
    return planners


@dataclass
class SurveyRow:
    """``--dry-run``: one site's retained significance and FLOPs fraction at each level."""

    node: str
    scope: str
    shape: list[int] | None
    reason: str | None  # why the site is not a candidate
    score: str | None = None
    levels: list[dict] = field(default_factory=list)
    """{"level", "label", "retained", "flops", "error", "layer_error"}: with calibration data,
    ``layer_error`` is the site's own output error (refitted unless --no-refit) and ``error`` the
    estimated model output error of splitting this site alone (one measured run per site scales
    the layer errors)."""


def survey(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, progress=None) -> list[SurveyRow]:
    """Retained significance and FLOPs at 2/4/8/16 parts (tiles: 1/2 .. 1/16 of them) per site; with
    a calibration file, also each level's layer error and estimated output error."""
    progress = progress or (lambda *a: None)
    decided = site_decisions(sites, config)
    ctx = _Context(model, sites, [i for i in range(len(sites)) if i not in decided], config, progress)
    ctx.calibration = _calibration(model, config, required=config.resolved_score == "activation", wanted=False)
    if config.calibration is not None:
        _measure(ctx, [])
    elif ctx.calibration is not None and ctx.candidates:  # --score activation on random inputs: norms only
        names = tuple(sites[i].activation for i in ctx.candidates if fitting.refittable(sites[i]))
        ctx.evaluator = Evaluator(model, sites, ctx.candidates, config.base_threads, capture=names)
        _collect(ctx)
    ctx.fit_on_one_fold()  # the estimates made as the --tolerance search makes them
    planners = _planners(ctx, every_level=True)
    try:
        return _survey_rows(ctx, planners, decided)
    finally:
        ctx.close()


def _survey_rows(ctx: _Context, planners: dict, decided: dict) -> list[SurveyRow]:
    """The rows, site by site. Each site's propagation run (ONNX Runtime) runs in a second thread
    while this one fits the next sites (numpy): both release the GIL, and the figures are those of
    running them one after the other."""
    config, sites, progress = ctx.config, ctx.sites, ctx.progress
    measured = config.calibration is not None and ctx.evaluator is not None
    rows, later = [], []
    with cf.ThreadPoolExecutor(1, thread_name_prefix="onnx_split-propagation") as runs:
        for i, site in enumerate(sites):
            row = SurveyRow(site.name, site.scope, list(site.shape) if site.shape else None,
                            decided[i].reason if i in decided else None)
            rows.append(row)
            if i not in planners:
                continue
            row.score = planners[i].score
            steps = [(level, planners[i].step(level)) for level in LEVELS]
            steps = [(level, plan) for level, plan in steps if plan is not None]
            if measured:
                progress("estimate", ctx.candidates.index(i), len(ctx.candidates))
            fitter = ctx.fitter(i) if measured else None
            found = [fitter.fit(plan, config.refit, final=False) if fitter is not None else (plan, None)
                     for _, plan in steps]
            fitted, local = [f[0] for f in found], [f[1] for f in found]
            errors = _estimates(ctx, i, fitted, local, runs) if measured and steps else (lambda n=len(steps): [None] * n)
            ctx.done_with(i)
            later.append((row, steps, local, errors))
        ctx.release_moments()
        for row, steps, local, errors in later:
            for (level, plan), err, loc in zip(steps, errors(), local):
                row.levels.append({"level": level, "label": plan.label, "retained": plan.retained,
                                   "flops": plan.flops, "error": err, "layer_error": loc})
    if measured:
        progress("estimate", len(ctx.candidates), len(ctx.candidates))
    return rows


def _estimates(ctx: _Context, i: int, fitted: list, local: list, runs: cf.Executor):
    """A function giving the estimated output error of each plan of site ``i`` alone: one measured
    run (the plan of median layer error among those that drop something: allocate.probe_rung)
    scales the layer errors; measured per plan where they are
    unknown. The runs are handed to ``runs`` (one thread: the evaluator is never run twice at once)."""
    if any(loc is None for loc in local):
        measured = runs.submit(lambda: [ctx.search_error({i: plan}) for plan in fitted])
        return measured.result
    probe = probe_rung(local)
    plan = ctx.fitter(i).fit(fitted[probe], ctx.config.refit)[0]  # the dry run fitted none for good
    run = runs.submit(ctx.sensitivity, {i: plan})
    return lambda: propagated(local, probe, run.result())
