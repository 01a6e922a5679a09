"""The lossy side of the pass: calibration -> significance -> budget -> one plan per site.

Used by the pipeline when a budget is given (``--parts``, ``--keep``, ``--flops``,
``--tolerance``), and by :func:`survey` (``--dry-run``). Each site is planned on its own: lossy
plans are not joined into chains across layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx

from .budget import LEVELS, Option, Planner, search
from .calibration import Calibration, load_calibration, random_calibration
from .config import SplitConfig
from .errors import InputError
from .pruned import Evaluator
from .report import ErrorReport, SiteReport, percent
from .rewrite import layout_macs
from .significance import feature_norms, site_scores
from .sites import Site

log = logging.getLogger(__name__)


@dataclass
class LossyPlan:
    """What the budget chose, with what is needed to measure its output error later."""

    options: dict[int, Option]  # site index -> its plan (sites left dense are absent)
    calibration: Calibration | None
    evaluator: Evaluator | None
    evaluations: int = 0
    notes: list[str] = field(default_factory=list)

    def error(self, applied: list[int], tolerance: float | None) -> ErrorReport | None:
        """The relative output error of the model with the plans of ``applied`` sites."""
        if self.calibration is None or self.evaluator is None:
            return None
        masks = {i: self.options[i].mask for i in applied}
        cal = self.calibration
        try:
            search_err = self.evaluator.error(cal.search, masks)
            held = self.evaluator.error(cal.held_out, masks)
        except InputError as exc:
            if tolerance is not None:
                raise
            self.notes.append(f"the output error was not measured: {exc}")
            return None
        met = None if tolerance is None else bool(held <= tolerance)
        return ErrorReport(cal.source, search_err, held, cal.n_search, cal.n_held_out, tolerance, met,
                           self.evaluations)


def plan_lossy(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, reports: list[SiteReport],
               progress=None) -> LossyPlan:
    """Choose each candidate site's lossy plan under the configured budget; fill its report."""
    progress = progress or (lambda stage, done, total: None)
    candidates = [i for i, s in enumerate(sites) if s.reason is None]
    needs_data = config.tolerance is not None or config.resolved_score == "activation"
    purpose = "--tolerance" if config.tolerance is not None else "--score activation"
    calibration = _calibration(model, config, required=needs_data, wanted=config.verify, purpose=purpose)
    planners = _planners(model, sites, candidates, config, calibration, reports, progress)
    result = LossyPlan({}, calibration, None)
    if calibration is not None and candidates:
        try:
            result.evaluator = Evaluator(model, sites, candidates, config.threads)
        except InputError as exc:
            if config.tolerance is not None:
                raise
            result.notes.append(f"the output error was not measured: {exc}")
    if config.tolerance is not None:
        ladders = {i: planners[i].ladder() for i in candidates}
        total = sum(len(v) for v in ladders.values())
        done = [0]

        def error(choice: dict[int, Option]) -> float:
            done[0] += 1
            progress("search", min(done[0], total), total)
            return result.evaluator.error(calibration.search, {i: o.mask for i, o in choice.items()})

        found = search(ladders, error, config.tolerance)
        result.options, result.evaluations, stopped = found.choice, found.evaluations, found.stopped
    else:
        stopped = {}
        for i in candidates:
            option = _by_budget(planners[i], config)
            if option is not None:
                result.options[i] = option
    for i in candidates:
        _describe(reports[i], planners[i], result.options.get(i), config, stopped.get(i))
    return result


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


def _planners(model, sites, candidates, config: SplitConfig, calibration, reports, progress) -> dict[int, Planner]:
    score = config.resolved_score
    norms = {}
    if score == "activation" and candidates:
        progress("significance", 0, 1)
        found = feature_norms(model, [sites[i] for i in candidates], calibration.search, config.threads)
        norms = {candidates[j]: v for j, v in found.items()}
    scores, used = site_scores(sites, candidates, score, norms)
    form = "batched" if config.layout == "batched" else "parallel"  # auto: the parts' blocks

    def cost(chain):
        return layout_macs(chain, form)

    planners = {}
    for n, i in enumerate(candidates):
        progress("partition", n, len(candidates))
        planners[i] = Planner(scores[i], config.partitioner, tile=config.tile, seed=config.seed, cost=cost,
                              max_parts=config.max_parts)
        reports[i].partitioner, reports[i].score = config.partitioner, used[i]
    return planners


def _by_budget(planner: Planner, config: SplitConfig) -> Option | None:
    if config.parts is not None:
        return planner.for_parts(config.parts)
    if config.keep is not None:
        return planner.for_keep(config.keep)
    return planner.for_flops(config.flops)


