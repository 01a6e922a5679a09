"""What every benchmark tool records: the run's metadata, and its own section of a Markdown file.

Each tool owns one section of docs/BENCHMARKS.md, between ``<!-- <name>:start -->`` and
``<!-- <name>:end -->``; rewriting one tool's section keeps the others.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx_split  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_meta(argv: list[str] | None, **extra) -> dict:
    python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else sys.executable
    return dict(command=shlex.join([python] + (sys.argv if argv is None else [sys.argv[0], *argv])),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=platform.machine(), processor=platform.processor(), cpu_model=cpu_model(),
                cpu_count=os.cpu_count(), python=platform.python_version(), onnx=onnx.__version__,
                onnxruntime=ort.__version__, onnx_split=onnx_split.__version__, **extra)


def meta_lines(meta: dict) -> list[str]:
    return [f"- Command: `{meta['command']}`", f"- Date: {meta['date']}",
            f"- Machine: {meta['machine']} ({meta['processor'] or 'processor n/a'}), CPU: {meta['cpu_model']}, "
            f"{meta['cpu_count']} logical CPUs",
            f"- Python {meta['python']}, onnx {meta['onnx']}, onnxruntime {meta['onnxruntime']}, "
            f"onnx_split {meta['onnx_split']}"]


def parse_with_presets(parser, argv, full: dict, quick: dict):
    """Parse ``argv``, then set the sizes of ``full`` (or, with ``--quick``, of ``quick``) as attributes."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        setattr(args, key, value)
    return args


def write_section(path: Path, name: str, lines: list[str]) -> None:
    """Replace (or append) the section ``name`` of ``path`` with ``lines``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = "\n".join([start, *lines, end])
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
