"""``split_model``: load -> sites -> partition -> rewrite -> verify -> bench -> report.

The library never prints or exits: it logs, raises :class:`OnnxSplitError` for bad input, and
returns a :class:`SplitResult`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import __version__
from .bench import benchmark_models
from .chains import Chain, chains_from_links, find_links
from .config import DEFAULT_LOSSY, SplitConfig
from .errors import InputError, first_line
from .inputs import batch_shapes, make_feeds, verification_sets
from .model_io import is_large, load_model, save_model
from .partition import ChainPlan, Plan, exact_components, joint_components
from .lossy import SurveyRow, plan_lossy, survey
from .pruned import masked, pruned_model
from .report import ChainReport, SiteReport, SplitReport
from .rewrite import layout_macs, rewrite_model, static_form
from .runtime import CPU, CUDA, available_providers, make_session, model_source, ort_error, provider_status
from .sites import Site, find_sites
from .tune import keep_if_faster, tune_chains
from .verify import verify_models

log = logging.getLogger(__name__)

CHAIN_SLACK = 1.1
"""A link joins two layers when their joint partition costs at most this times splitting each alone."""

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as work advances (the CLI draws a bar with it)."""


@dataclass
class SplitResult:
    model: onnx.ModelProto
    report: SplitReport


def split_model(model_or_path: onnx.ModelProto | str | os.PathLike, config: SplitConfig | None = None, *,
                progress: Progress | None = None) -> SplitResult:
    """Split every constant MatMul/Gemm weight of a model along its near-zero structure.

    The input is never modified: the result holds a rewritten copy and the report. Verification
    and timing run as ``config`` asks; their outcome is in the report (the caller decides what a
    failure means).
    """
    config = config or SplitConfig()
    progress = progress or (lambda stage, done, total: None)
    if config.lossy and config.budget is None:
        raise InputError(f"--partitioner {config.partitioner} drops weights: give a budget "
                         f"(--parts, --keep, --flops or --tolerance), or --dry-run to see what each would keep")
    source, original = _load(model_or_path, "split_model")
    report = SplitReport(version=__version__, config=_config_dict(config), input=source)

    model = onnx.ModelProto()
    model.CopyFrom(original)
    sites = find_sites(model, min_elements=config.min_elements)
    plans, site_reports = _plan_sites(sites, config, progress)
    report.sites = site_reports
    lossy = None
    if config.lossy:
        lossy = plan_lossy(model, sites, config, site_reports, progress)
        report.notes.extend(lossy.notes)
        chains, chain_sites = _lossy_chains(sites, lossy, site_reports, config)
    else:
        chains, chain_sites = _build_chains(sites, plans, config), []
    points: list[tuple[str, dict[str, np.ndarray]]] = []
    providers: list[str] = []
    if config.verify or config.bench or config.layout == "auto":
        providers = _providers(config, report)
        points, report.inputs = _points(original, config)
    forms = _choose_forms(original, chains, config, points, providers, report, progress)
    written = [j for j, form in enumerate(forms) if form != "dense"]
    jobs = [(*chains[j], forms[j], config.layout == "function") for j in written]
    refused, gathers = rewrite_model(model, jobs)
    for j, (chain, plan, form, _) in enumerate(jobs):
        _record_chain(report, chain, plan, form, refused.get(j), config.layout, gathers.get(j, 0))
    reference = original
    if lossy is not None:
        applied = [chain_sites[written[j]] for j in range(len(jobs)) if j not in refused]
        reference = _lossy_outcome(original, sites, lossy, applied, config, report)
    _record_metadata(model, config, report)

    report.checker = check(model)
    if not config.verify:
        report.checker["ort_loads"] = loads_in_ort(model)
    if points:
        model = _verify_and_time(original, model, config, points, providers, report, progress, reference)
    return SplitResult(model, report)


def survey_model(model_or_path: onnx.ModelProto | str | os.PathLike, config: SplitConfig | None = None, *,
                 progress: Progress | None = None) -> list[SurveyRow]:
    """``--dry-run``: per site, the retained significance and FLOPs of 2/4/8/16 parts (tiles:
    1/2 .. 1/16 of them) with the configured partitioner (metis for ``components``) and score."""
    config = config or SplitConfig()
    if not config.lossy:
        config = dataclasses.replace(config, partitioner=DEFAULT_LOSSY)
    _, model = _load(model_or_path, "survey_model")
    return survey(model, find_sites(model, min_elements=config.min_elements), config, progress)


