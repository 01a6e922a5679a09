"""Writes are all or nothing: distinct paths, the model and its data as one pair, interrupts, leftovers."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import matmul_model, ort_run, planted
from onnx_split import cli, save_model
from onnx_split.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA = re.compile(r"o\.onnx\.[0-9a-f]{12}\.data")
TMP_PREFIX = ".onnx_split-tmp-"  # the documented temporary-name pattern


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def src(tmp_path):
    w, _ = planted(np.random.default_rng(0), 128, 96, 4)  # parts of 3 KB: written to the data file
    path = tmp_path / "in.onnx"
    onnx.save_model(matmul_model(w, [2, 128]), str(path))
    return path


FAST = ["--min-elements", "0", "--no-bench", "--layout", "parallel", "--providers", "cpu"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(tmp_path, capsys, argv, match, monkeypatch):
    """Exit 2 with one line, before any work (the library is never called), nothing written."""
    listing = {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    monkeypatch.setattr(cli, "split_held", lambda *a, **k: pytest.fail("the work started"))
    code, _, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("onnx_split: error:"), err
    assert match in lines[0] and "internal error" not in lines[0]
    assert {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()} == listing
    return lines[0]


# 1. every path the run writes is distinct from the others and from every input

def test_report_on_the_output_data_file_name_is_refused(tmp_path, capsys, monkeypatch, src):
    out = tmp_path / "o.onnx"
    _refused(tmp_path, capsys, [src, out, "--external-data", "--report", tmp_path / "o.onnx.data", *FAST],
             "name for the output model's external data", monkeypatch)
    _refused(tmp_path, capsys, [src, out, "--external-data", "--report", tmp_path / "o.onnx.0123456789ab.data",
                                *FAST], "name for the output model's external data", monkeypatch)


def test_report_on_the_data_file_of_the_existing_output_is_refused(tmp_path, capsys, monkeypatch, src):
    out = tmp_path / "o.onnx"
    assert _run(capsys, src, out, "--external-data", *FAST)[0] == 0
    (data,) = [p for p in tmp_path.iterdir() if DATA.fullmatch(p.name)]
    _refused(tmp_path, capsys, [src, out, "--report", data, *FAST], "name for the output model's external data",
             monkeypatch)
    other = tmp_path / "weights.bin"  # an existing output whose data file has any name
    model = onnx.load(str(out))
    onnx.save_model(model, str(out), save_as_external_data=True, location=other.name, size_threshold=0)
    _refused(tmp_path, capsys, [src, out, "--report", other, *FAST], "external data of the existing", monkeypatch)


@pytest.mark.parametrize("which", ["output", "report"])
def test_outputs_never_land_on_an_inputs_npz(tmp_path, capsys, monkeypatch, src, which):
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.ones((2, 128), np.float32))
    out, report = (npz, tmp_path / "r.json") if which == "output" else (tmp_path / "o.onnx", npz)
    _refused(tmp_path, capsys, [src, out, "--inputs", npz, "--report", report, *FAST], "overwrite the input",
             monkeypatch)


# 2. the model and its external data are published as one pair

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnx_split import save_model

    out, wid, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])
    for r in range(rounds):
        stamp = float(wid * 1000 + r)  # a writer's complete set: W0..W2 all hold its stamp
        inits = [numpy_helper.from_array(np.full((32, 32), stamp, np.float32), f"W{i}") for i in range(3)]
        inits.append(numpy_helper.from_array(np.array([stamp], np.float32), "stamp"))  # small: in the model file
        nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"]), helper.make_node("MatMul", ["h0", "W1"], ["h1"]),
                 helper.make_node("MatMul", ["h1", "W2"], ["y"])]
        graph = helper.make_graph(nodes, "g", [x], [y], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        save_model(model, out, external_data=True)
""")


def _stamps(path: Path):
    """(stamp in the model file, set of values of the external weights), or None when the data file the
    model named was removed while it was being read (a newer pair replaced it)."""
    header = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    try:
        onnx.load_external_data_for_model(header, str(path.parent))
    except Exception:
        if all((path.parent / loc).exists() for loc in locations):
            raise
        return None
    arrays = {t.name: numpy_helper.to_array(t) for t in header.graph.initializer}
    return float(arrays["stamp"][0]), {float(v) for i in range(3) for v in np.unique(arrays[f"W{i}"])}


