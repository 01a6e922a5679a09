"""Every command in README.md runs here, so the front door cannot drift from the code."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)]


def _quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_command():
    setup_and_run, setup_and_test = _quick_start()
    assert "\n" not in setup_and_run and "\n" not in setup_and_test
    assert "models/" in setup_and_run and "pytest" in setup_and_test
    assert setup_and_test in (REPO / ".ci" / "run").read_text().splitlines()


@pytest.mark.slow
def test_main_job_command_works_in_a_fresh_copy(tmp_path):
    """Quick start command 1, as a user runs it: a fresh tree, a new virtual environment."""
    fresh = tmp_path / "onnx_split"
    shutil.copytree(REPO, fresh, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", "*.split.onnx", "*.report.json"))
    command = _quick_start()[0]
    proc = subprocess.run(command, shell=True, cwd=fresh, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "split (" in proc.stdout and "PASSED" in proc.stdout
    outputs = [w for w in command.split() if w.endswith(".split.onnx")]
    assert outputs and (fresh / outputs[0]).is_file()


def test_other_bash_commands(tmp_path):
    """The README's other commands; long ones get a small grid and a temporary output."""
    quick = set(_quick_start())
    others = [c for c in _blocks("bash") if c not in quick]
    assert others, "the README lists tool commands"
    for command in others:
        for line in command.splitlines():
            if "tools/bench_split.py" in line:
                line += f" --quick --out {tmp_path / 'bench.md'}"
            elif "tools/bench_chains.py" in line:
                line += f" --quick --skip-pass-time --out {tmp_path / 'bench.md'}"
            elif "tools/bench_significance.py" in line:
                line += f" --quick --out {tmp_path / 'significance.md'}"
            elif "tools/bench_lossy.py" in line:
                line += f" --quick --out {tmp_path / 'lossy.md'}"
            elif "tools/bench_partitioners.py" in line:
                line += f" --quick --out {tmp_path / 'partitioners.md'}"
            elif "tools/bench_dynamic.py" in line:
                line += " --quick"
            elif "tools/make_example_models.py" in line:
                line += f" --out {tmp_path / 'models'}"
            if "--html" in line:  # the outputs go to the temporary folder
                line = line.replace(" mlp_blocks.", f" {tmp_path}/mlp_blocks.")
                # the install step would repoint the running environment at this tree: here it is
                # only checked to name the extra that pyproject.toml defines (the run needs it installed)
                install = ".venv/bin/pip install -q -e '.[plots]' && "
                assert line.startswith(install) and "plots = [" in (REPO / "pyproject.toml").read_text()
                line = line[len(install):]
            line = line.replace(".venv/bin/python", sys.executable)
            proc = subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    # the example model is reproducible: the generator writes the shipped bytes
    assert (tmp_path / "models" / "mlp_blocks.onnx").read_bytes() == (REPO / "models" / "mlp_blocks.onnx").read_bytes()


def test_python_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").symlink_to(REPO / "models")
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