def _describe(rep: SiteReport, planner: Planner, option: Option | None, config: SplitConfig,
              stopped: tuple[Option, float] | None) -> None:
    if option is not None:
        rep.retained = option.retained
        rep.reason = (f"{option.label}: keeps {percent(option.retained)} of its {rep.score} significance at "
                      f"{option.flops:.1%} of the dense FLOPs")
        if stopped is not None:
            rep.reason += (f"; {stopped[0].label} would raise the output error to {stopped[1]:.3g} (with the other "
                           f"sites' chosen splits)")
        return
    if config.parts is not None:
        rep.reason = (f"--parts {config.parts} is capped to 1 here (by --max-parts {config.max_parts} or the "
                      f"weight's smaller side): nothing to split")
    elif config.keep is not None:
        first = planner.ladder()[:1]
        best = f" ({first[0].label} keep {percent(first[0].retained)})" if first else ""
        rep.reason = f"no split keeps {config.keep:g} of its {rep.score} significance{best}"
    elif config.flops is not None and config.flops >= 1:
        rep.reason = f"--flops {config.flops:g} allows the dense cost"
    elif config.flops is not None and config.partitioner == "tiles":
        rep.reason = (f"no set of {config.tile}x{config.tile} tiles costs at most {config.flops:g} of the dense FLOPs "
                      f"(the best tile alone costs {planner.at(1).flops:.1%})")
    elif config.flops is not None:
        rep.reason = (f"no plan of at most {planner.max_parts} parts (--max-parts {config.max_parts}, or the weight's "
                      f"smaller side) costs at most {config.flops:g} of the dense FLOPs")
    elif stopped is not None:
        rep.reason = (f"--tolerance {config.tolerance:g}: {stopped[0].label} would raise the output error to "
                      f"{stopped[1]:.3g} (with the other sites' chosen splits)")
    else:
        rep.reason = "too small to split" if not planner.ladder() else "--tolerance: not reached by the search"


@dataclass
class SurveyRow:
    """``--dry-run``: one site's retained significance and FLOPs fraction at each level."""

    node: str
    scope: str
    shape: list[int] | None
    reason: str | None  # why the site is not a candidate
    score: str | None = None
    levels: list[dict] = field(default_factory=list)  # {"level", "label", "retained", "flops"}


def survey(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, progress=None) -> list[SurveyRow]:
    """Retained significance and FLOPs at 2/4/8/16 parts (tiles: 1/2 .. 1/16 of them) per site; with
    a calibration file, also the relative output error of splitting that site alone (search samples)."""
    candidates = [i for i, s in enumerate(sites) if s.reason is None]
    calibration = _calibration(model, config, required=config.resolved_score == "activation", wanted=False)
    reports = [SiteReport(s.name, s.op_type, s.scope, None, None, "kept", "") for s in sites]
    planners = _planners(model, sites, candidates, config, calibration, reports, progress or (lambda *a: None))
    evaluator = None
    if config.calibration is not None and candidates:
        evaluator = Evaluator(model, sites, candidates, config.threads)
    rows = []
    for i, site in enumerate(sites):
        row = SurveyRow(site.name, site.scope, list(site.shape) if site.shape else None, site.reason)
        if i in planners:
            row.score = reports[i].score
            for level in LEVELS:
                option = planners[i].step(level)
                if option is not None:
                    error = None if evaluator is None else evaluator.error(calibration.search, {i: option.mask})
                    row.levels.append({"level": level, "label": option.label, "retained": option.retained,
                                       "flops": option.flops, "error": error})
        rows.append(row)
    return rows


def survey_table(rows: list[SurveyRow], partitioner: str, tile: int = 64, layout: str = "auto") -> str:
    """The dry run as a table: per candidate site, "retained / FLOPs share" at each level; then the
    sites that are not candidates, with why."""
    if not rows:
        return "no MatMul or Gemm nodes found"
    heads = [f"{level} parts" if partitioner != "tiles" else f"1/{level} of tiles" for level in LEVELS]
    header = ["site", "shape", "significance", *heads]
    table, kept = [], []
    for row in rows:
        name = row.node if row.scope == "main" else f"{row.scope}/{row.node}"
        shape = "x".join(map(str, row.shape)) if row.shape else "-"
        if row.reason is not None:
            kept.append(f"  {name}  {shape}  kept: {row.reason}")
            continue
        cells = {lv["level"]: f"{percent(lv['retained'])} / {lv['flops']:.1%}"
                 + (f" / {lv['error']:.3g}" if lv.get("error") is not None else "") for lv in row.levels}
        table.append([name, shape, row.score or "-", *(cells.get(level, "-") for level in LEVELS)])
    what = f"{tile}x{tile} tiles, the most significant kept" if partitioner == "tiles" else f"{partitioner} parts"
    counted = "as the batched layout computes them, padding included" if layout == "batched" else "the parts' blocks"
    measured = any(lv.get("error") is not None for row in rows for lv in row.levels)
    cell = "retained significance / share of the dense FLOPs" + (
        " / relative output error of splitting this site alone (calibration search samples)" if measured else "")
    lines = [f"each cell: {cell} ({what}; FLOPs of {counted})"]
    if table:
        widths = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + table]
    else:
        lines.append("no site can be split")
    if kept:
        lines += ["not candidates:", *kept]
    return "\n".join(lines)
