"""--html and --plots: the pictures' data (structure.py), the PNGs (plots.py) and the HTML page
(html_report.py), checked offline: parsed, every image decoded, nothing fetched from the network."""
import base64
import json
import struct
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import chain_model, chained_blocks, feature_wise, matmul_model, planted
from onnx_split import SplitConfig, split_model, survey_model
from onnx_split.cli import main
from onnx_split.structure import MAX_PIXELS, block_max, layer_structure, permutation

pytest.importorskip("matplotlib", reason="matplotlib (the plots extra, part of the test extra) is not installed")

from onnx_split import plots  # noqa: E402
from onnx_split.html_report import run_html  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class Page(HTMLParser):
    """What the tests look at in a page: tables' cells, images, links, scripts."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.urls, self.ids = [], [], [], set()
        self._cell = None
        self._script = False
        self.scripts = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href", "action", "poster"):
            if key in a:
                self.urls.append(a[key])
        if tag == "table":
            self.tables.append({"class": a.get("class"), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag == "script":
            self._script = True
            self.scripts.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "script":
            self._script = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def assert_self_contained(page: Page) -> list[bytes]:
    """No URL leaves the page; every image is an inline PNG that decodes. Returns the PNGs."""
    assert all(not s.get("src") for s in page.scripts), "scripts are inline"
    for url in page.urls:
        assert not url.lower().startswith(("http:", "https:", "//", "file:")), url
    pngs = []
    for img in page.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        width, height = png_size(data)
        assert width > 100 and height > 100
        pngs.append(data)
    return pngs


# ---------------------------------------------------------------- structure.py: the pictures' data

def test_block_max_keeps_every_nonzero_visible():
    rng = np.random.default_rng(0)
    w = np.zeros((1000, 600), dtype=np.float32)
    spots = rng.integers(0, [1000, 600], size=(25, 2))
    w[spots[:, 0], spots[:, 1]] = rng.uniform(0.5, 1.0, size=25)
    factor = -(-1000 // MAX_PIXELS)
    small = block_max(w, factor)
    assert max(small.shape) <= MAX_PIXELS
    assert small.max() == w.max()
    for r, c in spots:  # the pixel holding each spot is at least that spot's value
        assert small[r // factor, c // factor] >= w[r, c]
    assert np.count_nonzero(small) == len({(r // factor, c // factor) for r, c in spots})


def test_permutation_places_every_index_once_parts_first():
    order = permutation([np.array([5, 1]), np.array([1, 3]), np.array([0])], 7)
    assert sorted(order.tolist()) == list(range(7))
    assert order.tolist()[:4] == [5, 1, 3, 0]  # index 1 stays with the first part that has it


def test_after_picture_is_block_diagonal_with_the_plans_blocks():
    """A planted weight under hidden permutations: in the permuted picture, every nonzero lies in
    one of the outlined blocks, and the blocks tile the diagonal."""
    w, blocks = planted(np.random.default_rng(1), 96, 72, 4)
    model = matmul_model(w, ["batch", 96])
    result = split_model(model, SplitConfig(min_elements=0, layout="parallel", verify=False, bench=False),
                         structures=True)
    (s,) = result.structures
    assert s.node == "fc1" and s.shape == (96, 72) and s.factor == 1 and s.decision.startswith("split")
    assert len(s.blocks) == 4
    inside = np.zeros(s.after.shape, dtype=bool)
    for r0, r1, c0, c1 in s.blocks:
        inside[r0:r1, c0:c1] = True
    assert np.count_nonzero(s.after[~inside]) == 0
    assert np.count_nonzero(s.after) == np.count_nonzero(w)
    assert sorted(np.abs(w).ravel().tolist()) == sorted(s.before.ravel().tolist())
    # the blocks line up along the diagonal: each starts where the one before ended
    ordered = sorted(s.blocks)
    assert ordered[0][:1] == (0,) and ordered[0][2] == 0
    for a, b in zip(ordered, ordered[1:]):
        assert b[0] == a[1] and b[2] == a[3]
    assert {(r1 - r0, c1 - c0) for r0, r1, c0, c1 in s.blocks} == {(len(r), len(c)) for r, c in blocks}


def test_a_chain_has_one_structure_per_layer_and_large_weights_are_downsampled():
    rng = np.random.default_rng(2)
    weights = chained_blocks(rng, [640, 320, 64], 4)
    model = chain_model(weights, [[feature_wise("Relu", rng)]], ["batch", 640])
    result = split_model(model, SplitConfig(layout="batched", verify=False, bench=False), structures=True)
    assert [s.layer for s in result.structures] == [0, 1]
    assert all(s.chain for s in result.structures)
    first = result.structures[0]
    assert first.shape == (640, 320) and first.factor == 3 and max(first.before.shape) <= MAX_PIXELS
    assert split_model(model, SplitConfig(layout="batched", verify=False, bench=False)).structures == []


def test_layer_structure_of_a_lossy_plan_keeps_what_it_drops_visible():
    w = np.ones((8, 8), dtype=np.float32)
    before, after, blocks, factor = layer_structure(w, [np.arange(4), np.arange(4, 8)],
                                                    [np.arange(4), np.arange(4, 8)])
    assert blocks == ((0, 4, 0, 4), (4, 8, 4, 8)) and factor == 1
    assert after.min() == 1.0  # off-block weights are drawn (the plan drops them; the picture shows that)


# ---------------------------------------------------------------- the CLI end to end

@pytest.fixture
def two_site_model(tmp_path):
    rng = np.random.default_rng(3)
    weights = chained_blocks(rng, [64, 48, 32], 4)
    path = tmp_path / "in.onnx"
    onnx.save_model(chain_model(weights, [[feature_wise("Relu", rng)]], ["batch", 64]), str(path))
    return path


def test_html_and_plots_of_a_run(tmp_path, two_site_model, capsys):
    out, page_path, folder = tmp_path / "out.onnx", tmp_path / "report.html", tmp_path / "pictures"
    code = main([str(two_site_model), str(out), "--min-elements", "0", "--input-shape", "x:4,64",
                 "--bench-seconds", "0.1", "--tune-seconds", "1", "--layout", "parallel",
                 "--html", str(page_path), "--plots", str(folder), "--report", str(tmp_path / "r.json")])
    stdout = capsys.readouterr().out
    assert code == 0
    files = [line for line in stdout.splitlines() if line.startswith("wrote ")]
    assert files[0].startswith(f"wrote {tmp_path / 'r.json'}, {page_path}"), files  # the report and the page
    assert len(files) == 2 and files[-1] == stdout.strip().splitlines()[-1] and files[-1].startswith(f"wrote {out}")
    text = page_path.read_text()
    page = parse(text)
    pngs = assert_self_contained(page)
    sortable = [t for t in page.tables if t["class"] == "sortable"]
    sites = sortable[0]["rows"]
    header, body = sites[0], sites[1:]
    node = header.index("node")
    model = onnx.load(str(two_site_model))
    assert sorted(r[node] for r in body) == sorted(n.name for n in model.graph.node if n.op_type == "MatMul")
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r[node]: r[header.index("decision")] for r in body} == {
        s["node"]: f"split ({s['layout']})" for s in data["sites"]}
    assert all(s["decision"] == "split" for s in data["sites"])
    assert {"sites", "chains", "verification", "latency", "structure"} <= page.ids
    assert "PASSED" in text and "graph optimizations disabled" in text and "graph optimizations enabled" in text
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["latency.png", "weights_fc0.png", "weights_fc1.png"]
    assert sorted(pngs) == sorted((folder / f).read_bytes() for f in files)  # the page shows the same pictures


def test_html_of_a_dry_run(tmp_path, capsys):
    page_path = tmp_path / "dry.html"
    code = main([str(REPO / "models" / "digits_block.onnx"), "--dry-run", "--calibration",
                 str(REPO / "models" / "digits_calibration.npz"), "--html", str(page_path)])
    assert code == 0, capsys.readouterr().err
    page = parse(page_path.read_text())
    (png,) = assert_self_contained(page)
    rows = survey_model(str(REPO / "models" / "digits_block.onnx"),
                        SplitConfig(calibration=str(REPO / "models" / "digits_calibration.npz")))
    table = page.tables[0]["rows"]
    assert sorted(r[0] for r in table[1:]) == sorted(r.node for r in rows if r.reason is None)
    assert len(table[0]) == 3 + 3 * 4  # site, shape, score; retained, FLOPs, error at each of the 4 levels


def test_the_search_trace_is_drawn_when_there_is_one():
    """The --tolerance search's confirmations (flops, error, accepted) as the pipeline records them."""
    config = SplitConfig(tolerance=0.05, calibration=str(REPO / "models" / "digits_calibration.npz"),
                         layout="batched", bench=False)
    result = split_model(str(REPO / "models" / "digits_block.onnx"), config, structures=True)
    report = result.report
    assert report.error is not None and report.search_trace
    for point in report.search_trace:
        assert 0 <= point["flops"] <= 1 and (point["error"] <= 0.05 or not point["accepted"])
    estimated = [p for p in report.search_trace if p.get("estimated")]
    measured = [p for p in report.search_trace if not p.get("estimated")]
    assert estimated and measured  # the allocation's curve, then its confirmations
    assert [p["flops"] for p in estimated] == sorted((p["flops"] for p in estimated), reverse=True)
    pictures = plots.pictures(report, result.structures)
    (error_picture,) = [p for p in pictures if p.section == "error"]
    png_size(error_picture.png)
    page = parse(run_html(report, pictures))
    assert "error" in page.ids and len(assert_self_contained(page)) == len(pictures)
    assert report.to_dict()["search_trace"] == report.search_trace
    report.search_trace = []
    assert not [p for p in plots.pictures(report, result.structures) if p.section == "error"]


