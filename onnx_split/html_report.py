"""The report of a run (or of a dry run) as one self-contained HTML page.

Everything is inline: the style, a few lines of script that sort the site table by any column, and
every picture as a ``data:image/png`` URI (plots.py draws them). The page asks the network for
nothing. Built once at the end, from the SplitReport and the pictures; nothing before the report
stage imports this module.
"""
from __future__ import annotations

import base64
import html

import onnxruntime as ort

from .text import chain_label, percent

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2733;background:#f6f7f9}
header{background:#1d2733;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:21px} header p{margin:2px 0;color:#c9d3dd}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;margin:16px 0;padding:12px 18px}
h2{font-size:17px;margin:4px 0 10px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #e6e9ee;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none} table.sortable th::after{content:" \\2195";color:#9aa5b1}
table.sortable th[data-dir=asc]::after{content:" \\2191";color:#1d2733}
table.sortable th[data-dir=desc]::after{content:" \\2193";color:#1d2733}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.compact{width:auto;min-width:360px;margin:6px 0}
.pair{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
.pass{color:#137333;font-weight:600} .fail{color:#b3261e;font-weight:600} .other{color:#8a5a00;font-weight:600}
.split{color:#137333} .kept{color:#5f6b7a}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:10px 16px;min-width:150px}
.card b{display:block;font-size:20px}
figure{margin:12px 0} figure img{max-width:100%;border:1px solid #e6e9ee}
figcaption{font-size:12px;color:#5f6b7a}
ul{margin:4px 0;padding-left:20px} code{background:#eef1f5;padding:0 3px;border-radius:3px}
"""

_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], col = th.cellIndex, asc = th.dataset.dir !== "asc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = asc ? "asc" : "desc";
      var key = function (row) {
        var cell = row.cells[col];
        return cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent.trim();
      };
      Array.from(body.rows).sort(function (a, b) {
        var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      }).forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _status_class(status: str) -> str:
    return {"passed": "pass", "failed": "fail"}.get(status, "other")


def _img(picture) -> str:
    data = base64.b64encode(picture.png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(picture.title)}">'
            f"<figcaption>{_e(picture.title)} (<code>{_e(picture.name)}</code> with --plots)</figcaption></figure>")


def _table(header: list[str], rows: list[list], sortable: bool = False, numeric: set[int] = frozenset(),
           compact: bool = False) -> str:
    """``rows`` of cells: a value, or (shown text, sort key) for a cell sorted by a number;
    ``compact``: as wide as its cells, not the page."""
    css = " ".join(c for c, on in (("sortable", sortable), ("compact", compact)) if on)
    out = [f'<table{f" class={css!r}" if css else ""}><thead><tr>'
           + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            css = ' class="num"' if i in numeric else ""
            if isinstance(cell, tuple):
                text, key, *extra = cell
                css = f' class="{extra[0]}"' if extra else css
                cells.append(f'<td{css} data-v="{_e(key)}">{_e(text)}</td>')
            else:
                cells.append(f"<td{css}>{_e(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _page(title: str, subtitle: list[str], sections: list[str]) -> str:
    head = "".join(f"<p>{_e(line)}</p>" for line in subtitle)
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
            f"<header><h1>{_e(title)}</h1>{head}</header><main>" + "".join(sections)
            + f"</main><script>{_SCRIPT}</script></body></html>\n")


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _site_name(s) -> str:
    """The name the text table shows: the exporter's module path when the node has one, else its name."""
    name = getattr(s, "module", None) or s.node
    return name if s.scope == "main" else f"{s.scope}/{name}"


# ---------------------------------------------------------------- a run

def run_html(report, pictures=(), left_out: int = 0) -> str:
    """The page of one run: summary, sites (sortable), chains, tuning, verification per provider and
    optimization level, latency, output error, the weights' pictures, notes."""
    pictures = list(pictures)
    by_section = {key: [p for p in pictures if p.section == key] for key in ("structure", "latency", "error")}
    split = [s for s in report.sites if s.decision == "split"]
    before = sum(s.flops_before for s in split)
    after = sum(s.flops_after for s in split)
    passed = report.verification_passed
    verdict = {True: "verified", False: "FAILED", None: "not verified"}[passed]
    measured = [e for e in report.latency if e.status == "measured" and e.speedup]
    subtitle = [f"{report.input or 'model'} -> {report.output or '(not written)'}",
                f"onnx_split {report.version}, onnxruntime {ort.__version__}; layout {report.config.get('layout')}"]
    if report.reverted:
        subtitle.append("the rewrite was not measured faster: the original model was written unchanged")
    elif not report.written and report.output:
        subtitle.append("nothing was written")
    cards = [("sites split", f"{report.n_split} of {len(report.sites)}"),
             ("FLOPs per row of split sites", f"{before:,} -> {after:,}" if split else "-"),
             ("verification", verdict)]
    if measured:
        cards.append(("speedup", ", ".join(f"{e.speedup:.2f}x" for e in measured[:4])
                      + (" ..." if len(measured) > 4 else "")))
    if report.error is not None and report.error.held_out is not None:
        cards.append(("output error (held out)", f"{report.error.held_out:.3g}"))
    sections = ['<div class="cards" style="margin-top:16px">' + "".join(
        f'<div class="card">{_e(label)}<b class="{_verdict_class(label, value)}">{_e(value)}</b></div>'
        for label, value in cards) + "</div>"]
    model = _model(report.model, report.stage_seconds)
    if model:
        sections.append(_section("model", "Model before -> after", model))
    sections.append(_section("sites", f"Sites ({len(report.sites)}; click a column to sort)", _sites(report.sites)))
    if report.chains:
        rows = [[chain_label(c.sites), len(c.sites), c.scope, c.parts, c.layout, c.boundary_gathers,
                 (f"{c.flops_before:,}", c.flops_before), (f"{c.flops_after:,}", c.flops_after),
                 (f"{c.flops_before / c.flops_after:.2f}x" if c.flops_after else "-",
                  c.flops_before / c.flops_after if c.flops_after else 0),
                 ", ".join(c.folded) or "-"] for c in report.chains]
        sections.append(_section("chains", "Chains (rewritten units)", _table(
            ["sites", "layers", "scope", "parts", "layout", "Gathers on activations", "FLOPs/row before",
             "after", "FLOP ratio", "folded into the dense layers next to it"], rows, sortable=True,
            numeric={1, 3, 5, 6, 7, 8})))
    if report.tuning:
        rows = [[chain_label(t.chain), t.choice, t.reason] for t in report.tuning]
        sections.append(_section("tuning", "Autotuning (--layout auto)", _table(["unit", "choice", "why"], rows)))
    sections.append(_section("verification", "Verification", _verification(report)))
    latency = _latency(report)
    if latency:
        sections.append(_section("latency", "Latency", latency + "".join(_img(p) for p in by_section["latency"])))
    if report.error is not None or by_section["error"]:
        sections.append(_section("error", "Output error (lossy)", _error(report) + "".join(
            _img(p) for p in by_section["error"])))
    if by_section["structure"]:
        more = (f"<p>{left_out} smaller sites have no picture (at most {len(by_section['structure'])} "
                f"are drawn, the largest weights).</p>" if left_out else "")
        sections.append(_section("structure", "Weights before and after", (
            "<p>|W| of each planned site in its original row/column order (left) and with rows and columns "
            "permuted into the plan's parts (right), each part's block outlined. Large weights are "
            "downsampled by block maximum, so no nonzero weight disappears.</p>" + more
            + "".join(_img(p) for p in by_section["structure"]))))
    if report.notes:
        sections.append(_section("notes", "Notes", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes)
                                 + "</ul>"))
    return _page("onnx_split report", subtitle, sections)


def _verdict_class(label: str, value: str) -> str:
    if label != "verification":
        return ""
    return {"verified": "pass", "FAILED": "fail"}.get(value, "other")


def _sites(sites) -> str:
    rows = []
    for i, s in enumerate(sites):
        shape = "x".join(map(str, s.shape)) if s.shape else "-"
        elements = s.shape[0] * s.shape[1] if s.shape and len(s.shape) == 2 else 0
        is_split = s.decision == "split"
        ratio = s.flops_before / s.flops_after if is_split and s.flops_after else None
        decision = f"split ({s.layout})" if is_split else "kept"
        rows.append([(i, i), _site_name(s), s.node if s.module else "", s.op_type, (shape, elements), s.dtype or "-", (s.parts or "-", s.parts),
                     (f"{s.flops_before:,}" if s.flops_before else "-", s.flops_before),
                     (f"{s.flops_after:,}" if is_split else "-", s.flops_after if is_split else 0),
                     (f"{ratio:.2f}x" if ratio else "-", ratio or 0),
                     (decision, decision, "split" if is_split else "kept"),
                     (percent(s.retained) if s.retained is not None else "-",
                      s.retained if s.retained is not None else -1),
                     s.chain or "", s.reason])
    if not rows:
        return "<p>no MatMul or Gemm nodes found</p>"
    if not any(s.module for s in sites):  # no exporter scopes: the node column is the ONNX name already
        for row in rows:
            del row[2]
        return _table(["#", "node", "op", "shape", "dtype", "parts", "FLOPs/row before", "after", "FLOP ratio",
                       "decision", "retained", "chain", "reason / plan"], rows, sortable=True,
                      numeric={0, 3, 5, 6, 7, 8, 10})
    return _table(["#", "node", "ONNX node", "op", "shape", "dtype", "parts", "FLOPs/row before", "after",
                   "FLOP ratio", "decision", "retained", "chain", "reason / plan"], rows, sortable=True,
                  numeric={0, 4, 6, 7, 8, 9, 11})


def _model(model: dict, stage_seconds: dict) -> str:
    """The before/after summary (parameters, bytes, FLOPs per row, nodes; op counts by type) and
    each stage's wall time."""
    from .report import size

    before, after = model.get("before"), model.get("after")
    parts = []
    if before and after:
        rows = [["parameters", f"{before['parameters']:,}", f"{after['parameters']:,}"],
                ["model bytes (serialized, external data included)", size(before["bytes"]), size(after["bytes"])],
                ["MatMul/Gemm FLOPs per row", f"{before['flops_per_row']:,}", f"{after['flops_per_row']:,}"],
                ["nodes", f"{before['nodes']:,}", f"{after['nodes']:,}"]]
        pair = [_table(["", "before", "after"], rows, numeric={1, 2}, compact=True)]
        ops = sorted(set(before["ops"]) | set(after["ops"]),
                     key=lambda op: (before["ops"].get(op, 0) == after["ops"].get(op, 0), op))
        counts = [[op, before["ops"].get(op, 0), after["ops"].get(op, 0),
                   (f"{after['ops'].get(op, 0) - before['ops'].get(op, 0):+,}",
                    after["ops"].get(op, 0) - before["ops"].get(op, 0))] for op in ops]
        pair.append(_table(["op", "before", "after", "change"], counts, numeric={1, 2, 3}, compact=True))
        parts.append('<div class="pair">' + "".join(pair) + "</div>")  # side by side where the page is wide
    if stage_seconds:
        total = sum(stage_seconds.values())
        parts.append("<p>wall time: " + _e(", ".join(f"{k} {v:.2f} s" for k, v in stage_seconds.items())
                                         + f" (total {total:.2f} s)") + "</p>")
    return "".join(parts)


def _verification(report) -> str:
    parts = []
    if report.checker:
        ok = report.checker.get("passed")
        parts.append(f'<p>onnx checker (full): <span class="{"pass" if ok else "fail"}">'
                     f'{"passed" if ok else "FAILED: " + _e(report.checker.get("error"))}</span>'
                     + (f"; loads in onnxruntime: {_e(report.checker['ort_loads'])}"
                        if "ort_loads" in report.checker else "") + "</p>")
    if not report.verification:
        return "".join(parts) + "<p>no verification ran</p>"
    against = f" against {report.verified_against}" if report.verified_against else ""
    parts.append(f"<p>inputs{_e(against)}: {_e('; '.join(report.inputs))}</p>")
    levels = sorted({v.optimization for v in report.verification}, key=lambda lv: (lv != "disabled", lv))
    providers = list(dict.fromkeys(v.provider for v in report.verification))
    grid = ["<table><thead><tr><th>provider</th>" + "".join(f"<th>graph optimizations {_e(lv)}</th>"
                                                            for lv in levels) + "</tr></thead><tbody>"]
    for provider in providers:
        cells = []
        for level in levels:
            entries = [v for v in report.verification if v.provider == provider and v.optimization == level]
            if not entries:
                cells.append("<td>-</td>")
                continue
            v = entries[0]
            worst = max(v.outputs, key=lambda o: o.max_rel, default=None)
            figures = (f"<br>max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g} "
                       f"(rtol {worst.rtol:g}, atol {worst.atol:g})" if worst else "")
            detail = f"<br>{_e(v.detail)}" if v.detail else ""
            cells.append(f'<td><span class="{_status_class(v.status)}">{_e(v.status.upper())}</span>'
                         f"{figures}{detail}</td>")
        grid.append(f"<tr><td>{_e(provider.replace('ExecutionProvider', ''))}</td>{''.join(cells)}</tr>")
    grid.append("</tbody></table>")
    parts.append("".join(grid))
    outputs = [[v.provider.replace("ExecutionProvider", ""), v.optimization, o.name,
                (f"{o.max_abs:.3g}", o.max_abs), (f"{o.max_rel:.3g}", o.max_rel), f"{o.rtol:g}", f"{o.atol:g}",
                ("PASS" if o.passed else "FAIL", int(o.passed), "pass" if o.passed else "fail")]
               for v in report.verification for o in v.outputs]
    if outputs:
        parts.append("<details><summary>per output</summary>" + _table(
            ["provider", "optimization", "output", "max abs", "max rel", "rtol", "atol", "result"], outputs,
            sortable=True, numeric={3, 4}) + "</details>")
    return "".join(parts)


def _latency(report) -> str:
    if not report.latency:
        return ""
    rows = []
    for e in report.latency:
        if e.status != "measured":
            rows.append([e.provider.replace("ExecutionProvider", ""), e.inputs, e.threads, "-", "-", "-", "-", "-",
                         f"{e.status}: {e.detail}"])
            continue
        rows.append([e.provider.replace("ExecutionProvider", ""), e.inputs, e.threads,
                     (f"{e.original_ms:.4f}", e.original_ms), (f"{e.rewritten_ms:.4f}", e.rewritten_ms),
                     (f"{e.speedup:.2f}x", e.speedup), (f"{e.original_p90_ms:.4f}", e.original_p90_ms),
                     (f"{e.rewritten_p90_ms:.4f}", e.rewritten_p90_ms), f"{e.runs} runs"])
    return ("<p>median over interleaved runs, ORT graph optimizations on</p>" + _table(
        ["provider", "inputs", "threads", "original ms", "rewritten ms", "speedup", "original p90", "rewritten p90",
         "runs"], rows, sortable=True, numeric={2, 3, 4, 5, 6, 7}))


def _error(report) -> str:
    e = report.error
    if e is None:
        return ""
    rows = []
    if e.search is not None:
        rows.append(["search (calibration; the refits were fitted on them)" if e.fitted else "search (calibration)",
                     e.search_samples, f"{e.search:.4g}"])
    if e.unseen is not None:
        rows.append(["search samples no refit was fitted on", e.unseen_samples, f"{e.unseen:.4g}"])
    if e.held_out is not None:
        rows.append(["held out", e.held_out_samples, f"{e.held_out:.4g}"])
    text = f"<p>relative output error ||y'-y||/||y|| ({_e(e.data)})"
    if e.tolerance is not None:
        met = "met on held-out data" if e.met else "NOT MET on held-out data"
        text += f'; --tolerance {e.tolerance:g} <span class="{"pass" if e.met else "fail"}">{met}</span>'
    return text + "</p>" + _table(["samples", "count", "error"], rows, numeric={1, 2})


# ---------------------------------------------------------------- a dry run

def survey_html(rows, source: str, partitioner: str, levels: list[tuple[int, str]], pictures=(),
                modules: dict[str, str] | None = None) -> str:
    """The page of a dry run: per site the retained significance, FLOPs and (with calibration data)
    the estimated output error of splitting it alone at each level (``levels``: the level and its
    column name), and the error-against-FLOPs picture; ``modules``: node name -> module path, shown
    instead of the node's name."""
    modules = modules or {}
    header = ["site", "shape", "significance"]
    for _, name in levels:
        header += [f"{name}: retained", "FLOPs", "est. error"]
    body, kept = [], []
    for row in rows:
        shown = modules.get(row.node) or row.node
        name = shown if row.scope == "main" else f"{row.scope}/{shown}"
        shape = "x".join(map(str, row.shape)) if row.shape else "-"
        if row.reason is not None:
            kept.append(f"{name}: {row.reason}")
            continue
        cells = [name, (shape, (row.shape[0] * row.shape[1]) if row.shape and len(row.shape) == 2 else 0),
                 row.score or "-"]
        found = {lv["level"]: lv for lv in row.levels}
        for level, _ in levels:
            lv = found.get(level)
            if lv is None:
                cells += [("-", -1), ("-", -1), ("-", -1)]
                continue
            cells += [(percent(lv["retained"]), lv["retained"]), (f"{lv['flops']:.1%}", lv["flops"]),
                      (f"{lv['error']:.3g}", lv["error"]) if lv.get("error") is not None else ("-", -1)]
        body.append(cells)
    sections = [_section("survey", "Candidate sites (click a column to sort)",
                         _table(header, body, sortable=True, numeric=set(range(3, len(header))) | {1})
                         if body else "<p>no candidate sites</p>")]
    pictures = list(pictures)
    if pictures:
        sections.append(_section("error", "Error against FLOPs", "".join(_img(p) for p in pictures)))
    if kept:
        sections.append(_section("kept", "Not candidates", "<ul>" + "".join(f"<li>{_e(k)}</li>" for k in kept)
                                 + "</ul>"))
    return _page("onnx_split dry run", [f"{source} ({partitioner} partitioner; nothing written)"], sections)
