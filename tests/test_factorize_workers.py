"""``--workers N`` and ``--fit-seconds S`` of ``--factorize`` (fit_pool.py): the sites of one level
fitted in worker processes give the factors one process gives, bit for bit; every fitted site
reports its estimate and its measured fit time; a time budget keeps the sites it cannot fit, with
the reason; a worker that dies keeps its site with a reason; bad values are one-line errors."""
from __future__ import annotations

import json
import logging
import os
import signal
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_split import SplitConfig, split_model
from onnx_split import fit_pool
from onnx_split.cli import main
from onnx_split.errors import InputError
from onnx_split.fit_pool import FitPool, Job

pytestmark = pytest.mark.usefixtures("one_blas_thread")

K, HIDDEN, OUT, BRANCHES = 40, 32, 16, 3


def _branches_model():
    """x -> BRANCHES parallel MatMuls (one level) -> Sum -> Relu -> MatMul (the next level) -> y."""
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((K, HIDDEN)).astype(np.float32) / 6 for _ in range(BRANCHES)]
    weights.append(rng.standard_normal((HIDDEN, OUT)).astype(np.float32) / 5)
    inits = [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(weights)]
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"h{i}"], name=f"branch{i}") for i in range(BRANCHES)]
    nodes += [helper.make_node("Sum", [f"h{i}" for i in range(BRANCHES)], ["s"], name="sum"),
              helper.make_node("Relu", ["s"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", f"W{BRANCHES}"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _calibration(tmp_path, n: int = 240):
    rng = np.random.default_rng(4)
    path = tmp_path / "cal.npz"
    np.savez(path, x=(rng.standard_normal((n, K)) @ (np.eye(K) + rng.standard_normal((K, K)) / 6)).astype(np.float32))
    return path


def _config(tmp_path, **more):
    return SplitConfig(factorize="admm", density=0.4, calibration=str(_calibration(tmp_path)), min_elements=0,
                       bench=False, input_shapes={"x": (2, K)}, **more)


def test_two_workers_fit_the_same_factors_as_one_and_report_the_times(tmp_path, caplog, monkeypatch):
    # each worker gets cpus // 2 BLAS threads: 1 as here (one_blas_thread), on any machine
    monkeypatch.setattr(fit_pool.os, "cpu_count", lambda: 2)
    results, events = {}, {}
    for workers in (1, 2):
        seen = []
        with caplog.at_level(logging.INFO, logger="onnx_split"):
            results[workers] = split_model(_branches_model(), _config(tmp_path, workers=workers),
                                           progress=lambda stage, done, total: seen.append((stage, done, total)))
        events[workers] = [(d, t) for s, d, t in seen if s == "factorize"]
    one, two = results[1], results[2]
    # the pool fits the same arrays with the same code: the same factors, bit for bit
    for a, b in zip(one.model.graph.initializer, two.model.graph.initializer):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    sites = {w: {s.node: s for s in r.report.sites} for w, r in results.items()}
    assert sorted(sites[1]) == ["branch0", "branch1", "branch2", "head"]
    for name, site in sites[1].items():
        mine, theirs = site.details["factorized"], sites[2][name].details["factorized"]
        assert site.decision == sites[2][name].decision == "split"
        for key in ("error", "held_out", "nonzeros", "factors", "bytes_after"):
            assert mine[key] == theirs[key], (name, key)
        for facts in (mine, theirs):  # measured, and estimated before the fit
            assert facts["fit_seconds"] > 0 and facts["estimated_seconds"] > 0
    assert one.report.error.held_out == two.report.error.held_out
    assert one.report.error.search == two.report.error.search
    # the progress advances by one per finished fit, to the end, with either count
    for workers in (1, 2):
        assert events[workers] == [(d, 4) for d in range(5)], events[workers]
    assert sum("estimated" in r.getMessage() for r in caplog.records) >= 8  # each site's estimate, each run


def test_a_tiny_fit_budget_keeps_every_site_with_its_estimate(tmp_path):
    result = split_model(_branches_model(), _config(tmp_path, fit_seconds=1e-9))
    sites = result.report.sites
    assert sites and all(s.decision == "kept" for s in sites)
    for s in sites:
        assert "--fit-seconds 1e-09" in s.reason and "estimated at" in s.reason, s.reason
    assert result.report.n_split == 0


def test_the_budget_skips_the_sites_whose_estimate_ends_past_it_and_fits_the_others():
    rng = np.random.default_rng(0)
    jobs = []
    for i, k in enumerate((24, 200, 24)):
        x = rng.standard_normal((2 * k, k))
        jobs.append(Job(i, f"s{i}", rng.standard_normal((k, 8)), x.T @ x))
    for workers in (1, 2):
        with FitPool("sparsegpt", 0.5, workers, fit_seconds=5.0) as pool:
            pool.estimator.estimate = lambda k, n: 100.0 if k == 200 else 0.01  # noqa: E731
            found = {o.site: o for o in pool.level(jobs)}
        assert sorted(found) == [0, 1, 2]
        assert found[1].fitted is None and "estimated at 100 s" in found[1].reason
        assert "--fit-seconds 5" in found[1].reason
        for i in (0, 2):
            assert found[i].reason is None and found[i].fitted.nonzeros == 24 * 8 // 2 and found[i].fit_seconds > 0


def test_the_estimate_is_measured_on_probes_then_on_the_finished_fits():
    timed = []

    def run_probe(method, size, density):
        timed.append(size)
        return size, {64: 1.0, 128: 3.0}[size]

    estimator = fit_pool.Estimator("admm", 0.5, run_probe)
    small, large = fit_pool.work("admm", 64, 64), fit_pool.work("admm", 128, 128)
    assert estimator.estimate(32, 32) == pytest.approx(fit_pool.work("admm", 32, 32) / small)  # one probe
    assert timed == [64]
    slope = 2.0 / (large - small)
    assert estimator.estimate(512, 512) == pytest.approx(1.0 + slope * (fit_pool.work("admm", 512, 512) - small))
    assert timed == [64, 128]
    estimator.record(512, 512, 10.0)
    estimator.record(256, 256, 4.0)  # two finished fits: the probes no longer count
    w1, w2 = fit_pool.work("admm", 512, 512), fit_pool.work("admm", 256, 256)
    b = 6.0 / (w1 - w2)
    assert estimator.estimate(1024, 1024) == pytest.approx(4.0 + b * (fit_pool.work("admm", 1024, 1024) - w2))
    assert timed == [64, 128]


def _die(*args):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_that_dies_keeps_its_site_with_a_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fit_pool, "fit_timed", _die)  # what the parent submits: killed in the worker
    model_path, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_branches_model(), str(model_path))
    code = main([str(model_path), str(out), "--factorize", "admm", "--density", "0.4", "--min-elements", "0",
                 "--calibration", str(_calibration(tmp_path)), "--no-bench", "--workers", "2",
                 "--report", str(report)])
    text, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err and "Traceback" not in text
    sites = json.loads(report.read_text())["sites"]
    assert len(sites) == 4
    assert all(s["decision"] == "kept" and "worker process of the pool died" in s["reason"] for s in sites)


def _die_on_branch1(method, target, gram, density, groups=None):
    """fit_timed, but the worker fitting branch1's weight is killed."""
    if target.shape == (K, HIDDEN) and np.allclose(target, _branches_weight(1)):
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.perf_counter()
    fitted = fit_pool.fit_any(method, target, gram, density, *(() if groups is None else (groups,)))
    return fitted, time.perf_counter() - start


def _branches_weight(i: int) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in _branches_model().graph.initializer if t.name == f"W{i}"))


