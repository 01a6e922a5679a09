"""The calibration moments held a group of sites at a time (moment_store.py): the same plans, errors
and dry-run figures whatever the group size, and never more held than the budget allows; and
plans' masks held as bits (plans.blocks.PackedMasks)."""
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_split import SplitConfig, lossy, moment_store, survey_model
from onnx_split.decisions import Planned
from onnx_split.sites import find_sites

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL, CALIBRATION = MODELS / "digits_mlp.onnx", MODELS / "digits_calibration.npz"


@pytest.fixture
def stores(monkeypatch):
    """Every store made, with the most it held at any time and its budget."""
    made = []
    real = moment_store.MomentStore._collect

    def spy(self, group, every_diagonal=False, progress=None):
        real(self, group, every_diagonal, progress)
        if self not in [m[0] for m in made]:
            made.append([self, 0])
        entry = next(m for m in made if m[0] is self)
        entry[1] = max(entry[1], self.held_bytes())

    monkeypatch.setattr(moment_store.MomentStore, "_collect", spy)
    return made


def _one_at_a_time(monkeypatch):
    """A budget of 0 bytes: every group is one activation."""
    monkeypatch.setattr(moment_store, "MOMENT_SHARE", 0.0)
    monkeypatch.setattr(moment_store, "MIN_MOMENT_BYTES", 0)


def _plan(config):
    model = onnx.load(MODEL)
    sites = find_sites(model, min_elements=config.min_elements)
    return sites, lossy.plan_lossy(model, sites, config)


def _outcome(sites, result):
    plans = {i: d.plan for i, d in result.decisions.items() if isinstance(d, Planned)}
    return ({i: (type(d).__name__, d.reason) for i, d in result.decisions.items()},
            {i: p.effective_weight(0, sites[i].weight) for i, p in plans.items()},
            [(t["flops"], t["error"]) for t in result.trace])


@pytest.mark.parametrize("budget", [dict(tolerance=0.05), dict(parts=4)])
def test_moments_held_one_activation_at_a_time_give_the_same_plans_and_errors(monkeypatch, stores, budget):
    config = SplitConfig(calibration=str(CALIBRATION), bench=False, verify=False, **budget)
    sites, whole = _plan(config)
    (store, _), = stores
    assert store.passes == 1  # a small model: every moment in the first pass
    _one_at_a_time(monkeypatch)
    sites, grouped = _plan(config)
    store, held = stores[1]
    keys = len(store.order)
    assert keys == 3 and store.passes >= keys  # one pass per activation at least
    largest = max(store._bytes(key) for key in store.order)
    assert held == largest  # never more than one activation's moments at once
    a, b = _outcome(sites, whole), _outcome(sites, grouped)
    assert a[0] == b[0] and a[2] == b[2]
    assert a[1].keys() == b[1].keys() and a[1]  # something was split
    for i in a[1]:
        np.testing.assert_array_equal(a[1][i], b[1][i])


def test_the_dry_run_reads_the_same_figures_off_moments_held_one_activation_at_a_time(monkeypatch):
    config = SplitConfig(calibration=str(CALIBRATION))
    whole = survey_model(str(MODEL), config)
    _one_at_a_time(monkeypatch)
    grouped = survey_model(str(MODEL), config)
    assert [r.levels for r in whole] == [r.levels for r in grouped]
    assert any(level["layer_error"] is not None for r in whole for level in r.levels)


def test_the_budget_is_half_the_candidates_weight_bytes_or_the_minimum():
    sites = find_sites(onnx.load(MODEL), min_elements=0)
    weights = sum(s.weight.nbytes for s in sites)
    assert moment_store.budget(sites, list(range(len(sites)))) == max(moment_store.MIN_MOMENT_BYTES, weights // 2)


def test_a_plans_masks_are_held_as_bits_and_read_back_as_the_same_arrays():
    from onnx_split.plans import planner_for
    from onnx_split.plans.blocks import KeptEntries, PackedMasks
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 80)).astype(np.float32)
    plan = planner_for(np.abs(w).astype(np.float64), "metis", seed=0).for_parts(4)
    assert isinstance(plan.masks, PackedMasks)
    assert plan.masks.bits[0].nbytes == -(-w.size // 8)  # a bit per entry, not a byte
    mask = plan.masks[0]
    assert mask.dtype == bool and mask.shape == w.shape and 0 < mask.sum() < w.size
    fitted = plan.with_fit(((np.where(mask, w, 0), None),))
    held = fitted.fitted[0][0]
    assert isinstance(held, KeptEntries) and held.masks is fitted.masks
    np.testing.assert_array_equal(fitted.effective_weight(0, w), np.where(mask, w, 0))
    again = PackedMasks([mask])
    assert again.key(0) == plan.masks.key(0) and np.array_equal(again[0], mask)
