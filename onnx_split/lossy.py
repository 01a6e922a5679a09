"""The lossy side of the pass: calibration -> significance -> budget -> one decision per site.

Used by the pipeline when a budget is given (``--parts``, ``--keep``, ``--flops``,
``--tolerance``), and by :func:`survey` (``--dry-run``). Each site is planned on its own: lossy
plans are not joined into chains across layers. Everything here goes through the plan and
planner protocols (plans/base.py), never through a plan kind's own fields.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from types import MappingProxyType

import onnx

from .budget import LEVELS, by_budget, make_planner, refusal, search
from .calibration import Calibration, load_calibration, random_calibration
from .chains import Chain
from .config import SplitConfig
from .decisions import Decision, Kept, Planned, Unit
from .errors import InputError
from .planning import site_decisions
from .pruned import ErrorReport, Evaluator
from .rewrite import cost_form, cost_rule
from .significance import feature_norms, site_scores
from .sites import Site
from .text import percent

log = logging.getLogger(__name__)


@dataclass
class Lossy:
    """What the budget decided per site, with what is needed to measure the output error later."""

    decisions: dict[int, Decision]
    calibration: Calibration | None
    evaluator: Evaluator | None
    evaluations: int = 0
    notes: list[str] = field(default_factory=list)

    def error(self, weights: dict[int, object], tolerance: float | None) -> tuple[ErrorReport | None, list[str]]:
        """The relative output error of the model whose sites ``weights`` read those weights (the
        written plans' effective weights), and notes."""
        if self.calibration is None or self.evaluator is None:
            return None, []
        cal = self.calibration
        try:
            search_err = self.evaluator.error(cal.search, weights)
            held = self.evaluator.error(cal.held_out, weights)
        except InputError as exc:
            if tolerance is not None:
                raise
            return None, [f"the output error was not measured: {exc}"]
        met = None if tolerance is None else bool(held <= tolerance)
        return ErrorReport(cal.source, search_err, held, cal.n_search, cal.n_held_out, tolerance, met,
                           self.evaluations), []


def plan_lossy(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, progress=None) -> Lossy:
    """Choose each candidate site's lossy plan under the configured budget."""
    progress = progress or (lambda stage, done, total: None)
    decided = site_decisions(sites, config)
    candidates = [i for i in range(len(sites)) if i not in decided]
    needs_data = config.tolerance is not None or config.resolved_score == "activation"
    purpose = "--tolerance" if config.tolerance is not None else "--score activation"
    calibration = _calibration(model, config, required=needs_data, wanted=config.verify, purpose=purpose)
    planners = _planners(model, sites, candidates, config, calibration, progress)
    result = Lossy(decided, calibration, None)
    if calibration is not None and candidates:
        try:
            result.evaluator = Evaluator(model, sites, candidates, config.threads)
        except InputError as exc:
            if config.tolerance is not None:
                raise
            result.notes.append(f"the output error was not measured: {exc}")
    stopped: dict = {}
    if config.tolerance is not None:
        ladders = {i: planners[i].ladder() for i in candidates}
        total = sum(len(v) for v in ladders.values())
        done = [0]

        def error(choice: dict) -> float:
            done[0] += 1
            progress("search", min(done[0], total), total)
            weights = {i: plan.effective_weight(0, sites[i].weight) for i, plan in choice.items()}
            return result.evaluator.error(calibration.search, weights)

        found = search(ladders, error, config.tolerance)
        chosen, result.evaluations, stopped = found.choice, found.evaluations, found.stopped
    else:
        chosen = {i: p for i in candidates if (p := by_budget(planners[i], config)) is not None}
    form = cost_form(config.layout)
    for i in candidates:
        planner, plan = planners[i], chosen.get(i)
        facts = MappingProxyType({"partitioner": config.partitioner, "score": planner.score})
        if plan is not None and plan.flops >= 1:
            parts = plan.summary(0).get("parts")
            what = f"{parts} parts" if parts is not None else plan.label
            result.decisions[i] = Kept("plan", f"no saving: {what} in the {form.name} layout would cost "
                                               f"{form.cost(plan, None):,} multiply-adds per row, dense costs "
                                               f"{plan.macs_dense():,}", facts)
        elif plan is not None:
            result.decisions[i] = Planned(plan, _summary(plan, stopped.get(i)), facts)
        else:
            result.decisions[i] = Kept("budget", _why_dense(planner, config, stopped.get(i)), facts)
    return result


def lossy_units(sites: list[Site], decisions: dict[int, Decision]) -> list[Unit]:
    """One unit per planned site, its weight the plan's effective weight: what the plan drops is
    zero in the rewrite too."""
    units = []
    for i, d in sorted(decisions.items()):
        if isinstance(d, Planned):
            site = dataclasses.replace(sites[i], weight=d.plan.effective_weight(0, sites[i].weight))
            units.append(Unit((i,), Chain([site], []), d.plan, (d.reason,)))
    return units


def _with_others(stopped) -> str:
    return " (with the other sites' chosen splits)" if stopped[2] else ""


def _summary(plan, stopped) -> str:
    kept = f"keeps {percent(plan.retained)} of its {plan.score} significance at " if plan.retained is not None else ""
    text = f"{plan.label}: {kept}{plan.flops:.1%} of the dense FLOPs"
    if stopped is not None:
        text += f"; {stopped[0].label} would raise the output error to {stopped[1]:.3g}{_with_others(stopped)}"
    return text


def _why_dense(planner, config: SplitConfig, stopped) -> str:
    if config.tolerance is None:
        return refusal(planner, config)
    if stopped is not None:
        return (f"--tolerance {config.tolerance:g}: {stopped[0].label} would raise the output error to "
                f"{stopped[1]:.3g}{_with_others(stopped)}")
    return "too small to split" if not planner.ladder() else "--tolerance: not reached by the search"


def _calibration(model, config: SplitConfig, *, required: bool, wanted: bool,
                 purpose: str = "--score activation") -> Calibration | None:
    if config.calibration is not None:
        return load_calibration(config.calibration, model, holdout=config.holdout, seed=config.seed)
    if not (required or wanted):
        return None
    try:
        return random_calibration(model, config.input_shapes, holdout=config.holdout, seed=config.seed,
                                  purpose=purpose)
    except InputError:
        if required:
            raise
        return None


def _planners(model, sites, candidates, config: SplitConfig, calibration, progress) -> dict:
    norms = {}
    if config.resolved_score == "activation" and candidates:
        progress("significance", 0, 1)
        found = feature_norms(model, [sites[i] for i in candidates], calibration.search, config.threads)
        norms = {candidates[j]: v for j, v in found.items()}
    scores, used = site_scores(sites, candidates, config.resolved_score, norms)
    cost = cost_rule(config.layout)  # auto: the parts' blocks
    planners = {}
    for n, i in enumerate(candidates):
        progress("partition", n, len(candidates))
        planners[i] = make_planner(scores[i], config, cost, used[i])
    return planners


@dataclass
class SurveyRow:
    """``--dry-run``: one site's retained significance and FLOPs fraction at each level."""

    node: str
    scope: str
    shape: list[int] | None
    reason: str | None  # why the site is not a candidate
    score: str | None = None
    levels: list[dict] = field(default_factory=list)  # {"level", "label", "retained", "flops", "error"}


def survey(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, progress=None) -> list[SurveyRow]:
    """Retained significance and FLOPs at 2/4/8/16 parts (tiles: 1/2 .. 1/16 of them) per site; with
    a calibration file, also the relative output error of splitting that site alone (search samples)."""
    decided = site_decisions(sites, config)
    candidates = [i for i in range(len(sites)) if i not in decided]
    calibration = _calibration(model, config, required=config.resolved_score == "activation", wanted=False)
    planners = _planners(model, sites, candidates, config, calibration, progress or (lambda *a: None))
    evaluator = None
    if config.calibration is not None and candidates:
        evaluator = Evaluator(model, sites, candidates, config.threads)
    rows = []
    for i, site in enumerate(sites):
        row = SurveyRow(site.name, site.scope, list(site.shape) if site.shape else None,
                        decided[i].reason if i in decided else None)
        if i in planners:
            row.score = planners[i].score
            for level in LEVELS:
                plan = planners[i].step(level)
                if plan is not None:
                    error = None if evaluator is None else evaluator.error(
                        calibration.search, {i: plan.effective_weight(0, site.weight)})
                    row.levels.append({"level": level, "label": plan.label, "retained": plan.retained,
                                       "flops": plan.flops, "error": error})
        rows.append(row)
    return rows