def test_concurrent_writers_never_publish_a_mixed_pair(tmp_path):
    out = tmp_path / "o.onnx"
    writers, rounds = 4, 12
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(w), str(rounds)], cwd=REPO)
             for w in range(1, writers + 1)]
    reads = superseded = 0
    try:
        while any(p.poll() is None for p in procs):
            if not out.exists():
                continue
            seen = _stamps(out)
            if seen is None:
                superseded += 1
                continue
            stamp, values = seen
            assert values == {stamp}, f"model of write {stamp} read with weights {sorted(values)}"
            reads += 1
    finally:
        for p in procs:
            p.wait(timeout=120)
    assert [p.returncode for p in procs] == [0] * writers
    stamp, values = _stamps(out)
    assert values == {stamp} and stamp % 1000 == rounds - 1  # the last write of one of the writers
    data_files = [p.name for p in tmp_path.iterdir() if p.name != "o.onnx"]
    assert len(data_files) == 1 and DATA.fullmatch(data_files[0]), data_files  # no leftovers
    print(f"{reads} complete reads, {superseded} of a pair replaced while it was read")
    assert reads > 0


KILLED = textwrap.dedent("""
    import sys, time
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx_split.model_io import stage_model

    model = onnx.load(sys.argv[1])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((128, 96), 7.0, np.float32), "W"))
    staged = stage_model(model, sys.argv[2], external_data=True)  # the new pair is complete, not published
    print("staged", flush=True)
    time.sleep(600)
""")


def test_a_killed_writer_leaves_the_old_pair_and_its_leftovers_are_removed_by_the_next(tmp_path, src):
    out = tmp_path / "o.onnx"
    model = onnx.load(str(src))
    save_model(model, out, external_data=True)
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(src), str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "staged"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    left = {p.name for p in tmp_path.iterdir()} - set(before)
    assert len(left) == 2 and any(n.startswith(TMP_PREFIX) for n in left)  # its temp model, its data
    assert {p.name: _digest(p) for p in tmp_path.iterdir() if p.name in before} == before  # old pair intact
    expected = numpy_helper.to_array(model.graph.initializer[0])
    assert np.array_equal(numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0]), expected)
    written = save_model(model, out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.onnx"] + [p.name for p in written])


def test_a_data_file_about_to_be_published_is_never_taken_for_a_leftover(tmp_path, src):
    """A writer holds its data file's lock until its model is published: a concurrent writer's cleanup
    leaves it alone, and the pair it then publishes is complete."""
    from onnx_split.model_io import stage_model

    model = onnx.load(str(src))
    out = tmp_path / "o.onnx"
    pending = stage_model(model, out, external_data=True)
    other = save_model(model, out, external_data=True)  # publishes, then removes unused data files
    assert pending.extra[0][0].exists()
    mine = pending.publish()
    assert not other[1].exists() and all(p.exists() for p in mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.onnx"] + [p.name for p in mine])
    x = {"x": np.ones((2, 128), np.float32)}
    np.testing.assert_array_equal(ort_run(onnx.load(str(out)), x)[0], ort_run(model, x)[0])


# 3. nothing is written through an unrelated file or a link

def test_an_unrelated_file_at_the_conventional_data_name_is_left_alone(tmp_path, capsys, src):
    unrelated = tmp_path / "o.onnx.data"
    unrelated.write_bytes(b"somebody else's file\n")
    out = tmp_path / "o.onnx"
    code, _, err = _run(capsys, src, out, "--external-data", *FAST)
    assert code == 0, err
    assert unrelated.read_bytes() == b"somebody else's file\n"
    header = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"} == {
        p.name for p in tmp_path.iterdir() if DATA.fullmatch(p.name)}
    x = {"x": np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(onnx.load(str(out)), x)[0], ort_run(onnx.load(str(src)), x)[0], rtol=1e-5,
                               atol=1e-6)


def test_report_through_a_symlink_replaces_the_link(tmp_path, capsys, src):
    target = tmp_path / "target.json"
    target.write_text("keep me\n")
    link = tmp_path / "r.json"
    link.symlink_to(target)
    code, _, err = _run(capsys, src, tmp_path / "o.onnx", "--report", link, *FAST)
    assert code == 0, err
    assert target.read_text() == "keep me\n"
    assert not link.is_symlink() and json.loads(link.read_text())["written"] is True


# 4. SIGTERM is handled like SIGINT; leftovers of dead runs are removed, live ones are not

SLOW_WRITE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from onnx_split import model_io
    from onnx_split.cli import main

    # a slow disk: once the weights are written, the write waits; the marker says it has started
    # (the older name lets this test run against the code before this change, where it fails)
    name = "_write_external" if hasattr(model_io, "_write_external") else "_save_external"
    original = getattr(model_io, name)

    def slow(*args, **kwargs):
        result = original(*args, **kwargs)
        Path(sys.argv[1]).touch()
        time.sleep(600)
        return result

    setattr(model_io, name, slow)
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_write_leaves_nothing(tmp_path, src, sig):
    folder = tmp_path / "out"
    folder.mkdir()
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(marker), str(src), str(folder / "o.onnx"),
                             "--external-data", "--report", str(folder / "r.json"), *FAST],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert any(folder.iterdir())  # mid-write: its files are there
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig
    assert err.strip().splitlines() == [f"onnx_split: interrupted{' (SIGTERM)' if sig == signal.SIGTERM else ''}; "
                                        f"nothing written"]
    assert list(folder.iterdir()) == []