def test_a_worker_that_dies_takes_only_its_own_site_with_it(tmp_path, monkeypatch, capsys):
    """The fits that ran beside it in the broken pool are rerun one at a time and kept."""
    monkeypatch.setattr(fit_pool, "fit_timed", _die_on_branch1)
    model_path, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_branches_model(), str(model_path))
    code = main([str(model_path), str(out), "--factorize", "admm", "--density", "0.4", "--min-elements", "0",
                 "--calibration", str(_calibration(tmp_path)), "--no-bench", "--workers", "2",
                 "--report", str(report)])
    assert code == 0
    sites = {s["node"]: s for s in json.loads(report.read_text())["sites"]}
    assert sites["branch1"]["decision"] == "kept" and "worker process of the pool died" in sites["branch1"]["reason"]
    assert [sites[n]["decision"] for n in ("branch0", "branch2", "head")] == ["split"] * 3


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be a whole number >= 1, got 0"),
    (["--workers", "-2"], "--workers must be a whole number >= 1"),
    (["--workers", "two"], "--workers: invalid int value"),
    (["--fit-seconds", "0"], "--fit-seconds must be > 0"),
    (["--fit-seconds", "nan"], "--fit-seconds must be > 0 and finite"),
])
def test_cli_bad_workers_and_budget_are_one_line_errors(tmp_path, capsys, argv, message):
    model_path, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_branches_model(), str(model_path))
    code = main([str(model_path), str(out), "--factorize", "admm", "--density", "0.4", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_library_validates_workers_and_budget():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InputError, match="--workers must be a whole number >= 1"):
            SplitConfig(factorize="admm", density=0.5, workers=bad)
    with pytest.raises(InputError, match="--workers applies to the fits of --factorize"):
        SplitConfig(workers=2)
    with pytest.raises(InputError, match="--fit-seconds applies to the fits of --factorize"):
        SplitConfig(fit_seconds=10.0)
    with pytest.raises(InputError, match="--fit-seconds must be > 0"):
        SplitConfig(factorize="admm", density=0.5, fit_seconds=-1.0)
    assert SplitConfig(factorize="admm", density=0.5, workers=np.int64(3)).workers == 3


def _blas_threads(*args):
    from threadpoolctl import threadpool_info

    return sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})