def _load(model_or_path, caller: str) -> tuple[str | None, onnx.ModelProto]:
    if isinstance(model_or_path, (str, os.PathLike)):
        return str(model_or_path), load_model(model_or_path)
    if isinstance(model_or_path, onnx.ModelProto):
        return None, model_or_path
    raise InputError(f"{caller} wants an onnx.ModelProto or a path, not {type(model_or_path).__name__}")


def _verify_and_time(original, model, config: SplitConfig, points, providers, report: SplitReport, progress,
                     reference):
    """Verification (against ``reference``: the original, or for a lossy plan the original with the
    dropped weights zeroed) on the first set of inputs, timing on every set; with ``--layout auto``
    the original when the rewrite does not pay as a whole."""
    _, feeds = points[0]
    if config.verify:
        progress("verify", 0, 1)
        sets, report.inputs = verification_sets(original, feeds, config.inputs_path, config.seed, report.inputs)
        report.verification = verify_models(reference, model, sets, providers=providers, rtol=config.rtol,
                                            atol=config.atol, threads=config.threads)
        progress("verify", 1, 1)
    if config.bench and report.modified:
        for i, (label, feeds) in enumerate(points):
            progress("bench", i, len(points))
            entries = benchmark_models(original, model, feeds, providers=providers,
                                       seconds=config.bench_seconds, threads=config.threads)
            for e in entries:
                e.inputs = label
            report.latency.extend(entries)
        progress("bench", len(points), len(points))
        if config.layout == "auto":
            model = keep_if_faster(original, model, config.min_speedup, report)
            if report.reverted and report.error is not None:
                report.error = dataclasses.replace(
                    report.error, data=report.error.data + "; the original was written, so its error is 0",
                    search=0.0, held_out=0.0, met=None if report.error.tolerance is None else True)
    elif config.bench:
        report.notes.append("nothing was split: latency not measured")
    elif config.layout == "auto" and report.modified:
        report.notes.append("--no-bench: the whole rewritten model was not timed against the original, so "
                            "only the per-site measurements chose what to write")
    return model


def _points(original: onnx.ModelProto, config: SplitConfig) -> tuple[list[tuple[str, dict]], list[str]]:
    """The inputs to verify, tune and time at: one set per ``--batch`` size, else the given ones."""
    if not config.batches or config.inputs_path is not None:
        feeds, notes = make_feeds(original, config.input_shapes, config.inputs_path, config.seed)
        if config.batches:
            notes.append("--batch is ignored with --inputs: the given inputs set the batch")
        return [(_describe_feeds(feeds), feeds)], notes
    points, notes = [], []
    for batch in config.batches:
        shapes = batch_shapes(original, batch, config.input_shapes)
        feeds, notes = make_feeds(original, shapes, None, config.seed)
        points.append((f"batch {batch}", feeds))
    return points, notes


def _describe_feeds(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(v.shape)}" for name, v in feeds.items())


def _plan_sites(sites: list[Site], config: SplitConfig, progress: Progress):
    """Plan each candidate site on its own: ``{site index: plan}`` for those worth splitting, and a
    report for every site."""
    plans: dict[int, ChainPlan] = {}
    reports: list[SiteReport] = []
    cache: dict[tuple, Plan] = {}
    form = "batched" if config.layout == "batched" else "parallel"
    for i, site in enumerate(sites):
        progress("analyse", i, len(sites))
        rep = SiteReport(node=site.name, op_type=site.op_type, scope=site.scope,
                         shape=list(site.shape) if site.shape else None,
                         dtype=str(site.weight.dtype) if site.weight is not None else None,
                         decision="kept", reason=site.reason or "")
        reports.append(rep)
        if site.shape is not None and len(site.shape) == 2:
            rep.flops_before = 2 * site.shape[0] * site.shape[1]
        if site.reason is not None or config.lossy:
            continue
        key = (site.scope, site.weight_name, site.trans_b)  # one plan per stored weight and orientation
        if key not in cache:
            cache[key] = exact_components(site.weight, config.threshold, config.max_parts)
        plan = cache[key]
        k, n = plan.k, plan.n
        rep.components, rep.unused_inputs, rep.dead_outputs = plan.n_components, plan.unused_rows.size, plan.dead_cols.size
        chain_plan = ChainPlan.from_plan(plan)
        after = layout_macs(chain_plan, form)
        if plan.n_components == 0:
            rep.reason = f"every weight is within --threshold {config.threshold}: the output does not depend on the input"
        elif after >= k * n:
            rep.reason = _no_saving(plan, after)
        else:
            rep.reason = (f"{plan.n_components} components; {plan.unused_rows.size} unused inputs, "
                          f"{plan.dead_cols.size} outputs with no input")
            plans[i] = chain_plan
    progress("analyse", len(sites), len(sites))
    return plans, reports


