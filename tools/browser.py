"""Drive a real browser over onnx_split's outputs: a rewritten model in Netron, the --html report.

Uses Debian's chromium (/usr/bin/chromium) through playwright's Python package, and the netron pip
package to serve its UI; tools/setup_browser.sh installs all three. tests/test_browser.py uses
these functions (and skips, with the reason, where the stack is missing); run this file to
regenerate the screenshots in docs/img/:

    python tools/browser.py --screenshots docs/img

Nothing leaves the machine: every request that is not to the local Netron server or a file is
aborted (Netron's telemetry included), and Netron's cookie banner is answered in advance.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = os.environ.get("ONNX_SPLIT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]


def missing() -> str | None:
    """Why the browser stack cannot run here, or None."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (tools/setup_browser.sh installs it)"
    for module in ("playwright", "netron"):
        try:
            __import__(module)
        except ImportError:
            return f"the {module} Python package is not installed (tools/setup_browser.sh installs it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def browser():
    """A headless chromium (playwright Browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _local_only(context, allowed: str) -> list[str]:
    """Abort every request that does not start with ``allowed``; returns the list of aborted URLs."""
    blocked: list[str] = []

    def route(r):
        if r.request.url.startswith(allowed):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    return blocked


@contextlib.contextmanager
def netron_page(b, model_path: str | Path, viewport=(1400, 900)):
    """A page showing ``model_path`` in Netron, its graph drawn. Netron overrides window.eval, which
    playwright's selectors need: an init script keeps the browser's own."""
    import netron

    port = _free_port()
    netron.start(str(model_path), address=("127.0.0.1", port), browse=False)
    url = f"http://127.0.0.1:{port}/"
    context = b.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    try:
        context.add_cookies([{"name": "consent", "value": str(int(time.time() * 1000)), "url": url}])
        context.add_init_script("(() => { const own = window.eval; Object.defineProperty(window, 'eval', "
                                "{ get() { return own; }, set(v) {}, configurable: false }); })();")
        _local_only(context, url)
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#canvas .graph-node", timeout=60000)
        yield page
    finally:
        context.close()
        netron.stop(("127.0.0.1", port))


def graph_nodes(page) -> list[str]:
    """The names of the nodes Netron drew (their ids are ``node-name-<name>``)."""
    loc = page.locator("#canvas .graph-node")
    ids = [loc.nth(i).get_attribute("id") or "" for i in range(loc.count())]
    return [i[len("node-name-"):] for i in ids if i.startswith("node-name-")]


def node_properties(page, name: str) -> str:
    """Click node ``name`` in the graph; the sidebar's text (type, name, description = doc_string)."""
    page.locator(f'#canvas [id="node-name-{name}"] .node-item-type').first.click()
    page.wait_for_selector("#sidebar", timeout=10000)
    page.wait_for_function("document.querySelector('#sidebar') && "
                           f"document.querySelector('#sidebar').innerText.includes({name!r})", timeout=10000)
    return page.locator("#sidebar").inner_text()


def html_page_check(b, html_path: str | Path, screenshot: str | Path | None = None) -> dict:
    """Open an --html report: its console errors and page errors, every image's natural size, the
    site table's first column before and after a click on its "node" header, and the URLs it tried
    to fetch (all aborted)."""
    context = b.new_context(viewport={"width": 1280, "height": 900})
    try:
        blocked = _local_only(context, "file://")
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(Path(html_path).resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        table = "table.sortable"
        column = page.evaluate(f"Array.from(document.querySelector('{table}').tHead.rows[0].cells)"
                               f".map(c => c.textContent.trim())")
        node = column.index("node")
        read = (f"Array.from(document.querySelector('{table}').tBodies[0].rows).map(r => r.cells[{node}].textContent)")
        before = page.evaluate(read)
        if screenshot is not None:
            page.screenshot(path=str(screenshot))
        page.locator(f"{table} th").nth(node).click()
        ascending = page.evaluate(read)
        page.locator(f"{table} th").nth(node).click()
        descending = page.evaluate(read)
        return {"errors": errors, "images": images, "before": before, "ascending": ascending,
                "descending": descending, "blocked": blocked}
    finally:
        context.close()


def _split(model: Path, out: Path, layout: str, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "onnx_split", str(model), str(out), "--input-shape", "input:32,512",
                    "--layout", layout, "--no-bench", "--quiet", *extra], check=True, cwd=REPO)


def screenshots(folder: Path) -> list[Path]:
    """docs/img's pictures: the example model's rewrite in Netron (function and parallel layouts), and
    the top of its --html report."""
    folder.mkdir(parents=True, exist_ok=True)
    shots = []
    with tempfile.TemporaryDirectory() as tmp, browser() as b:
        tmp = Path(tmp)
        for layout in ("function", "parallel"):
            out = tmp / f"{layout}.onnx"
            _split(REPO / "models" / "mlp_blocks.onnx", out, layout)
            with netron_page(b, out, viewport=(1300, 640)) as page:
                names = graph_nodes(page)
                first = next(n for n in names if n.endswith(("/function", "/MatMul")))
                node_properties(page, first)
                shot = folder / f"netron_{layout}.png"
                page.screenshot(path=str(shot))
                shots.append(shot)
        report = tmp / "report.html"
        (tmp / "models").symlink_to(REPO / "models")  # the page names the paths as the README's command does
        subprocess.run([sys.executable, "-m", "onnx_split", "models/mlp_blocks.onnx", "mlp_blocks.split.onnx",
                        "--input-shape", "input:32,512", "--html", "report.html", "--quiet"],
                       check=True, cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO)})
        shot = folder / "report.png"
        html_page_check(b, report, screenshot=shot)
        shots.append(shot)
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screenshots", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    why = missing()
    if why:
        print(f"browser.py: {why}", file=sys.stderr)
        return 2
    for shot in screenshots(args.screenshots):
        print(f"wrote {shot} ({shot.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