def test_each_worker_limits_its_blas_threads(monkeypatch):
    """Its share of the cores, and never more than a fit in this process gets (--threads)."""
    monkeypatch.setattr(fit_pool.os, "cpu_count", lambda: 6)
    assert FitPool("magnitude", 0.5, workers=3).worker_threads == 1  # --threads 1, the default
    assert FitPool("magnitude", 0.5, workers=2, threads=8).worker_threads == 3
    with FitPool("magnitude", 0.5, workers=3, threads=4) as pool:
        assert pool.worker_threads == 2
        assert pool._executor().submit(_blas_threads).result() == [2]


def test_structured_fits_in_workers_are_the_same_as_in_one_process(tmp_path, monkeypatch):
    from onnx_split.factorization import plan_factorized
    from onnx_split.sites import find_sites

    monkeypatch.setattr(fit_pool.os, "cpu_count", lambda: 2)
    model, found = _branches_model(), {}
    for workers in (1, 2):
        config = SplitConfig(factorize="blocks", density=0.5, calibration=str(_calibration(tmp_path)),
                             min_elements=0, workers=workers)
        planning = plan_factorized(model, find_sites(model, min_elements=0), config)
        found[workers] = {u.sites[0]: u.plan for u in planning.units}
    assert sorted(found[1]) == sorted(found[2]) == [0, 1, 2, 3]
    for i, plan in found[1].items():
        other = found[2][i]
        assert np.array_equal(plan.first, other.first) and np.array_equal(plan.second, other.second)
        assert plan.error == other.error and plan.fit_seconds > 0 and plan.estimated_seconds > 0
        assert other.summary(0)["factorized"]["estimated_seconds"] == other.estimated_seconds


def _sleep(marker):
    import time
    from pathlib import Path

    Path(marker).touch()
    time.sleep(120)


def test_an_abandoned_pool_kills_its_running_fits_instead_of_waiting(tmp_path):
    """An error or an interrupt in the parent ends the run at once, not after the running fits."""
    import time

    pool = FitPool("magnitude", 0.5, workers=2)
    markers = [tmp_path / f"running{i}" for i in range(2)]
    futures = [pool._executor().submit(_sleep, str(m)) for m in markers]
    deadline = time.monotonic() + 60
    while not all(m.exists() for m in markers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(m.exists() for m in markers)  # both workers are in their fits
    processes = list(pool._pool._processes.values())
    start = time.monotonic()
    pool.close(abandon=True)
    assert time.monotonic() - start < 30 and not any(p.is_alive() for p in processes)
    assert all(f.done() for f in futures)
