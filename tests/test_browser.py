"""In a real browser: a rewritten model of each layout in Netron, and the --html report.

Needs Debian's chromium, playwright's Python package and netron (tools/setup_browser.sh); every
test here is skipped, with that reason, where they are missing (CI has no browser)."""
import sys
from pathlib import Path

import onnx
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import browser  # noqa: E402

WHY = browser.missing()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"browser stack not installed: {WHY}")

from onnx_split.cli import main  # noqa: E402

MODEL = REPO / "models" / "mlp_blocks.onnx"


@pytest.fixture(scope="module")
def chromium():
    with browser.browser() as b:
        yield b


def _split(tmp_path, layout: str, *extra: str) -> Path:
    out = tmp_path / f"{layout}.onnx"
    code = main([str(MODEL), str(out), "--input-shape", "input:32,512", "--layout", layout, "--no-bench", "--quiet",
                 *extra])
    assert code == 0
    return out


@pytest.mark.parametrize("layout", ["parallel", "batched", "function"])
def test_netron_shows_the_new_nodes_with_their_names_and_doc_strings(tmp_path, chromium, layout):
    out = _split(tmp_path, layout)
    model = onnx.load(str(out))
    new = [n for n in model.graph.node if "/split/" in n.name]
    assert new
    with browser.netron_page(chromium, out) as page:
        shown = browser.graph_nodes(page)
        assert set(shown) == {n.name for n in model.graph.node}  # every node, under its own name
        sample = [n for n in new if n.op_type in ("MatMul", "Gather")][:1] + new[-1:]
        for node in sample:  # the sidebar: op type, name and the doc string (Netron's "description")
            text = browser.node_properties(page, node.name)
            assert node.name in text and node.op_type in text
            assert node.doc_string and node.doc_string in text
            assert node.doc_string.startswith("onnx_split ")
    if layout == "function":
        units = [n for n in model.graph.node if n.domain == "onnx_split"]
        assert len(units) == len(model.functions) == 1  # mlp_blocks: one chain fc1 -> fc2
        assert {n.name for n in new} == {n.name for n in units}  # one node per site or chain, nothing else new
        assert [n for n in shown if "/split/" in n] == [units[0].name]


def test_the_html_report_renders_every_image_loads_no_console_errors(tmp_path, chromium):
    page_path = tmp_path / "report.html"
    out = tmp_path / "m.onnx"
    code = main([str(MODEL), str(out), "--input-shape", "input:32,512", "--html", str(page_path),
                 "--bench-seconds", "0.2", "--tune-seconds", "2", "--quiet"])
    assert code == 0
    seen = browser.html_page_check(chromium, page_path)
    assert seen["errors"] == []
    assert seen["blocked"] == []  # the page asked for nothing beyond itself
    assert len(seen["images"]) >= 3  # two weights and the latency
    assert all(complete and width > 0 and height > 0 for complete, width, height in seen["images"])
    names = {n.name for n in onnx.load(str(MODEL)).graph.node if n.op_type in ("MatMul", "Gemm")}
    assert set(seen["before"]) == names
    assert seen["ascending"] == sorted(seen["before"]) and seen["descending"] == sorted(seen["before"], reverse=True)
