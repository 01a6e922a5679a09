"""Partitions made ahead in a second process (partition/ahead.py) are the partitions made here."""
from __future__ import annotations

import numpy as np
import pytest

import onnx_split.partition.ahead as ahead
from builders import chain_model, feature_wise
from onnx_split import SplitConfig, split_model, survey_model
from onnx_split.partition.ahead import Ahead, partitions, wanted


def _jobs(count: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(f"site{i}", np.abs(rng.standard_normal((96 + 8 * i, 80))) ** 3, (2, 4, 8)) for i in range(count)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[p].parts) == len(b[p].parts)
        and all(np.array_equal(x.rows, y.rows) and np.array_equal(x.cols, y.cols) for x, y in zip(a[p].parts, b[p].parts))
        for p in a)


def test_the_worker_makes_the_same_plans_and_a_waiting_caller_makes_some_itself():
    jobs = _jobs()
    pool = Ahead(jobs, "metis", seed=0)
    try:
        got = {key: pool.take(key) for key, _, _ in jobs}
    finally:
        pool.close()
    assert all(got.values())  # made by the worker, or here while waiting for it
    for key, scores, counts in jobs:
        assert _same(got[key], partitions("metis", scores, counts, 0)), key


def test_a_dead_worker_leaves_the_partitions_to_the_caller():
    jobs = _jobs(4, seed=1)
    pool = Ahead(jobs, "metis", seed=0, window=1)
    for process in list(pool.pool._processes.values()):
        process.kill()
    results = {key: pool.take(key) for key, _, _ in jobs}
    assert pool.pool is None  # closed once it failed
    assert all(r is None or _same(r, partitions("metis", s, c, 0)) for (key, s, c), r in zip(jobs, results.values()))
    assert results[jobs[0][0]] is None  # its future failed: the caller makes it


def test_a_worker_only_where_it_pays():
    assert not wanted([10_000_000], cpus=8)  # one site: nothing to overlap
    assert not wanted([1000, 1000], cpus=8)
    assert not wanted([5_000_000, 5_000_000], cpus=1)
    assert wanted([5_000_000, 5_000_000], cpus=2)


@pytest.fixture
def encoder_like(tmp_path):
    """Three 128-wide layers with noise (nothing exact to find) and calibration data."""
    rng = np.random.default_rng(3)
    weights = [(rng.standard_normal((128, 128)) / 11).astype(np.float32) for _ in range(3)]
    model = chain_model(weights, [[feature_wise("Relu", rng)]] * 2, ["batch", 128])
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((64, 128)).astype(np.float32))
    return model, str(cal)


def test_dry_run_and_tolerance_search_are_the_same_with_the_worker(encoder_like, monkeypatch):
    model, cal = encoder_like
    config = SplitConfig(min_elements=0, calibration=cal, partitioner="metis", bench=False, providers=("cpu",))

    def run():
        rows = survey_model(model, config)
        result = split_model(model, SplitConfig(**{**config.__dict__, "tolerance": 0.3, "layout": "batched"}))
        return ([(r.node, [(lv["level"], lv["retained"], lv["layer_error"], lv["error"]) for lv in r.levels])
                 for r in rows],
                [(s.node, s.decision, s.parts, s.retained) for s in result.report.sites],
                result.report.error.held_out if result.report.error else None)

    started = []
    real = Ahead.__init__

    def counting(self, *a, **kw):
        started.append(1)
        real(self, *a, **kw)
    monkeypatch.setattr(Ahead, "__init__", counting)
    monkeypatch.setattr(ahead, "MIN_ELEMENTS", 10 ** 18)
    here = run()
    assert not started
    monkeypatch.setattr(ahead, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(ahead.os, "cpu_count", lambda: 2)
    with_worker = run()
    assert len(started) == 2  # the dry run's and the search's
    assert with_worker == here
