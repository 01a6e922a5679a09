"""``split_model``: load -> sites -> partition -> rewrite -> verify -> bench -> report.

The library never prints or exits: it logs, raises :class:`OnnxSplitError` for bad input, and
returns a :class:`SplitResult`.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


import onnx

from . import __version__
from .bench import benchmark_models
from .config import SplitConfig
from .errors import InputError, first_line
from .inputs import make_feeds
from .model_io import is_large, load_model, save_model
from .partition import Plan, exact_components
from .report import SiteReport, SplitReport
from .rewrite import layout_macs, rewrite_model
from .runtime import CPU, CUDA, available_providers, make_session, model_source, ort_error, provider_status
from .sites import Site, find_sites
from .verify import verify_models

log = logging.getLogger(__name__)

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
    if isinstance(model_or_path, (str, os.PathLike)):
        source = str(model_or_path)
        original = load_model(model_or_path)
    elif isinstance(model_or_path, onnx.ModelProto):
        source, original = None, model_or_path
    else:
        raise InputError(f"split_model wants an onnx.ModelProto or a path, not {type(model_or_path).__name__}")
    report = SplitReport(version=__version__, config=_config_dict(config), input=source)

    model = onnx.ModelProto()
    model.CopyFrom(original)
    sites = find_sites(model, min_elements=config.min_elements)
    jobs, site_reports = _plan_sites(sites, config, progress)
    refused = rewrite_model(model, [(sites[i], plan) for i, plan in jobs], config.layout)
    for j, reason in refused.items():
        rep = site_reports[jobs[j][0]]
        rep.decision, rep.reason, rep.parts, rep.part_shapes, rep.layout = "kept", reason, 0, [], None
        rep.flops_after = 0
    report.sites = site_reports
    _record_metadata(model, config, report)

    report.checker = check(model)
    if not config.verify:
        report.checker["ort_loads"] = loads_in_ort(model)
    if config.verify or config.bench:
        providers = _providers(config, report)
        feeds, report.inputs = make_feeds(original, config.input_shapes, config.inputs_path, config.seed)
        if config.verify:
            progress("verify", 0, 1)
            report.verification = verify_models(original, model, feeds, providers=providers, rtol=config.rtol,
                                                atol=config.atol, threads=config.threads)
            progress("verify", 1, 1)
        if config.bench and report.modified:
            progress("bench", 0, 1)
            report.latency = benchmark_models(original, model, feeds, providers=providers,
                                              seconds=config.bench_seconds, threads=config.threads)
            progress("bench", 1, 1)
        elif config.bench:
            report.notes.append("nothing was split: latency not measured")
    return SplitResult(model, report)


def _plan_sites(sites: list[Site], config: SplitConfig, progress: Progress):
    jobs: list[tuple[int, Plan]] = []
    reports: list[SiteReport] = []
    cache: dict[tuple, Plan] = {}
    for i, site in enumerate(sites):
        progress("analyse", i, len(sites))
        rep = SiteReport(node=site.name, op_type=site.op_type, scope=site.scope,
                         shape=list(site.shape) if site.shape else None,
                         dtype=str(site.weight.dtype) if site.weight is not None else None,
                         decision="kept", reason=site.reason or "")
        reports.append(rep)
        if site.shape is not None and len(site.shape) == 2:
            rep.flops_before = 2 * site.shape[0] * site.shape[1]
        if site.reason is not None:
            continue
        key = (site.scope, site.weight_name, site.trans_b)  # one plan per stored weight and orientation
        if key not in cache:
            cache[key] = exact_components(site.weight, config.threshold, config.max_parts)
        plan = cache[key]
        k, n = plan.k, plan.n
        rep.components, rep.unused_inputs, rep.dead_outputs = plan.n_components, plan.unused_rows.size, plan.dead_cols.size
        after = layout_macs(plan, config.layout)
        if plan.n_components == 0:
            rep.reason = f"every weight is within --threshold {config.threshold}: the output does not depend on the input"
        elif after >= k * n:
            rep.reason = _no_saving(plan, after)
        else:
            parts = plan.with_dead_columns()
            rep.decision, rep.layout, rep.parts = "split", config.layout, len(parts)
            rep.part_shapes = [list(p.shape) for p in parts]
            rep.flops_after = 2 * after
            rep.reason = (f"{plan.n_components} components -> {len(parts)} parts; {plan.unused_rows.size} "
                          f"unused inputs, {plan.dead_cols.size} outputs with no input")
            jobs.append((i, plan))
    progress("analyse", len(sites), len(sites))
    return jobs, reports


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
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


