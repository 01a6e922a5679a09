"""The factorizing side of the pass (``--factorize METHOD --density D``): every candidate weight
replaced by factors fitted on calibration data (factorize/). The sparse methods are written
compressed (rewrite/compressed.py), so that the model still runs one dense MatMul per site; the
structured ones (``blocks``, ``lowrank``) as two smaller MatMuls (rewrite/block_factor.py), which
``--layout auto`` keeps only where they are measured faster.

Sites are fitted level by level in their dependency order (fitting.levels), each on the
activations X' that the already-factorized sites before it produce, against the original output
XW: the methods minimise ||X'(W̃ − W')|| with W̃ = (X'ᵀX' + λ)⁻¹X'ᵀX W, the weight that best
reproduces XW from X' (W̃ = W at the first level, where X' = X). The layer error each site
reports is ||X'W' − XW|| / ||XW||, on the search and on the held-out calibration samples; the
output error of the whole model is measured as for lossy splits (lossy.Lossy.error).
"""
from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType

import numpy as np
import onnx

from . import fitting
from .blas import limited
from .chains import Chain
from .config import SplitConfig
from .decisions import Kept, Planned, Unit
from .factorize import DEFAULT_BLOCKS, STRUCTURED, structured_refusal
from .factorize.sparse import layer_error
from .fit_pool import FitPool, Job, fit_any
from .lossy import Lossy, _calibration
from .planning import eligible
from .plans.block_factor import make_block_plan
from .plans.factorized import make_plan
from .pruned import Evaluator
from .refit import DAMPING
from .rewrite.compressed import MIN_OPSET, written_bytes
from .sites import Site, default_opset

log = logging.getLogger(__name__)

AGAINST = "the factorized original (each weight replaced by its factors' product)"
STRUCTURED_MIN_OPSET = 5
"""The block-factor forms' Reshape takes its shape as an input from opset 5 on."""


def structured(config: SplitConfig) -> bool:
    """True when ``--factorize`` names a structured method (two run-time MatMuls, not compressed)."""
    return config.factorize in STRUCTURED


def groups(config: SplitConfig) -> int:
    """The blocks of each factor: ``--blocks`` for ``blocks`` (4 unless told), 1 for ``lowrank``."""
    return (config.blocks or DEFAULT_BLOCKS) if config.factorize == "blocks" else 1


def factorize_reason(site: Site, opset: int, config: SplitConfig | None = None) -> str | None:
    """Why ``site`` is not factorized (None if it is); ``config`` adds what its method needs."""
    if not fitting.refittable(site):
        return "not factorized: calibration reaches main-graph sites only" if site.scope != "main" else \
            "not factorized: Gemm alpha is 0"
    if site.weight.dtype.kind != "f":
        return f"not factorized: the weight is {site.weight.dtype}"
    if config is not None and structured(config):
        if opset < STRUCTURED_MIN_OPSET:
            return f"not factorized: the block-factor forms need opset >= {STRUCTURED_MIN_OPSET} (this model has {opset})"
        why = structured_refusal(tuple(site.weight.shape), config.density, groups(config))
        return None if why is None else f"not factorized: {why}"
    if opset < MIN_OPSET:
        return f"not factorized: the compressed form needs opset >= {MIN_OPSET} (this model has {opset})"
    return None