def _lossy_chains(sites: list[Site], lossy, reports: list[SiteReport], config: SplitConfig):
    """One chain per site whose lossy plan costs less than the dense node in the layout (the others
    are kept, with why), on the pruned weight: what the parts do not keep is zero in the rewrite
    too. Returns the chains and their site indices."""
    form = "batched" if config.layout == "batched" else "parallel"
    chains, indices = [], []
    for i, option in sorted(lossy.options.items()):
        after = layout_macs(option.plan, form)
        if after >= option.plan.macs_dense:
            reports[i].retained = None
            reports[i].reason = (f"no saving: {len(option.plan.parts)} parts in the {form} layout would cost "
                                 f"{after:,} multiply-adds per row, dense costs {option.plan.macs_dense:,}")
            continue
        site = dataclasses.replace(sites[i], weight=masked(sites[i].weight, option.mask))
        chains.append((Chain([site], []), option.plan))
        indices.append(i)
    return chains, indices


def _lossy_outcome(original, sites: list[Site], lossy, applied: list[int], config: SplitConfig,
                   report: SplitReport) -> onnx.ModelProto:
    """After a lossy rewrite: the output error of the ``applied`` plans in the report, and the model
    verification compares with (the original with those sites' dropped weights zeroed)."""
    for i in set(lossy.options) - set(applied):
        report.sites[i].retained = None  # tuned dense or refused: nothing was dropped there
    report.error = lossy.error(applied, config.tolerance)
    report.notes.extend(n for n in lossy.notes if n not in report.notes)
    if not applied:
        return original
    return pruned_model(original, sites, {i: lossy.options[i].mask for i in applied})


def _build_chains(sites: list[Site], plans: dict[int, ChainPlan], config: SplitConfig) -> list[tuple[Chain, ChainPlan]]:
    """Group linked sites into chains whose joint partition costs at most ``CHAIN_SLACK`` times
    splitting them one by one; a link whose layers do not line up is cut (the parts join there)."""
    eligible = sorted(plans)
    links = find_links(sites, eligible) if config.chains else []
    after = {link.a: link for link in links}
    result = []
    for path in chains_from_links(eligible, links):
        if len(path) > 2:  # the usual case, one joint partition for the whole path, costs one pass
            whole = joint_components([sites[i].weight for i in path], config.threshold, config.max_parts)
            if whole is not None and whole.macs_split <= CHAIN_SLACK * sum(plans[i].macs_split for i in path):
                result.append((Chain([sites[i] for i in path], [after[i] for i in path[:-1]]), whole))
                continue
        segment, plan = [path[0]], plans[path[0]]
        for nxt in path[1:]:
            joint = joint_components([sites[i].weight for i in segment + [nxt]], config.threshold, config.max_parts)
            if joint is not None and joint.macs_split <= CHAIN_SLACK * (plan.macs_split + plans[nxt].macs_split):
                segment, plan = segment + [nxt], joint
                continue
            log.info("chain cut after %s: the joint partition would cost %s MACs per row", sites[segment[-1]].name,
                     "no valid" if joint is None else f"{joint.macs_split:,}")
            result.append((Chain([sites[i] for i in segment], [after[i] for i in segment[:-1]]), plan))
            segment, plan = [nxt], plans[nxt]
        result.append((Chain([sites[i] for i in segment], [after[i] for i in segment[:-1]]), plan))
    return result


