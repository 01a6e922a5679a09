"""Regressions from a hostile user's trial of the CLI: destinations that are not regular files,
another model's data, the input's own data, and runs that verified nothing."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest

from builders import matmul_model, planted
from onnx_split.cli import main

QUICK = ["--min-elements", "0", "--layout", "parallel", "--no-bench"]


@pytest.fixture
def model(tmp_path):
    w, _ = planted(np.random.default_rng(0), 128, 128, 4)  # 32x32 parts: large enough for external data
    path = tmp_path / "mm.onnx"
    onnx.save(matmul_model(w, ["batch", 128]), str(path))
    return path


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("which", ["output", "report"])
def test_a_fifo_destination_is_refused_and_left_as_it_is(model, tmp_path, capsys, which):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    argv = [str(model), str(fifo if which == "output" else tmp_path / "o.onnx")] + QUICK
    if which == "report":
        argv += ["--report", str(fifo)]
    assert main(argv) == 2
    (line,) = _err(capsys)
    assert "not a regular file" in line
    assert fifo.is_fifo() and not (tmp_path / "o.onnx").exists()


def test_a_link_to_a_device_is_refused(model, tmp_path, capsys):
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    assert main([str(model), str(tmp_path / "o.onnx"), "--report", str(link)] + QUICK) == 2
    assert "not a regular file" in _err(capsys)[0]
    assert link.is_symlink() and os.path.realpath(link) == "/dev/null"


def test_a_run_never_removes_its_own_inputs_external_data(model, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main([str(model), str(out), "--external-data"] + QUICK) == 0
    prev = tmp_path / "prev.onnx"
    out.rename(prev)  # its data file keeps its out.onnx.<id>.data name
    data = [p for p in tmp_path.iterdir() if p.name.startswith("out.onnx.") and p.name.endswith(".data")]
    assert len(data) == 1
    digest = hashlib.sha256(data[0].read_bytes()).hexdigest()
    assert main([str(prev), str(out), "--external-data"] + QUICK) == 0
    assert data[0].exists() and hashlib.sha256(data[0].read_bytes()).hexdigest() == digest
    onnx.load(str(prev))  # the input still loads with its data


@pytest.mark.parametrize("which", ["output", "report"])
def test_another_models_data_file_is_never_overwritten(model, tmp_path, capsys, which):
    first = tmp_path / "o.onnx"
    assert main([str(model), str(first), "--external-data"] + QUICK) == 0
    (data,) = [p for p in tmp_path.iterdir() if p.name.startswith("o.onnx.") and p.name.endswith(".data")]
    before = data.read_bytes()
    capsys.readouterr()
    argv = [str(model), str(data if which == "output" else tmp_path / "z.onnx")] + QUICK
    if which == "report":
        argv += ["--report", str(data)]
    assert main(argv) == 2
    assert "external data file of a model onnx_split wrote" in _err(capsys)[0]
    assert data.read_bytes() == before
    onnx.load(str(first))


@pytest.mark.parametrize("argv, match", [(["--providers", ","], "--providers names no provider"),
                                         (["--batch", ","], "--batch wants whole numbers"),
                                         (["--seed", "-1"], "--seed must be >= 0"),
                                         (["--threads", "100000"], "--threads 100000 is more than")])
def test_options_that_would_verify_nothing_or_misbehave_are_bad_input(model, tmp_path, capsys, argv, match):
    out = tmp_path / "o.onnx"
    assert main([str(model), str(out)] + QUICK + argv) == 2
    (line,) = _err(capsys)
    assert match in line and "internal error" not in line
    assert not out.exists()


def test_a_forced_run_where_no_provider_ran_does_not_exit_0(model, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main([str(model), str(out), "--providers", "cuda", "--force"] + QUICK) == 1
    assert out.exists()  # --force writes anyway
    assert "NOT VERIFIED (no provider ran the models)" in capsys.readouterr().err


def test_a_signal_after_the_run_finished_does_not_change_its_exit_code(model, tmp_path):
    """Once the last line is printed the run is over: a SIGTERM during the interpreter's shutdown
    (ONNX Runtime's teardown takes a moment) leaves exit 0 and the written files."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnx_split", str(model), str(out)] + QUICK,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("wrote "):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.exists()