def plan_factorized(model: onnx.ModelProto, sites: list[Site], config: SplitConfig, progress=None) -> Lossy:
    """One decision per site (a factorized plan, or kept with why) and one unit per planned site."""
    if config.tolerance is not None:  # a density per site, chosen within the tolerance
        from .factor_budget import plan_factorized_within

        return plan_factorized_within(model, sites, config, progress)
    progress = progress or (lambda stage, done, total: None)
    opset = default_opset(model)
    decisions, candidates = eligible(sites, config, lambda site: factorize_reason(site, opset, config))
    calibration = _calibration(model, config, required=True, wanted=True, purpose=f"--factorize {config.factorize}")
    evaluator = Evaluator(model, sites, candidates, config.base_threads,
                          capture=tuple(sites[i].activation for i in candidates))
    result = Lossy(decisions, calibration, evaluator)
    parts = {"search": calibration.batches("search"), "held_out": calibration.batches("held_out")}
    originals = {p: fitting.collect(evaluator, sites, candidates, b) for p, b in parts.items()}
    ups = fitting.upstream(model, sites, candidates)
    level = fitting.levels(candidates, ups)
    plans: dict[int, object] = {}
    facts = MappingProxyType({"factorize": config.factorize})
    done = 0
    progress("factorize", done, len(candidates))
    with FitPool(config.factorize, config.density, config.workers, config.fit_seconds,
                 threads=config.base_threads, groups=groups(config)) as pool:
        for lvl in sorted(set(level.values())):
            here = sorted(i for i in candidates if level[i] == lvl)
            weights = {j: plan.effective_weight(0, sites[j].weight) for j, plan in plans.items()}  # levels below
            news = {p: fitting.collect(evaluator, sites, here, b, weights=weights, original=True) if weights else {}
                    for p, b in parts.items()}
            jobs, found = [], {}
            for i in here:
                changed = weights and ups.get(i, set()) & plans.keys()  # X' = X unless a site before it was factorized
                found[i] = _moments(sites[i], originals, news if changed else None)
                if found[i]["search"] is None:
                    decisions[i] = Kept("plan", "not factorized: its activation was not captured")
                    done += 1
                    progress("factorize", done, len(candidates))
                    continue
                jobs.append(Job(i, sites[i].name, *_target(sites[i], found[i])))
            for outcome in pool.level(jobs):  # as the fits finish
                i = outcome.site
                if outcome.fitted is None:
                    decisions[i] = Kept("plan", outcome.reason)
                else:
                    plans[i] = dataclasses.replace(_fit(sites[i], found[i], config, outcome.fitted),
                                                   fit_seconds=outcome.fit_seconds,
                                                   estimated_seconds=outcome.estimated_seconds)
                    decisions[i] = Planned(plans[i], plans[i].label, facts)
                    log.info("factorized %s: %s, layer error %.4g (held out %s)", sites[i].name, plans[i].label,
                             plans[i].error, "-" if plans[i].held_out is None else f"{plans[i].held_out:.4g}")
                done += 1
                progress("factorize", done, len(candidates))
    result.units = [Unit((i,), Chain([sites[i]], []), plans[i], (decisions[i].reason,)) for i in sorted(plans)]
    return result


def _moments(site: Site, originals: dict, news: dict | None) -> dict:
    """Per part of the samples: (X'ᵀX', X'ᵀX, XᵀX) of ``site``'s activation without the bias row
    (``news`` None: nothing upstream was factorized, X' = X, given as (XᵀX, None, None)); None
    where nothing was captured."""
    key, k = fitting._key(site), site.weight.shape[0]
    found = {}
    for part, moments in originals.items():
        original = moments.get(key)
        pair = None if news is None else news[part].get(key)
        if original is None or original.k != k or not original.count or (news is not None and pair is None):
            found[part] = None
        elif news is None:
            found[part] = (original.sum[:-1, :-1], None, None)
        else:
            found[part] = (pair[0].sum[:-1, :-1], pair[1].sum[:-1, :-1], original.sum[:-1, :-1])
    return found


def _target(site: Site, moments: dict) -> tuple[np.ndarray, np.ndarray]:
    """(the weight the site's factors approximate, X'ᵀX' of the search samples): float64, what
    ``fit`` gets, here or in a worker of fit_pool."""
    weight = site.weight.astype(np.float64)
    gram, cross, original = moments["search"]
    target = weight
    if cross is not None:  # the weight that best gives XW from X'
        damped = gram + DAMPING * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(gram.shape[0])
        target = np.linalg.solve(damped, cross @ weight)
    return target, gram


def _fit(site: Site, moments: dict, config: SplitConfig, fitted=None):
    """The site's plan; ``fitted``: its factors, fitted by fit_pool on :func:`_target`'s problem
    (None: fitted here)."""
    weight = site.weight.astype(np.float64)
    if fitted is None:
        target, gram = _target(site, moments)
        with limited(config.base_threads):  # blas.py: the default threads wait on each other on shared cores
            fitted = fit_any(config.factorize, target, gram, config.density, groups(config))
    errors = [None if moments[p] is None else layer_error(weight, fitted.weight, *moments[p])
              for p in ("search", "held_out")]
    if structured(config):
        return make_block_plan(fitted, site.weight.dtype, *errors)
    plan = make_plan(fitted, site.weight.dtype, *errors)
    return plan.with_bytes(written_bytes(plan))


__all__ = ["AGAINST", "factorize_reason", "groups", "plan_factorized", "structured"]
