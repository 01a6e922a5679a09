"""Pictures of a run as PNG bytes: per site |W| before and after its permutation into parts, the
latency per measuring point, and the error against FLOPs of the --tolerance search and of the dry
run.

matplotlib is an optional extra (``pip install -e '.[plots]'``): it is imported only when a
picture is drawn, and :func:`require` raises :class:`MissingPlotting` (one clear line) where it is
not installed. Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so no
global state or display is touched. Nothing before the report stage imports this module.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

from .errors import OnnxSplitError

INSTALL_HINT = "pip install -e '.[plots]' (or pip install matplotlib)"


class MissingPlotting(OnnxSplitError):
    """matplotlib, needed for pictures, is not installed."""


def require(what: str = "pictures") -> None:
    """Raise :class:`MissingPlotting` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as exc:
        raise MissingPlotting(f"{what} need matplotlib, an optional extra that is not installed "
                              f"({exc.name or 'matplotlib'}): {INSTALL_HINT}") from None


@dataclass(frozen=True)
class Picture:
    """One PNG: ``name`` is its file name under --plots, ``section`` where the HTML report shows it."""

    name: str
    section: str  # structure | latency | error
    title: str
    png: bytes


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "site"


# ---------------------------------------------------------------- |W| before and after

def heatmap_png(structure) -> bytes:
    """|W| in the original order and permuted into the parts, the parts' blocks outlined."""
    from matplotlib.patches import Rectangle

    s = structure
    fig = _figure(9.0, 4.6)
    axes = fig.subplots(1, 2)
    vmax = float(max(s.before.max(), s.after.max())) or 1.0
    k, n = s.shape
    pixel = f"; each pixel the max of {s.factor}x{s.factor} weights" if s.factor > 1 else ""
    for ax, data, title in ((axes[0], s.before, "original order"),
                            (axes[1], s.after, f"permuted into {len(s.blocks)} parts")):
        extent = (0, data.shape[1] * s.factor, data.shape[0] * s.factor, 0)  # axes in the weight's rows/columns
        image = ax.imshow(data, cmap="magma_r", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto",
                          extent=extent)
        ax.set_xlim(0, n)
        ax.set_ylim(k, 0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"outputs (N = {n})", fontsize=9)
        ax.set_ylabel(f"inputs (K = {k})", fontsize=9)
        ax.tick_params(labelsize=7)
    for r0, r1, c0, c1 in s.blocks:
        axes[1].add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, edgecolor="#00a0ff",
                                    linewidth=1.2))
    fig.colorbar(image, ax=list(axes), shrink=0.9, label="|w|")
    chain = f", layer {s.layer + 1} of {s.chain}" if s.chain else ""
    lossy = "; outside the blocks is dropped" if s.approximates else ""
    fig.suptitle(f"{s.label} [{k}x{n}]{chain}: {s.decision}"[:140] + f"\n|W|{pixel}{lossy}", fontsize=10)
    return _png(fig)


# ---------------------------------------------------------------- latency

def latency_groups(latency) -> list[tuple[str, list]]:
    """Measured entries grouped per measuring point (inputs and thread count), in order."""
    groups: dict[str, list] = {}
    for e in latency:
        if e.status != "measured" or e.original_ms is None or e.rewritten_ms is None:
            continue
        threads = f"{e.threads} thread{'s' if e.threads != 1 else ''}"
        key = f"{e.inputs}, {threads}" if e.inputs else threads
        groups.setdefault(key, []).append(e)
    return list(groups.items())