def _temp_name(pid: int) -> str:
    return f"{TMP_PREFIX}{pid}-0123456789ab.onnx"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    return proc.pid


def test_leftovers_of_a_dead_run_are_removed_and_of_a_live_one_are_not(tmp_path, capsys, src):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead, alive = tmp_path / _temp_name(_dead_pid()), tmp_path / _temp_name(live.pid)
        locked = tmp_path / _temp_name(_dead_pid()).replace(".onnx", ".tmp")  # pid dead here, lock held
        lookalike = tmp_path / f"{TMP_PREFIX}notapid-0123456789ab.onnx"
        for p in (dead, alive, locked, lookalike):
            p.write_bytes(b"partial")
        import fcntl
        with open(locked, "rb") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)
            code, _, err = _run(capsys, src, tmp_path / "o.onnx", *FAST)
        assert code == 0, err
        assert not dead.exists() and alive.exists() and locked.exists() and lookalike.exists()
    finally:
        live.kill()
        live.wait()


def test_a_data_file_is_removed_only_when_it_is_onnx_splits_and_unused(tmp_path, src):
    model = onnx.load(str(src))
    out = tmp_path / "o.onnx"
    first = save_model(model, out, external_data=True)[1]
    foreign = tmp_path / "o.onnx.0123456789ab.data"  # our name pattern, not our content
    foreign.write_bytes(b"not written by onnx_split")
    second = save_model(model, out, external_data=True)[1]
    assert not first.exists() and second.exists() and foreign.exists()  # the replaced pair's data is gone


# 5. every destination folder takes a file, tried before the work

def test_a_report_folder_that_is_a_file_is_refused_before_the_work(tmp_path, capsys, monkeypatch, src):
    plain = tmp_path / "plain"
    plain.write_text("a file")
    _refused(tmp_path, capsys, [src, tmp_path / "o.onnx", "--report", plain / "r.json", *FAST],
             "--report directory is not a directory", monkeypatch)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("which", ["output", "report"])
def test_a_folder_that_takes_no_file_is_refused_before_the_work(tmp_path, capsys, monkeypatch, src, which):
    """/proc refuses new files even to root (for whom chmod does not stop writes)."""
    out, report = ((Path("/proc/o.onnx"), tmp_path / "r.json") if which == "output"
                   else (tmp_path / "o.onnx", Path("/proc/r.json")))
    what = "output" if which == "output" else "--report"
    _refused(tmp_path, capsys, [src, out, "--report", report, *FAST], f"cannot write in the {what} directory /proc",
             monkeypatch)
