"""The report of one run, built once at the end from the stages' decisions: per-site decisions,
chains, verification and latency; JSON, text and model-metadata forms; the dry run's table.

Data flows one way: this module reads the earlier stages' types, no earlier stage reads it."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import onnxruntime as ort

from .version import __version__
from .bench import LatencyEntry
from .decisions import Split, Unit
from .plans import PLANNERS
from .plans.base import LEVELS
from .pruned import ErrorReport
from .rewrite import FORMS
from .sites import module_path
from .stats import ModelStats
from .text import chain_label, columns, percent, plural
from .verify import VerificationEntry
from .where import LEFT_OUT


@dataclass
class SiteReport:
    node: str
    op_type: str
    scope: str
    shape: list[int] | None  # [K, N] of the weight as used in x @ W
    dtype: str | None
    decision: str  # "split" | "kept"
    reason: str  # why kept, or a summary of the split
    module: str | None = None
    """the node's readable scope: the innermost module path the PyTorch exporter recorded in its
    ``pkg.torch.onnx.name_scopes`` metadata (``encoder.layer.0.attention.self.query``), else None"""
    candidate: bool = True
    """False for a site onnx_split cannot split at all (no constant right operand, an unsupported
    weight, ...): kept by the first step, with ``reason``"""
    parts: int | None = None
    """parts of the split written (or, for a split undone, that would have been written); None if none"""
    part_shapes: list[list[int]] = field(default_factory=list)
    components: int | None = None
    """connected components of the weight at --threshold (lossless runs); None where they were not
    computed (lossy runs, non-candidates)"""
    unused_inputs: int | None = None
    """inputs no output uses, and outputs no input feeds (lossless runs); None where not computed"""
    dead_outputs: int | None = None
    flops_before: int | None = None
    """2*K*N: FLOPs per row of the activation (batch 1) of the original node; None when the weight's
    shape is unknown"""
    flops_after: int | None = None
    """FLOPs per activation row of what the written model computes for this site: the layout written
    (padding included) for a split site, ``flops_before`` for a kept one (it still computes densely)"""
    layout: str | None = None
    chain: str | None = None
    """the chain of layers this site was split with (``a -> b -> c``), if more than itself"""
    partitioner: str | None = None
    """lossy runs: the partitioner, the significance score, and the fraction of it the parts keep"""
    score: str | None = None
    retained: float | None = None
    details: dict = field(default_factory=dict)
    """what a plan kind reports beyond the fields above (its ``summary``); ``flops_if_split`` for a
    split the whole-model check undid"""


@dataclass
class ChainReport:
    """One rewrite: a site, or a chain of sites split as one set of sub-networks."""

    sites: list[str]
    scope: str
    parts: int
    layout: str
    boundary_gathers: int
    """Gather nodes on activations, all at the chain's ends (inside a chain, permutations are folded
    into the weights)"""
    flops_before: int
    flops_after: int
    label: str | None = None
    """what a plan without parts writes, in its words (factorized plans: method, density, factors)"""
    folded: list[str] = field(default_factory=list)
    """its end permutations folded into the dense layers next to it ("input order into '/fc1/Gemm'")"""


@dataclass
class SplitReport:
    version: str
    config: dict
    sites: list[SiteReport] = field(default_factory=list)
    chains: list[ChainReport] = field(default_factory=list)
    tuning: list = field(default_factory=list)
    """``--layout auto``: per chain, every candidate's measured time and the choice (tune.TuneResult)"""
    checker: dict = field(default_factory=dict)
    verification: list[VerificationEntry] = field(default_factory=list)
    latency: list[LatencyEntry] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    input: str | None = None
    output: str | None = None
    written: bool = False
    reverted: bool = False
    """``--layout auto`` measured the rewrite slower than the margin and the original was written"""
    error: ErrorReport | None = None
    verified_against: str | None = None
    """what the rewritten model was compared with: "the original", or for a lossy split "the pruned
    original (dropped weights zeroed)"; None when nothing was verified"""
    model: dict = field(default_factory=dict)
    """``before`` and ``after`` (the model written: the original when ``reverted``): op counts by
    type, nodes, parameters, weight and model bytes (stats.ModelStats), and ``flops_per_row``, the
    FLOPs per activation row of the MatMul/Gemm sites with a known weight shape"""
    stage_seconds: dict = field(default_factory=dict)
    """wall time of each stage of the run: load, analyse, tune, rewrite, error, verify, bench (the
    CLI adds write: in the JSON report, writing the model up to the report itself, which cannot
    time its own writing; the text's ``time:`` line also counts the report, --html and --plots)"""
    search_trace: list = field(default_factory=list)
    """``--tolerance``: the search's points, in order, each {"flops": fraction of the dense FLOPs of
    all candidate sites, "error", "accepted", "sites"}: first the allocation's steps
    ("estimated": true, "error" the estimate, "accepted" null), then every whole-model confirmation
    ("error" measured on the search samples, "accepted" whether it was within the tolerance)"""

    @property
    def n_split(self) -> int:
        return sum(s.decision == "split" for s in self.sites)

    @property
    def modified(self) -> bool:
        return self.n_split > 0

    @property
    def verification_passed(self) -> bool | None:
        """True if every run comparison passed (at least one ran), False if any failed,
        None if nothing was verified."""
        if self.checker.get("passed") is False:
            return False
        if self.error is not None and self.error.met is False:
            return False
        ran = [v for v in self.verification if v.passed is not None]
        if not ran:
            return None
        return all(v.passed for v in ran)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for site in data["sites"]:
            if not site["details"]:
                del site["details"]  # only plan kinds with fields of their own have any
        data["modified"] = self.modified
        data["verification_passed"] = self.verification_passed
        return _finite(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = [_sites_table(self.sites), ""]
        split_before = sum(s.flops_before for s in self.sites if s.decision == "split")
        split_after = sum(s.flops_after for s in self.sites if s.decision == "split")
        lines.append(f"{self.n_split} of {len(self.sites)} MatMul/Gemm sites split"
                     + (f"; their FLOPs per row {split_before:,} -> {split_after:,}" if self.n_split else ""))
        lines += _model_lines(self.model)
        names = {s.node: _display(s) for s in self.sites}
        where = _where_line(self.config, self.sites)
        if where:
            lines.append(where)
        chains = []
        for c in self.chains:
            what = (f"{len(c.sites)} layers split as {c.parts} independent sub-networks" if len(c.sites) > 1
                    else f"split into {c.parts} part{'s' if c.parts != 1 else ''}" if c.parts is not None
                    else c.label if c.label else "dynamic: skips input blocks per call")
            folded = f" (folded: {', '.join(c.folded)})" if c.folded else ""
            chains.append(f"{chain_label([names.get(n, n) for n in c.sites])}: {what}, {c.layout} layout, {c.boundary_gathers} Gather"
                          f"{'s' if c.boundary_gathers != 1 else ''} on activations{folded}")
        lines += _capped(chains, "rewrite")
        lines += _capped([f"autotune {chain_label([names.get(n, n) for n in t.chain])}: {t.reason}"
                          for t in self.tuning], "tuned unit",
                         [t.choice for t in self.tuning])
        if self.checker:
            lines.append("onnx checker (full): " + ("passed" if self.checker.get("passed") else
                                                    f"FAILED: {self.checker.get('error')}"))
            if "ort_loads" in self.checker:
                lines.append(f"loads in onnxruntime {ort.__version__}: {self.checker['ort_loads']}")
        if self.error is not None:
            lines.append(_error_line(self.error))
        if self.verification:
            against = f" against {self.verified_against}" if self.verified_against else ""
            lines.append(f"verification{against}:")
            lines += [f"  inputs: {what}" for what in self.inputs]  # one line each: none is cut short
            for v in self.verification:
                worst = max(v.outputs, key=lambda o: o.max_rel, default=None)
                err = (f"max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g} (rtol {worst.rtol:g}, "
                       f"atol {worst.atol:g})") if worst else ""
                lines.append(f"  {_short(v.provider):<15} opt {v.optimization:<8} {v.status.upper():<11} "
                             f"{err}{'  ' + v.detail if v.detail else ''}")
        if self.latency:
            lines.append("latency (median over interleaved runs, ORT graph optimizations on):")
            for e in self.latency:
                if e.status != "measured":
                    lines.append(f"  {_short(e.provider):<15} {e.status}: {e.detail}")
                else:
                    lines.append(f"  {_short(e.provider):<15} {e.inputs + ': ' if len(self.latency) > 1 else ''}"
                                 f"original {e.original_ms:.4f} ms, rewritten "
                                 f"{e.rewritten_ms:.4f} ms, speedup {e.speedup:.2f}x  "
                                 f"(p90 {e.original_p90_ms:.4f} / {e.rewritten_p90_ms:.4f} ms, {e.runs} runs, "
                                 f"{e.threads} thread{'s' if e.threads > 1 else ''})")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.stage_seconds:
            total = sum(self.stage_seconds.values())
            lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.stage_seconds.items())
                         + f" (total {total:.2f} s)")
        return "\n".join(clip(line) for line in "\n".join(lines).split("\n"))