def latency_png(latency) -> bytes | None:
    """One bar chart per measuring point: original and rewritten median per provider, p90 as the
    error bar, the speedup above. None when nothing was measured."""
    groups = latency_groups(latency)
    if not groups:
        return None
    cols = min(len(groups), 3)
    rows = -(-len(groups) // cols)
    fig = _figure(3.6 * cols + 0.6, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax, (label, entries) in zip(axes, groups):
        x = range(len(entries))
        width = 0.38
        orig = [e.original_ms for e in entries]
        new = [e.rewritten_ms for e in entries]
        orig_err = [max(0.0, (e.original_p90_ms or e.original_ms) - e.original_ms) for e in entries]
        new_err = [max(0.0, (e.rewritten_p90_ms or e.rewritten_ms) - e.rewritten_ms) for e in entries]
        ax.bar([i - width / 2 for i in x], orig, width, yerr=[[0] * len(orig), orig_err], label="original",
               color="#9aa5b1", capsize=3)
        ax.bar([i + width / 2 for i in x], new, width, yerr=[[0] * len(new), new_err], label="rewritten",
               color="#1f77b4", capsize=3)
        for i, e in zip(x, entries):
            top = max(e.original_p90_ms or e.original_ms, e.rewritten_p90_ms or e.rewritten_ms)
            ax.text(i, top * 1.04, f"{e.speedup:.2f}x", ha="center", fontsize=9)
        ax.set_xticks(list(x), [e.provider.replace("ExecutionProvider", "") for e in entries], fontsize=8)
        ax.set_ylabel("median latency (ms)", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, max(max(o + oe, r + re_) for o, oe, r, re_ in zip(orig, orig_err, new, new_err)) * 1.22)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("latency (bars: median, whiskers: p90; label: speedup)", fontsize=10)
    return _png(fig)


# ---------------------------------------------------------------- error against FLOPs

def error_flops_png(search_trace=(), survey_rows=()) -> bytes | None:
    """The --tolerance search's points (error against the FLOPs fraction of all candidate sites: the
    allocation's estimated steps as a dashed curve, the measured confirmations, accepted ones joined) and, per site of a dry run, each level's error (or, without
    calibration data, the significance it loses) against its FLOPs fraction. None when there is
    nothing to draw."""
    trace = [p for p in search_trace if p.get("flops") is not None and p.get("error") is not None]
    curves = []
    for row in survey_rows:
        points = sorted((lv["flops"], lv["error"], lv["retained"]) for lv in row.levels)
        if points:
            curves.append((row.node if row.scope == "main" else f"{row.scope}/{row.node}", points))
    if not trace and not curves:
        return None
    with_error = bool(curves) and all(e is not None for _, pts in curves for _, e, _ in pts)
    panels = [p for p in ("trace" if trace else None, "survey" if curves else None) if p]
    fig = _figure(5.2 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        if panel == "trace":
            est = [p for p in trace if p.get("estimated")]
            ok = [p for p in trace if p.get("accepted") and not p.get("estimated")]
            no = [p for p in trace if not p.get("accepted") and not p.get("estimated")]
            if est:
                ax.plot([p["flops"] for p in est], [p["error"] for p in est], ".--", ms=4, color="#7f7f7f",
                        label="estimated (allocation steps)")
            ax.scatter([p["flops"] for p in no], [p["error"] for p in no], s=16, marker="x", color="#d62728",
                       label="rejected")
            ax.plot([p["flops"] for p in ok], [p["error"] for p in ok], "o-", ms=4, color="#2ca02c",
                    label="accepted")
            ax.set_title("--tolerance search", fontsize=10)
            ax.set_ylabel("relative output error (search samples)", fontsize=8)
            ax.set_xlabel("FLOPs, fraction of dense (all candidate sites)", fontsize=8)
        else:
            for label, pts in curves[:12]:
                ys = [e if with_error else 1.0 - (r if r is not None else 1.0) for _, e, r in pts]
                ax.plot([f for f, _, _ in pts], ys, "o-", ms=4, label=label[:30])
            ax.set_title("dry run: each site alone, per level", fontsize=10)
            ax.set_ylabel("estimated relative output error (calibration)" if with_error else
                          "significance lost (1 - retained)", fontsize=8)
            ax.set_xlabel("FLOPs, fraction of the site's dense FLOPs", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------- every picture of a run

MAX_SITE_PICTURES = 48
"""At most this many sites get a |W| picture (the largest weights); :func:`pictures` says how many
were left out."""


def chosen_structures(structures, limit: int = MAX_SITE_PICTURES) -> tuple[list, int]:
    """The structures that get a picture (the ``limit`` largest weights, in the run's order) and how
    many were left out."""
    structures = list(structures)
    if len(structures) <= limit:
        return structures, 0
    largest = sorted(range(len(structures)), key=lambda i: (-structures[i].shape[0] * structures[i].shape[1], i))
    keep = sorted(largest[:limit])
    return [structures[i] for i in keep], len(structures) - limit


def pictures(report=None, structures=(), survey_rows=()) -> list[Picture]:
    """Every picture of a run (report, structures) or of a dry run (survey rows), named uniquely;
    |W| pictures for at most MAX_SITE_PICTURES sites (see :func:`chosen_structures`)."""
    require()
    structures, _ = chosen_structures(structures)
    found: list[Picture] = []
    names: set[str] = set()

    def add(base: str, section: str, title: str, png: bytes | None) -> None:
        if png is None:
            return
        name, i = f"{base}.png", 1
        while name in names:
            name, i = f"{base}_{i}.png", i + 1
        names.add(name)
        found.append(Picture(name, section, title, png))

    for s in structures:
        add(f"weights_{safe_name(s.label)}", "structure", f"{s.label}: |W| before and after", heatmap_png(s))
    if report is not None:
        add("latency", "latency", "latency per measuring point", latency_png(report.latency))
    trace = list(getattr(report, "search_trace", None) or []) if report is not None else []
    add("error_vs_flops", "error", "output error against FLOPs", error_flops_png(trace, survey_rows))
    return found