def _choose_forms(original, chains, config: SplitConfig, points, providers, report: SplitReport, progress) -> list[str]:
    if config.layout != "auto":
        return [static_form(config.layout, chain, plan) for chain, plan in chains]
    why = None if points else "no inputs to measure with"
    if why is None:
        loads = loads_in_ort(original)
        why = None if loads == "yes" else f"onnxruntime cannot load the original: {loads}"
    if why is not None:
        report.notes.append(f"--layout auto could not measure ({why}): the static parallel rule chose the layouts")
        return [static_form("parallel", chain, plan) for chain, plan in chains]
    results = tune_chains(original, chains, points, providers=providers, seconds=config.tune_seconds,
                          threads=config.threads, margin=config.min_speedup, progress=progress)
    report.tuning = results
    for (chain, _), result in zip(chains, results):
        if result.choice == "dense":
            for rep in _reports_of(report, chain):
                rep.reason = f"--layout auto {result.reason}"
    return [r.choice for r in results]


def _reports_of(report: SplitReport, chain: Chain) -> list[SiteReport]:
    """The site reports of the chain's sites."""
    return [r for r in report.sites if any(r.node == s.name and r.scope == s.scope for s in chain.sites)]


def _record_chain(report: SplitReport, chain: Chain, plan: ChainPlan, form: str, refused: str | None,
                  layout: str, gathers: int) -> None:
    reports = _reports_of(report, chain)
    if refused is not None:
        for rep in reports:
            rep.reason = refused
        return
    written = "function" if layout == "function" else form
    report.chains.append(ChainReport(sites=[s.name for s in chain.sites], scope=chain.first.scope,
                                     parts=len(plan.parts), layout=written, boundary_gathers=gathers,
                                     flops_before=2 * plan.macs_dense, flops_after=2 * layout_macs(plan, form)))
    for layer, site in enumerate(chain.sites):
        rep = next(r for r in reports if r.node == site.name)
        rep.decision, rep.layout, rep.parts = "split", written, len(plan.parts)
        rep.part_shapes = [list(p.layer_shape(layer)) for p in plan.parts]
        rep.flops_after = 2 * layout_macs(plan, form, layer)
        if len(chain.sites) > 1:
            rep.chain = chain.name
            rep.reason = (f"layer {layer + 1} of {len(chain.sites)} of one network split into {len(plan.parts)} "
                          f"({plan.n_components} joint components)")
        elif rep.retained is None:  # a lossy site keeps the budget's summary
            rep.reason = (f"{rep.components} components -> {len(plan.parts)} parts; {rep.unused_inputs} unused "
                          f"inputs, {rep.dead_outputs} outputs with no input")


def _no_saving(plan: Plan, after: int) -> str:
    if plan.n_components == 1 and not plan.unused_rows.size and not plan.dead_cols.size:
        return f"fully connected at --threshold {plan.threshold}: one component covers every input and output"
    return (f"no saving: {plan.n_components} components in {len(plan.parts)} parts would cost {after:,} "
            f"multiply-adds per row, dense costs {plan.k * plan.n:,}")


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


def loads_in_ort(model: onnx.ModelProto) -> str:
    """"yes", or why the installed ONNX Runtime cannot load the model (one line)."""
    try:
        with model_source(model) as source:
            make_session(source, CPU, "disabled")
    except Exception as exc:  # ORT raises its own types
        return ort_error(exc)
    return "yes"


def _providers(config: SplitConfig, report: SplitReport) -> list[str]:
    if config.providers is not None:
        return list(config.providers)
    found = available_providers()
    if CUDA not in found:
        report.notes.append(f"CUDA not verified or timed: {provider_status(CUDA)}")
    return found or [CPU]


def _config_dict(config: SplitConfig) -> dict:
    return json.loads(config.to_json())


def _record_metadata(model: onnx.ModelProto, config: SplitConfig, report: SplitReport) -> None:
    entries = {
        "onnx_split.version": __version__,
        "onnx_split.options": config.to_json(),
        "onnx_split.summary": f"{report.n_split} of {len(report.sites)} MatMul/Gemm sites split "
                              f"({config.layout} layout)",
    }
    if config.lossy:
        error = report.error
        entries["onnx_split.lossy"] = (
            f"{config.budget}, {config.partitioner} partitioner: weights outside the parts' blocks are dropped; "
            + (f"relative output error {error.search:.3g} on {error.search_samples} search samples, "
               f"{error.held_out:.3g} on {error.held_out_samples} held-out samples ({error.data})"
               if error is not None else "output error not measured"))
    kept = [p for p in model.metadata_props if not p.key.startswith("onnx_split.")]  # a rerun replaces all
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