# ---------------------------------------------------------------- without matplotlib, and bad paths

def test_without_matplotlib_one_clear_line_and_nothing_written(tmp_path, two_site_model, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "out.onnx"
    code = main([str(two_site_model), str(out), "--html", str(tmp_path / "r.html"), "--no-bench"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--html" in err and "matplotlib" in err and "pip install -e '.[plots]'" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    code = main([str(two_site_model), "--dry-run", "--plots", str(tmp_path / "p")])
    assert code == 2 and "--plots" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["input", "file-as-plots", "no-parent"])
def test_bad_page_destinations_are_refused_before_any_work(tmp_path, two_site_model, capsys, bad):
    out = tmp_path / "out.onnx"
    extra = {"input": ["--html", str(two_site_model)],
             "file-as-plots": ["--plots", str(two_site_model)],
             "no-parent": ["--html", str(tmp_path / "missing" / "r.html")]}[bad]
    before = two_site_model.read_bytes()
    code = main([str(two_site_model), str(out), "--no-bench", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and two_site_model.read_bytes() == before


def test_the_page_names_sites_by_module_says_against_what_and_summarises_the_model():
    """A dynamo-style encoder: the node column shows the module path (the ONNX name beside it); the
    model section has the report's before/after figures and op counts; a lossy split's page says
    which reference it was verified against (the report's own words)."""
    from builders import encoder_model
    from onnx_split.report import size

    model = encoder_model(np.random.default_rng(0), layers=1, hidden=64, ffn=128)
    report = split_model(model, SplitConfig(layout="batched", min_elements=0, bench=False)).report
    page = parse(run_html(report))
    sites = [t for t in page.tables if t["class"] == "sortable"][0]["rows"]
    header, body = sites[0], sites[1:]
    assert [r[header.index("node")] for r in body] == [s.module or s.node for s in report.sites]
    assert [r[header.index("ONNX node")] for r in body] == [s.node for s in report.sites]
    assert "model" in page.ids
    (summary,) = [t["rows"] for t in page.tables if t["rows"] and t["rows"][0] == ["", "before", "after"]]
    before, after = report.model["before"], report.model["after"]
    assert ["parameters", f"{before['parameters']:,}", f"{after['parameters']:,}"] in summary
    assert ["nodes", f"{before['nodes']:,}", f"{after['nodes']:,}"] in summary
    assert [r[1:] for r in summary if r[0].startswith("model bytes")] == [[size(before["bytes"]), size(after["bytes"])]]
    (ops,) = [t["rows"] for t in page.tables if t["rows"] and t["rows"][0] == ["op", "before", "after", "change"]]
    assert {r[0]: (int(r[1]), int(r[2])) for r in ops[1:]} == {
        op: (before["ops"].get(op, 0), after["ops"].get(op, 0)) for op in set(before["ops"]) | set(after["ops"])}

    w, _ = planted(np.random.default_rng(4), 64, 64, 4)
    w = w + 0.05 * np.random.default_rng(5).standard_normal(w.shape).astype(np.float32)
    lossy = split_model(matmul_model(w, ["batch", 64]), SplitConfig(parts=4, min_elements=0, layout="batched",
                                                                     bench=False)).report
    from onnx_split.pipeline import PRUNED, REFITTED
    assert lossy.verified_against in (PRUNED, REFITTED)
    for reference, other in ((PRUNED, REFITTED), (REFITTED, PRUNED)):  # whichever the pipeline chose
        lossy.verified_against = reference
        text = run_html(lossy)
        assert f"against {reference}:" in text and other not in text
