"""The report of one run: per-site decisions, verification and latency; JSON and text forms."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import onnxruntime as ort

from .bench import LatencyEntry
from .verify import VerificationEntry


@dataclass
class SiteReport:
    node: str
    op_type: str
    scope: str
    shape: list[int] | None  # [K, N] of the weight as used in x @ W
    dtype: str | None
    decision: str  # "split" | "kept"
    reason: str  # why kept, or a summary of the split
    parts: int = 0
    part_shapes: list[list[int]] = field(default_factory=list)
    components: int = 0
    unused_inputs: int = 0
    dead_outputs: int = 0
    flops_before: int = 0
    """2*K*N: FLOPs per row of the activation (batch 1) of the original node"""
    flops_after: int = 0
    """FLOPs per activation row of the layout actually written (padding included)"""
    layout: str | None = None
    chain: str | None = None
    """the chain of layers this site was split with (``a -> b -> c``), if more than itself"""
    partitioner: str | None = None
    """lossy runs: the partitioner, the significance score, and the fraction of it the parts keep"""
    score: str | None = None
    retained: float | None = None


@dataclass
class ErrorReport:
    """Lossy runs: the relative output error ||y' - y|| / ||y|| of the pruned model against the
    original, over all outputs, on the samples the budget search used and on held-out ones."""

    data: str
    search: float | None
    held_out: float | None
    search_samples: int
    held_out_samples: int
    tolerance: float | None = None
    met: bool | None = None
    """with --tolerance: whether the held-out error is within it"""
    evaluations: int = 0
    """model runs the tolerance search made"""


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
        for c in self.chains:
            what = (f"{len(c.sites)} layers split as {c.parts} independent sub-networks" if len(c.sites) > 1
                    else f"split into {c.parts} part{'s' if c.parts != 1 else ''}")
            lines.append(f"{' -> '.join(c.sites)}: {what}, {c.layout} layout, {c.boundary_gathers} Gather"
                         f"{'s' if c.boundary_gathers != 1 else ''} on activations")
        for t in self.tuning:
            lines.append(f"autotune {' -> '.join(t.chain)}: {t.reason}")
        if self.checker:
            lines.append("onnx checker (full): " + ("passed" if self.checker.get("passed") else
                                                    f"FAILED: {self.checker.get('error')}"))
            if "ort_loads" in self.checker:
                lines.append(f"loads in onnxruntime {ort.__version__}: {self.checker['ort_loads']}")
        if self.error is not None:
            lines.append(_error_line(self.error))
        if self.verification:
            against = " against the pruned original (dropped weights zeroed)" if self.error is not None else ""
            lines.append(f"verification{against} (" + "; ".join(self.inputs) + "):")
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
        return "\n".join(lines)


def _error_line(e: ErrorReport) -> str:
    figures = []
    if e.search is not None:
        figures.append(f"{e.search:.4g} on {e.search_samples} search samples")
    if e.held_out is not None:
        figures.append(f"{e.held_out:.4g} on {e.held_out_samples} held-out samples")
    line = "relative output error ||y'-y||/||y||: " + (", ".join(figures) or "not measured")
    if e.tolerance is not None:
        line += f"; --tolerance {e.tolerance:g} " + ("met on held-out data" if e.met else "NOT MET on held-out data")
    return line + f" ({e.data})"


def percent(fraction: float) -> str:
    """A fraction as a percentage with one decimal that never rounds a loss up to 100.0%."""
    text = f"{fraction:.1%}"
    if text == "100.0%" and fraction < 1:
        text = f"{fraction:.2%}" if f"{fraction:.2%}" != "100.00%" else ">99.99%"
    return text


def _short(provider: str) -> str:
    return provider.replace("ExecutionProvider", "")


def _sites_table(sites: list[SiteReport]) -> str:
    header = ("node", "op", "shape", "parts", "FLOPs/row before -> after", "decision")
    rows = []
    for s in sites:
        shape = "x".join(map(str, s.shape)) if s.shape else "-"
        flops = f"{s.flops_before:,} -> {s.flops_after:,}" if s.decision == "split" else (
            f"{s.flops_before:,}" if s.flops_before else "-")
        decision = f"split ({s.layout})" if s.decision == "split" else f"kept: {s.reason}"
        if s.decision == "split" and s.retained is not None:
            decision += f", keeps {percent(s.retained)} of {s.score} significance"
        node = s.node if s.scope == "main" else f"{s.scope}/{s.node}"
        rows.append((node, s.op_type, shape, str(s.parts or "-"), flops, decision))
    if not rows:
        return "no MatMul or Gemm nodes found"
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1]
                     for r in [header] + rows)


def _finite(value):
    """JSON has no inf/NaN: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
