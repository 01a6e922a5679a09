"""Lossless planning: each site's exact components, then chains of linked sites as units.

``plan_exact`` decides per site (Planned with an exact plan, or Kept with why); ``exact_units``
groups the planned sites into the units the rewrite writes. The lossy side (lossy.py) makes the
same two kinds of values, so the pipeline runs one sequence of steps for both.
"""
from __future__ import annotations

import logging
from types import MappingProxyType

from .chains import Chain, chains_from_links, find_links
from .config import SplitConfig
from .decisions import Decision, Kept, Planned, Unit
from .partition import ChainPlan, Plan, exact_components, joint_components
from .plans import exact_plan
from .rewrite import cost_form
from .sites import Site
from .where import left_out

log = logging.getLogger(__name__)

CHAIN_SLACK = 1.1
"""A link joins two layers when their joint partition costs at most this times splitting each alone."""
MAX_CHAIN = 64
"""A longer chain is cut every this many layers (its parts join there): the tuner times each chain
as one model, and ONNX Runtime's session building grows faster than linearly with a graph's
length (1,000 / 2,000 / 4,000 chained layers: 11 / 35 / 105 s for a whole run), so bounded chains
keep the pass linear in the number of layers."""


def site_decisions(sites: list[Site], config: SplitConfig | None = None) -> dict[int, Decision]:
    """The sites that are not candidates, kept with the reason sites.py gave, then those that
    ``--include``/``--exclude`` leave out, kept with the pattern (stage ``where``)."""
    decisions: dict[int, Decision] = {i: Kept("sites", s.reason) for i, s in enumerate(sites) if s.reason is not None}
    if config is not None and (config.include or config.exclude):
        for i, why in left_out(sites, config.include, config.exclude).items():
            decisions.setdefault(i, Kept("where", why))
    return decisions


def eligible(sites: list[Site], config: SplitConfig, reason) -> tuple[dict[int, Decision], list[int]]:
    """:func:`site_decisions`, then every other site that ``reason(site)`` (a plan kind's own
    refusal: a string, or None) refuses is kept with it; returns (decisions, candidate indices)."""
    decisions = site_decisions(sites, config)
    found = []
    for i, site in enumerate(sites):
        if i in decisions:
            continue
        why = reason(site)
        if why is None:
            found.append(i)
        else:
            decisions[i] = Kept("plan", why)
    return decisions, found


def plan_exact(sites: list[Site], config: SplitConfig, progress=None) -> dict[int, Decision]:
    """Exact components of every candidate site: a plan where splitting saves multiply-adds in the
    layout's form, else kept with why."""
    progress = progress or (lambda stage, done, total: None)
    decisions = site_decisions(sites, config)
    cache: dict[tuple, Plan] = {}
    form = cost_form(config.layout)
    for i, site in enumerate(sites):
        progress("analyse", i, len(sites))
        if i in decisions:
            continue
        key = (site.scope, site.weight_name, site.trans_b)  # one plan per stored weight and orientation
        if key not in cache:
            cache[key] = exact_components(site.weight, config.threshold, config.max_parts)
        plan = cache[key]
        facts = MappingProxyType({"components": plan.n_components, "unused_inputs": int(plan.unused_rows.size),
                                  "dead_outputs": int(plan.dead_cols.size)})
        candidate = exact_plan(ChainPlan.from_plan(plan))
        after = form.cost(candidate, None)
        if plan.n_components == 0:
            decisions[i] = Kept("plan", f"every weight is within --threshold {config.threshold}: the output does "
                                        f"not depend on the input", facts)
        elif after >= plan.k * plan.n:
            decisions[i] = Kept("plan", _no_saving(plan, after), facts)
        else:
            decisions[i] = Planned(candidate, f"{plan.n_components} components -> {len(plan.parts)} parts; "
                                              f"{plan.unused_rows.size} unused inputs, {plan.dead_cols.size} "
                                              f"outputs with no input", facts)
    progress("analyse", len(sites), len(sites))
    return decisions


def _no_saving(plan: Plan, after: int) -> str:
    if plan.n_components == 1 and not plan.unused_rows.size and not plan.dead_cols.size:
        return f"fully connected at --threshold {plan.threshold}: one component covers every input and output"
    return (f"no saving: {plan.n_components} components in {len(plan.parts)} parts would cost {after:,} "
            f"multiply-adds per row, dense costs {plan.k * plan.n:,}")


def exact_units(sites: list[Site], decisions: dict[int, Decision], config: SplitConfig) -> list[Unit]:
    """Group linked planned sites into chains whose joint partition costs at most ``CHAIN_SLACK``
    times splitting them one by one; a link whose layers do not line up is cut (the parts join there)."""
    planned = {i: d for i, d in decisions.items() if isinstance(d, Planned)}
    eligible = sorted(planned)
    links = find_links(sites, eligible) if config.chains else []
    after = {link.a: link for link in links}
    alone = {i: planned[i].plan.partition for i in eligible}
    units = []

    def unit(path: list[int], partition: ChainPlan) -> Unit:
        chain = Chain([sites[i] for i in path], [after[i] for i in path[:-1]])
        if len(path) == 1:
            return Unit((path[0],), chain, planned[path[0]].plan, (planned[path[0]].reason,))
        reasons = tuple(f"layer {layer + 1} of {len(path)} of one network split into {len(partition.parts)} "
                        f"({partition.n_components} joint components)" for layer in range(len(path)))
        return Unit(tuple(path), chain, exact_plan(partition), reasons)

    paths = [p[i:i + MAX_CHAIN] for p in chains_from_links(eligible, links) for i in range(0, len(p), MAX_CHAIN)]
    for path in paths:
        if len(path) > 2:  # the usual case, one joint partition for the whole path, costs one pass
            whole = joint_components([sites[i].weight for i in path], config.threshold, config.max_parts)
            if whole is not None and whole.macs_split <= CHAIN_SLACK * sum(alone[i].macs_split for i in path):
                units.append(unit(path, whole))
                continue
        segment, partition = [path[0]], alone[path[0]]
        for nxt in path[1:]:
            joint = joint_components([sites[i].weight for i in segment + [nxt]], config.threshold, config.max_parts)
            if joint is not None and joint.macs_split <= CHAIN_SLACK * (partition.macs_split + alone[nxt].macs_split):
                segment, partition = segment + [nxt], joint
                continue
            log.info("chain cut after %s: the joint partition would cost %s MACs per row", sites[segment[-1]].name,
                     "no valid" if joint is None else f"{joint.macs_split:,}")
            units.append(unit(segment, partition))
            segment, partition = [nxt], alone[nxt]
        units.append(unit(segment, partition))
    return units