LINE_WIDTH = 200
"""No line of the text report is longer (the JSON report has every word)."""


def clip(line: str, width: int = LINE_WIDTH) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def size(n: int) -> str:
    """Bytes as B, kB, MB or GB (powers of 1000, as file managers show them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _model_lines(model: dict) -> list[str]:
    """The before -> after summary: parameters, bytes, FLOPs per row, then the op counts that changed."""
    before, after = model.get("before"), model.get("after")
    if not before or not after:
        return []
    lines = [f"model: parameters {before['parameters']:,} -> {after['parameters']:,}, size {size(before['bytes'])} -> "
             f"{size(after['bytes'])}, MatMul/Gemm FLOPs per row {before['flops_per_row']:,} -> "
             f"{after['flops_per_row']:,}, nodes {before['nodes']:,} -> {after['nodes']:,}"]
    ops = sorted(set(before["ops"]) | set(after["ops"]))
    changed = [(op, before["ops"].get(op, 0), after["ops"].get(op, 0)) for op in ops]
    changed = sorted([c for c in changed if c[1] != c[2]], key=lambda c: (-abs(c[2] - c[1]), c[0]))
    if changed:
        cells = [f"{op} {a:,} -> {b:,}" for op, a, b in changed]
        line, shown = "ops changed: ", 0
        for cell in cells:
            if len(line) + len(cell) + 40 > LINE_WIDTH and shown:
                break
            line += ("" if not shown else ", ") + cell
            shown += 1
        if shown < len(cells):
            line += f", and {plural(len(cells) - shown, 'more op type')} (in the JSON report)"
        lines.append(line)
    return lines


def _where_line(config: dict, sites: list[SiteReport]) -> str | None:
    """The --include/--exclude patterns of the run and how many sites they left out, if any were given."""
    given = [f"--{option} {p!r}" for option in ("include", "exclude") for p in config.get(option) or ()]
    if not given:
        return None
    out = sum(s.reason.startswith(LEFT_OUT) for s in sites if s.decision == "kept")
    return f"sites chosen by {' '.join(given)}: {plural(out, 'site')} left out (kept, each with its pattern)"


def _error_line(e: ErrorReport) -> str:
    figures = []
    if e.search is not None:
        figures.append(f"{e.search:.4g} on {e.search_samples} search samples"
                       + (f" ({e.unseen:.4g} on the {e.unseen_samples} of them no refit was fitted on)"
                          if e.unseen is not None else " (the refits were fitted on them)" if e.fitted else ""))
    if e.held_out is not None:
        figures.append(f"{e.held_out:.4g} on {e.held_out_samples} held-out samples")
    line = "relative output error ||y'-y||/||y||: " + (", ".join(figures) or "not measured")
    if e.tolerance is not None:
        line += f"; --tolerance {e.tolerance:g} " + ("met on held-out data" if e.met else "NOT MET on held-out data")
    return line + f"\n  data: {e.data}"  # its own line: a long file name or note is not cut short


def _short(provider: str) -> str:
    return provider.replace("ExecutionProvider", "")


LIST_LINES = 20
"""Chain and autotune lines shown in the text; the JSON report has all."""


def _capped(lines: list[str], what: str, kinds: list[str] | None = None) -> list[str]:
    """At most LIST_LINES of ``lines``, then one line counting the rest (by ``kinds``, if given)."""
    if len(lines) <= LIST_LINES:
        return lines
    rest = len(lines) - LIST_LINES
    counts = ""
    if kinds is not None:
        tally: dict[str, int] = {}
        for kind in kinds[LIST_LINES:]:
            tally[kind] = tally.get(kind, 0) + 1
        counts = " (" + ", ".join(f"{n:,} {k}" for k, n in sorted(tally.items(), key=lambda kv: -kv[1])) + ")"
    return lines[:LIST_LINES] + [f"... and {plural(rest, 'more ' + what)}{counts}: all are in the JSON report"]


TABLE_ROWS = 60
"""The text table shows at most this many candidate sites (split ones first); the JSON report has all."""
NAME_WIDTH = 48
"""A node column entry longer than this is shortened from the left (its end is the specific part)."""


def _display(s: SiteReport) -> str:
    """The site as the table names it: its module path when the exporter recorded one, else the
    node's name; under its subgraph's scope; at most NAME_WIDTH characters."""
    name = s.module or s.node
    if s.scope != "main":
        name = f"{s.scope}/{name}"
    return name if len(name) <= NAME_WIDTH else "..." + name[-(NAME_WIDTH - 3):]


def _sites_table(sites: list[SiteReport]) -> str:
    if not sites:
        return "no MatMul or Gemm nodes found"
    header = ("node", "op", "shape", "parts", "FLOPs/row before -> after", "decision")
    candidates = [i for i, s in enumerate(sites) if s.candidate]
    grouped: list[SiteReport] = []
    if len(candidates) > GROUP_ABOVE:  # a long table: kept sites that share a reason take one line per reason
        shared: dict[str, int] = {}
        for i in candidates:
            if sites[i].decision == "kept":
                shared[sites[i].reason] = shared.get(sites[i].reason, 0) + 1
        grouped = [sites[i] for i in candidates if sites[i].decision == "kept" and shared[sites[i].reason] > 1]
        candidates = [i for i in candidates if not (sites[i].decision == "kept" and shared[sites[i].reason] > 1)]
    keep = set(candidates)
    if len(candidates) > TABLE_ROWS:
        keep = set(sorted(keep, key=lambda i: (sites[i].decision != "split", i))[:TABLE_ROWS])
    rows = []
    for i in sorted(keep):
        s = sites[i]
        shape = "x".join(map(str, s.shape)) if s.shape else "-"
        flops = f"{s.flops_before:,} -> {s.flops_after:,}" if s.decision == "split" else (
            f"{s.flops_before:,}" if s.flops_before else "-")
        decision = f"split ({s.layout})" if s.decision == "split" else f"kept: {s.reason}"
        if s.decision == "split" and s.retained is not None:
            decision += f", keeps {percent(s.retained)} of {s.score} significance"
        rows.append((_display(s), s.op_type, shape, str(s.parts or "-"), flops, decision))
    lines = columns([header] + rows, width=LINE_WIDTH) if rows else []
    if len(keep) < len(candidates):
        rest = [sites[i] for i in candidates if i not in keep]
        split = sum(s.decision == "split" for s in rest)
        lines.append(f"... and {plural(len(rest), 'more site')} ({split:,} split, {len(rest) - split:,} kept): "
                     f"every site is in the JSON report (--report)")
    lines += _by_reason(grouped, "kept candidates, one line per reason:")
    lines += _by_reason([s for s in sites if not s.candidate], "not candidates (kept as they are):")
    return "\n".join(lines)


GROUP_ABOVE = 24
"""A table of more candidate sites than this lists the kept ones that share a reason under it,
one line per reason (a BERT's dense projections: one line, not one row each)."""


def _by_reason(sites: list[SiteReport], title: str) -> list[str]:
    """One line per reason: the sites, counted, with as many names as fit in LINE_WIDTH."""
    if not sites:
        return []
    groups: dict[str, list[SiteReport]] = {}
    for s in sites:
        groups.setdefault(s.reason, []).append(s)
    lines = [title]
    for reason, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        if len(members) == 1:
            lines.append(f"  {_display(members[0])} ({members[0].op_type}): kept: {reason}")
            continue
        ops = sorted({m.op_type for m in members})
        head = f"  {len(members):,} {'/'.join(ops)} sites: kept: {reason}"
        where = list(dict.fromkeys(_display(m) for m in members))  # two attention MatMuls share a module
        lines.append(head + _names_within(where, LINE_WIDTH - len(head)))
    return lines


def _names_within(names: list[str], room: int) -> str:
    """`` (a, b, ... N more)`` with as many of ``names`` as fit in ``room`` characters ("" if none fits)."""
    best, used = "", 2  # the parentheses
    for shown, name in enumerate(names, 1):
        used += len(name) + (2 if shown > 1 else 0)
        more = f", ... {len(names) - shown:,} more" if shown < len(names) else ""
        if used + len(more) + 1 > room:  # the leading space
            break
        best = f" ({', '.join(names[:shown])}{more})"
    return best


def _finite(value):
    """JSON has no inf/NaN: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------- built once, from the decisions

@dataclass(frozen=True)
class Written:
    """A unit the rewrite wrote: in which form and layout, with how many Gathers on activations."""

    form: str
    layout: str
    gathers: int
    stored_bytes: int = 0
    """bytes of the new tensors it wrote"""
    shared_bytes: int = 0
    """bytes of new tensors it reads from an earlier unit instead (equal values: one weight, one plan)"""
    folded: tuple[str, ...] = ()
    """its end permutations folded into a dense neighbour ("input order into '/fc1/Gemm'")"""


def site_report(site, decision, units: list[Unit]) -> SiteReport:
    """One site's row from its last decision."""
    rep = SiteReport(node=site.name, op_type=site.op_type, scope=site.scope,
                     shape=list(site.shape) if site.shape else None,
                     dtype=str(site.weight_dtype) if site.weight_dtype is not None else None,
                     decision="kept", reason=decision.reason, module=module_path(site.node),
                     candidate=site.reason is None)
    if site.shape is not None and len(site.shape) == 2:
        rep.flops_before = rep.flops_after = 2 * site.shape[0] * site.shape[1]
    for key, value in decision.facts.items():
        setattr(rep, key, value)
    split = decision if isinstance(decision, Split) else getattr(decision, "undone", None)
    if split is not None:
        unit = units[split.unit]
        for key, value in unit.plan.summary(split.layer).items():
            if key in _FIELDS:
                setattr(rep, key, value)
            else:
                rep.details[key] = value
        flops = 2 * FORMS[split.form].cost(unit.plan, split.layer)
        if len(unit.sites) > 1:
            rep.chain = unit.chain.name
        if split is decision:
            rep.decision, rep.layout, rep.flops_after = "split", split.layout, flops
        else:  # undone: what it was stays visible, but nothing of it was written
            rep.retained = None
            rep.details["flops_if_split"] = flops
    return rep


_FIELDS = {f.name for f in dataclasses.fields(SiteReport)}


def chain_report(unit: Unit, written: Written) -> ChainReport:
    chain, plan = unit.chain, unit.plan
    return ChainReport(sites=[s.name for s in chain.sites], scope=chain.first.scope, parts=plan.summary(0)["parts"],
                       layout=written.layout, boundary_gathers=written.gathers, flops_before=2 * plan.macs_dense(),
                       flops_after=2 * FORMS[written.form].cost(plan, None),
                       label=plan.label if plan.kind in ("factorized", "block-factor") else None,
                       folded=list(written.folded))


def build_report(*, config: dict, source: str | None, sites: list, decisions: dict, units: list[Unit],
                 written: dict[int, Written], before: ModelStats | None = None, after: ModelStats | None = None,
                 search_trace=(), **fields) -> SplitReport:
    """The report of a run from every site's last decision and the written units; ``before`` and
    ``after`` describe the input and the model written; ``search_trace`` the --tolerance search's
    confirmations; ``fields`` are the remaining SplitReport fields (tuning, checker, verification,
    latency, inputs, notes, error, reverted, verified_against, stage_seconds)."""
    report = SplitReport(version=__version__, config=config, input=source, **fields)
    report.search_trace = [dict(point) for point in search_trace]
    report.sites = [site_report(site, decisions[i], units) for i, site in enumerate(sites)]
    report.chains = [chain_report(units[u], w) for u, w in sorted(written.items())]
    if before is not None and after is not None:
        known = [s for s in report.sites if s.flops_before is not None]
        report.model = {
            "before": {**dataclasses.asdict(before), "flops_per_row": sum(s.flops_before for s in known)},
            "after": {**dataclasses.asdict(after), "flops_per_row": sum(s.flops_after for s in known)},
        }
    return report


FACTORIZE_HOW = {
    None: "each weight replaced by the product of sparse factors, stored compressed and multiplied out at load",
    "blocks": "each weight replaced by B1 * P * B2, B1 and B2 block-diagonal with {blocks} blocks and P the stride "
              "permutation, computed as two MatMuls",
    "lowrank": "each weight replaced by U * V of lower rank, computed as two MatMuls",
}
"""What ``--factorize METHOD`` wrote, for the model metadata (None: the sparse, compressed methods)."""


def metadata_entries(config, n_split: int, n_sites: int, error: ErrorReport | None) -> dict[str, str]:
    """The ``onnx_split.*`` metadata of the written model (Netron shows it)."""
    entries = {
        "onnx_split.version": __version__,
        "onnx_split.options": config.to_json(),
        "onnx_split.summary": f"{n_split} of {n_sites} MatMul/Gemm sites split ({config.layout} layout)",
    }
    if config.factorize is not None:
        how = FACTORIZE_HOW.get(config.factorize, FACTORIZE_HOW[None]).format(blocks=config.blocks or 4)
        entries["onnx_split.factorize"] = (
            f"--factorize {config.factorize} "
            + (f"--density {config.density:g}" if config.density is not None else
               f"--tolerance {config.tolerance:g} (a density per site)")
            + f": {how}; "
            + (f"relative output error {error.search:.3g} on {error.search_samples} search samples, "
               f"{error.held_out:.3g} on {error.held_out_samples} held-out samples ({error.data})"
               if error is not None else "output error not measured"))
    if config.lossy:
        entries["onnx_split.lossy"] = (
            f"{config.budget}, {config.partitioner} partitioner: weights outside the parts' blocks are dropped; "
            + (f"relative output error {error.search:.3g} on {error.search_samples} search samples, "
               f"{error.held_out:.3g} on {error.held_out_samples} held-out samples ({error.data})"
               if error is not None else "output error not measured"))
    return entries


def survey_table(rows: list, partitioner: str, tile: int = 64, layout: str = "auto",
                 modules: dict[str, str] | None = None) -> str:
    """The dry run as a table: per candidate site, "retained / FLOPs share" at each level (the
    planner names the columns); then the sites that are not candidates, one line per reason.
    ``modules`` maps node names to the exporter's module paths (:func:`node_modules`), shown instead."""
    if not rows:
        return "no MatMul or Gemm nodes found"
    modules = modules or {}
    levels = list(LEVELS)
    header = ("site", "shape", "significance", *(PLANNERS[partitioner].level_name(level) for level in levels))
    table, kept = [], []
    for row in rows:
        name = modules.get(row.node) or row.node
        name = name if row.scope == "main" else f"{row.scope}/{name}"
        name = name if len(name) <= NAME_WIDTH else "..." + name[-(NAME_WIDTH - 3):]
        shape = "x".join(map(str, row.shape)) if row.shape else "-"
        if row.reason is not None:
            kept.append((name, shape, row.reason))
            continue
        cells = {lv["level"]: f"{percent(lv['retained'])} / {lv['flops']:.1%}"
                 + (f" / {lv['error']:.3g}" if lv.get("error") is not None else "") for lv in row.levels}
        table.append((name, shape, row.score or "-", *(cells.get(level, "-") for level in levels)))
    what = f"{tile}x{tile} tiles, the most significant kept" if partitioner == "tiles" else f"{partitioner} parts"
    counted = "as the batched layout computes them, padding included" if layout == "batched" else "the parts' blocks"
    measured = any(lv.get("error") is not None for row in rows for lv in row.levels)
    cell = "retained significance / share of the dense FLOPs" + (
        " / estimated relative output error of splitting this site alone (calibration search samples)" if measured else "")
    lines = [f"each cell: {cell}; {what}, FLOPs of {counted}"]
    lines += columns([header] + table, pad_last=True) if table else ["no site can be split"]
    if kept:
        lines.append("not candidates:")
        groups: dict[str, list[tuple[str, str]]] = {}
        for name, shape, reason in kept:
            groups.setdefault(reason, []).append((name, shape))
        for reason, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            if len(members) == 1:
                lines.append(f"  {members[0][0]}  {members[0][1]}  kept: {reason}")
                continue
            head = f"  {plural(len(members), 'site')}: kept: {reason}"
            names = list(dict.fromkeys(name if shape == "-" else f"{name} {shape}" for name, shape in members))
            lines.append(head + _names_within(names, LINE_WIDTH - len(head)))
    return "\n".join(clip(line) for line in lines)


def node_modules(model) -> dict[str, str]:
    """Node name -> the module path its ``pkg.torch.onnx.name_scopes`` metadata records, over every
    graph (a name two nodes with different paths share is left out)."""
    from .sites import walk_graphs

    found: dict[str, str | None] = {}
    for _, graph in walk_graphs(model.graph):
        for node in graph.node:
            path = module_path(node)
            if path is not None:
                found[node.name] = path if found.get(node.name, path) == path else None
    return {name: path for name, path in found.items() if path}


__all__ = ["ChainReport", "ErrorReport", "SiteReport", "SplitReport", "Written", "build_report", "chain_report",
           "metadata_entries", "node_modules", "percent", "site_report", "survey_table"]
