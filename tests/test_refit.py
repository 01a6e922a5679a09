"""The refit of lossy plans (refit.py, fitting.py), streamed calibration moments (stats.py), the
batched output error (pruned.ErrorSum) and the linear-time ``--tolerance`` search (lossy.py).

Every expected value is computed here independently in numpy (least squares by np.linalg.lstsq,
outputs by matrix products) and compared with what the pass wrote and ONNX Runtime ran."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_split import SplitConfig, split_model
from onnx_split.cli import main
from onnx_split.pruned import ErrorSum, relative_error
from onnx_split.refit import Problem, column_groups
from onnx_split.moments import Moments

from builders import ort_run


def _mlp(rng, k=48, h=64, n=32, alpha=1.0, beta=1.0):
    """x[batch, k] -> Gemm(W1^T, transB=1, alpha, beta, C1[h]) -> Relu -> Gemm(W2, C2[n]) -> y."""
    w1 = (rng.standard_normal((k, h)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((h, n)) / np.sqrt(h)).astype(np.float32)
    c1 = (0.1 * rng.standard_normal(h)).astype(np.float32)
    c2 = (0.1 * rng.standard_normal(n)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W1", "C1"], ["h"], name="fc1", transB=1, alpha=alpha, beta=beta),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Gemm", ["r", "W2", "C2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(np.ascontiguousarray(w1.T), "W1"), numpy_helper.from_array(c1, "C1"),
             numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(c2, "C2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, (w1, c1, w2, c2)


def _inputs(rng, n, k=48, rank=6):
    """Correlated inputs (a few latent factors plus noise), as trained activations are; the factors
    mix the same way in every call, so calibration and test inputs share one distribution."""
    z = rng.standard_normal((n, rank))
    mix = np.random.default_rng(1000 + k).standard_normal((rank, k))
    return (z @ mix + 0.3 * rng.standard_normal((n, k)) + 0.5).astype(np.float32)


def _lstsq(x, target, mask, bias: bool):
    """Per column, least squares of ``target`` on the kept rows of ``x`` (with an intercept)."""
    k, n = mask.shape
    w, b = np.zeros((k, n)), np.zeros(n)
    for j in range(n):
        rows = np.flatnonzero(mask[:, j])
        a = x[:, rows]
        if bias:
            a = np.hstack([a, np.ones((x.shape[0], 1))])
        sol = np.linalg.lstsq(a, target[:, j], rcond=None)[0]
        w[rows, j] = sol[:rows.size]
        b[j] = sol[rows.size] if bias else 0.0
    return w, b


def _block_mask(k, n, parts, rng):
    rows = np.array_split(rng.permutation(k), parts)
    cols = np.array_split(rng.permutation(n), parts)
    mask = np.zeros((k, n), bool)
    for r, c in zip(rows, cols):
        mask[np.ix_(r, c)] = True
    return mask


# ---------------------------------------------------------------- refit.py on its own

def _solve(mask, w, b, gram, cross=None):
    """refit.Problem's undamped solution as (weight, bias or None), and the problem."""
    problem = Problem(w, b, gram, cross)
    new = problem.solve(column_groups(mask), 0.0)
    return new[:-1], (new[-1] if b is not None else None), problem, new

@pytest.mark.parametrize("bias", [True, False])
def test_refit_is_least_squares_on_the_kept_rows(bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24)) + 1.0
    w, b = rng.standard_normal((24, 16)), rng.standard_normal(16)
    mask = _block_mask(24, 16, 4, rng)
    m = Moments(24)
    m.add(x)
    got_w, got_b, problem, new = _solve(mask, w, b if bias else None, m.sum)
    want_w, want_b = _lstsq(x, x @ w + (b if bias else 0.0), mask, bias)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-6, atol=1e-8)
    assert (got_w[~mask] == 0).all()
    if bias:
        np.testing.assert_allclose(got_b, want_b, rtol=1e-6, atol=1e-8)
    else:
        assert got_b is None
    # it is never worse than dropping, measured directly
    err = lambda ww, bb: np.linalg.norm(x @ ww + bb - (x @ w + b)) / np.linalg.norm(x @ w + b)  # noqa: E731
    fitted = err(got_w, got_b if bias else b)
    assert fitted < err(np.where(mask, w, 0), b)
    assert problem.error(column_groups(mask), new) == pytest.approx(
        fitted if bias else np.linalg.norm(x @ got_w - x @ w) / np.linalg.norm(x @ w), rel=1e-6)


def test_a_cross_moment_refits_to_the_original_output_from_shifted_inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 12)) + 0.2
    shifted = x + 0.1 * rng.standard_normal(x.shape)  # what the already-rewritten layers hand on
    w, b = rng.standard_normal((12, 8)), rng.standard_normal(8)
    mask = _block_mask(12, 8, 2, rng)
    gram, cross = Moments(12), Moments(12)
    for part in np.array_split(np.arange(300), 7):  # streamed: the sums do not care how rows are batched
        gram.add(shifted[part])
        cross.add(x[part], shifted[part])
    got_w, got_b, _, _ = _solve(mask, w, b, gram.sum, cross.sum)
    want_w, want_b = _lstsq(shifted, x @ w + b, mask, True)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-6, atol=1e-8)


def test_moments_skip_rows_that_are_not_finite_and_sum_like_one_batch():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 5))
    x[3, 1] = np.nan
    whole, parts = Moments(5), Moments(5)
    whole.add(x)
    for part in np.array_split(x, 4):
        parts.add(part)
    finite = np.delete(x, 3, axis=0)
    aug = np.hstack([finite, np.ones((49, 1))])
    np.testing.assert_allclose(whole.sum, aug.T @ aug)
    np.testing.assert_allclose(parts.sum, whole.sum)
    assert whole.count == 49
    np.testing.assert_allclose(whole.norms, np.linalg.norm(finite, axis=0))


def test_two_problems_combined_solve_and_measure_as_one_on_their_summed_moments():
    rng = np.random.default_rng(21)
    w, b = rng.standard_normal((20, 12)), rng.standard_normal(12)
    mask = _block_mask(20, 12, 3, rng)
    halves = []
    for _ in range(2):
        gram, cross = Moments(20), Moments(20)
        x = rng.standard_normal((90, 20)) + 0.3
        gram.add(x + 0.05)
        cross.add(x, x + 0.05)
        halves.append((gram.sum, cross.sum))
    whole = Problem(w, b, halves[0][0] + halves[1][0], halves[0][1] + halves[1][1])
    both = Problem.combined([Problem(w, b, g, c) for g, c in halves])
    groups = column_groups(mask)
    for damping in (0.0, 0.01):
        np.testing.assert_allclose(both.solve(groups, damping), whole.solve(groups, damping), rtol=1e-9, atol=1e-12)
    new = whole.solve(groups, 0.01)
    assert both.error(groups, new) == pytest.approx(whole.error(groups, new), rel=1e-9)
    assert len(both.grams) == 2  # no summed (K+1)^2 copy was made


def test_moments_stored_in_float32_solve_in_float64_as_the_float64_ones_do():
    from onnx_split.moments import STORED
    rng = np.random.default_rng(22)
    x = _inputs(rng, 600, k=32).astype(np.float64)
    w, b = rng.standard_normal((32, 16)), rng.standard_normal(16)
    mask = _block_mask(32, 16, 4, rng)
    wide, narrow = Moments(32), Moments(32, STORED)
    for part in np.array_split(x, 5):
        wide.add(part)
        narrow.add(part)
    assert narrow.sum.dtype == np.float32 and narrow.sum.nbytes * 2 == wide.sum.nbytes
    groups = column_groups(mask)
    exact, stored = Problem(w, b, wide.sum), Problem(w, b, narrow.sum)
    new = exact.solve(groups, 1e-3)
    assert np.linalg.norm(stored.solve(groups, 1e-3) - new) < 1e-4 * np.linalg.norm(new)
    assert stored.error(groups, new) == pytest.approx(exact.error(groups, new), rel=1e-4)


def test_the_solve_is_numpys_and_falls_back_to_least_squares_where_singular():
    from onnx_split.refit import solve_system
    rng = np.random.default_rng(23)
    x = rng.standard_normal((40, 9))
    spd, rhs = x.T @ x + 0.1 * np.eye(9), rng.standard_normal((9, 4))
    np.testing.assert_allclose(solve_system(spd.copy(), rhs), np.linalg.solve(spd, rhs), rtol=1e-10, atol=1e-12)
    indefinite = spd - 5 * np.eye(9) * np.linalg.eigvalsh(spd).max()  # symmetric, not positive definite
    np.testing.assert_allclose(solve_system(indefinite.copy(), rhs), np.linalg.solve(indefinite, rhs),
                               rtol=1e-10, atol=1e-12)
    singular = np.ones((3, 3))
    np.testing.assert_allclose(solve_system(singular.copy(), np.ones((3, 1))),
                               np.linalg.lstsq(singular, np.ones((3, 1)), rcond=None)[0], atol=1e-12)


def test_blocks_read_once_solve_and_measure_as_when_each_call_reads_its_own(monkeypatch):
    from onnx_split import fitting, refit
    from onnx_split.fitting import Fitter, Fold
    from onnx_split.plans import planner_for
    from onnx_split.sites import find_sites
    from builders import matmul_model
    rng = np.random.default_rng(24)
    w, b = rng.standard_normal((24, 16)), rng.standard_normal(16)
    m = Moments(24)
    m.add(_inputs(rng, 200, k=24).astype(np.float64))
    groups = column_groups(_block_mask(24, 16, 3, rng))
    for bias in (b, None):
        problem = Problem(w, bias, m.sum)
        blocks = problem.blocks(groups)
        for damping in (1e-3, 1.0):
            np.testing.assert_array_equal(problem.solve(groups, damping, blocks), problem.solve(groups, damping))
        new = problem.solve(groups, 1e-2)
        assert problem.error(groups, new, blocks) == problem.error(groups, new)
    # one fold: the fit whose error is measured is the one returned (one solve per group, not two)
    calls = []
    monkeypatch.setattr(refit, "solve_system", lambda h, rhs: calls.append(1) or np.linalg.solve(h, rhs))
    w32 = w.astype(np.float32)
    site = find_sites(matmul_model(w32, ["batch", 24]), min_elements=0)[0]
    plan = planner_for(np.abs(w32).astype(np.float64), "metis", seed=0).for_parts(2)
    Fitter(site, [Fold(m.sum)]).fit(plan)
    assert len(calls) == len(column_groups(plan.masks[0]))


def test_a_plan_measured_before_is_fitted_for_good_with_only_its_final_solves(monkeypatch):
    from onnx_split import fitting, refit
    from onnx_split.fitting import Fitter, Fold
    from onnx_split.plans import planner_for
    from onnx_split.sites import find_sites
    from builders import matmul_model
    rng = np.random.default_rng(25)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    site = find_sites(matmul_model(w, ["batch", 32]), min_elements=0)[0]
    plan = planner_for(np.abs(w).astype(np.float64), "metis", seed=0).for_parts(2)
    groups = len(column_groups(plan.masks[0]))

    def folds():
        out = []
        for _ in range(2):
            m = Moments(32)
            m.add(_inputs(np.random.default_rng(26 + len(out)), 120, k=32).astype(np.float64))
            out.append(Fold(m.sum))
        return out

    calls, tried = [], []
    monkeypatch.setattr(refit, "solve_system", lambda h, rhs: calls.append(1) or np.linalg.solve(h, rhs))
    choose = fitting.choose_damping
    monkeypatch.setattr(fitting, "choose_damping",
                        lambda held_out, start=None: choose(lambda d: tried.append(d) or held_out(d), start))
    fresh_plan, fresh_err = Fitter(site, folds()).fit(plan)
    fresh = len(calls)
    assert 2 <= len(tried) <= len(refit.DAMPINGS)
    assert fresh == groups * (2 * len(tried) + 1)  # both folds at every damping tried, then all rows
    calls.clear()
    fitter = Fitter(site, folds())
    _, measured = fitter.fit(plan, final=False)  # the dry run reads the error first
    again, err = fitter.fit(plan)
    assert len(calls) == fresh  # as one fit: the second solved only on all rows (before: 2 * fresh - groups)
    assert err == measured == fresh_err
    np.testing.assert_array_equal(again.effective_weight(0, site.weight), fresh_plan.effective_weight(0, site.weight))


def test_the_calibration_pass_stores_one_float32_moment_matrix_per_activation_and_fold(tmp_path, monkeypatch):
    from onnx_split import lossy
    from onnx_split.sites import find_sites
    rng = np.random.default_rng(23)
    model, _ = _mlp(rng)
    cal = _calibration(tmp_path, rng)
    config = SplitConfig(parts=4, calibration=str(cal), bench=False, min_elements=0)
    sites = find_sites(model, min_elements=0)
    seen = []
    collect = lossy._collect

    def spy(ctx):
        collect(ctx)
        seen.append(ctx.moments)

    monkeypatch.setattr(lossy, "_collect", spy)
    lossy.plan_lossy(model, sites, config)
    (store,) = seen
    assert store.n_folds == 2 and store.passes == 1  # the two halves of the search samples; their total is never stored
    for key, shape in {("x", False): (49, 49), ("r", False): (65, 65)}.items():
        assert all(s.shape == shape and s.dtype == np.float32 for s in store.sums(key))
    assert store.passes == 1  # a small model's moments are held in one group


def test_column_groups_gather_the_columns_that_keep_the_same_rows():
    mask = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], bool)
    groups = {tuple(c): tuple(r) for r, c in column_groups(mask)}
    assert groups == {(0, 2): (0, 2), (1,): (1,)}


def test_the_batched_error_equals_the_error_over_all_samples_at_once():
    rng = np.random.default_rng(3)
    ref, got = rng.standard_normal((20, 4)), rng.standard_normal((20, 4))
    total = ErrorSum()
    for a, b in zip(np.array_split(ref, 3), np.array_split(got, 3)):
        total.add([a], [b])
    assert total.value == pytest.approx(relative_error([ref], [got]), rel=1e-12)


# ---------------------------------------------------------------- through split_model and the CLI

def _calibration(tmp_path, rng, n=400):
    path = tmp_path / "cal.npz"
    np.savez(path, x=_inputs(rng, n))
    return path


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_a_refitted_split_computes_the_refitted_weights_and_beats_dropping(tmp_path, alpha, beta):
    rng = np.random.default_rng(4)
    model, (w1, c1, w2, c2) = _mlp(rng, alpha=alpha, beta=beta)
    cal = _calibration(tmp_path, rng)
    base = dict(parts=4, calibration=str(cal), bench=False, layout="batched", min_elements=0, providers=("cpu",),
                chains=False)
    fitted = split_model(model, SplitConfig(**base)).report
    dropped = split_model(model, SplitConfig(**base, refit=False)).report
    assert fitted.verification_passed and dropped.verification_passed
    assert {v.optimization for v in fitted.verification} == {"disabled", "enabled"}
    assert all(s.decision == "split" for s in fitted.sites)
    assert "refitted" in fitted.sites[0].reason and "refitted" not in dropped.sites[0].reason
    assert fitted.error.held_out < 0.5 * dropped.error.held_out
    assert "kept blocks refitted" in fitted.to_text()


def test_the_written_model_is_what_numpy_computes_from_the_plans_weights(tmp_path):
    from onnx_split.decisions import Planned
    from onnx_split.lossy import plan_lossy
    from onnx_split.sites import find_sites
    rng = np.random.default_rng(5)
    model, (w1, c1, w2, c2) = _mlp(rng, alpha=0.5, beta=2.0)
    cal = _calibration(tmp_path, rng)
    config = SplitConfig(parts=2, calibration=str(cal), bench=False, layout="parallel", min_elements=0,
                         providers=("cpu",), chains=False)
    written = split_model(model, config).model
    sites = find_sites(model, min_elements=0)
    plans = {i: d.plan for i, d in plan_lossy(model, sites, config).decisions.items() if isinstance(d, Planned)}
    e1, b1 = plans[0].effective_weight(0, sites[0].weight), plans[0].effective_bias(0, sites[0].bias_value)
    e2, b2 = plans[1].effective_weight(0, sites[1].weight), plans[1].effective_bias(0, sites[1].bias_value)
    assert not np.array_equal(b1, c1) and not np.array_equal(b2, c2)  # the refit moved the biases too
    x = _inputs(rng, 9)
    want = np.maximum(0.5 * (x @ e1) + 2.0 * b1, 0) @ e2 + b2
    for level in ("disabled", "enabled"):
        (y,) = ort_run(written, {"x": x}, level)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
        (y0,) = ort_run(model, {"x": x}, level)
        assert 1e-4 < relative_error([y0], [y]) < 0.5  # near the original, not equal to it


def test_sequential_refit_fits_the_second_layer_on_the_first_layers_new_output(tmp_path):
    from onnx_split import fitting
    from onnx_split.lossy import plan_lossy
    from onnx_split.sites import find_sites
    from onnx_split.decisions import Planned
    rng = np.random.default_rng(6)
    model, (w1, c1, w2, c2) = _mlp(rng)
    cal = _calibration(tmp_path, rng)
    config = SplitConfig(parts=4, calibration=str(cal), bench=False, min_elements=0, holdout=0.25, chains=False)
    sites = find_sites(model, min_elements=0)
    lossy = plan_lossy(model, sites, config)
    plans = {i: d.plan for i, d in lossy.decisions.items() if isinstance(d, Planned)}
    assert set(plans) == {0, 1} and all(p.refitted for p in plans.values())
    x = lossy.calibration.search["x"].astype(np.float64)
    # layer 1 refitted on the original input, layer 2 on what the refitted layer 1 hands on
    e1, b1 = plans[0].effective_weight(0, sites[0].weight), plans[0].effective_bias(0, sites[0].bias_value)
    h_new = np.maximum(x @ e1 + b1, 0)
    h_old = np.maximum(x @ w1 + c1, 0)
    mask = plans[1].masks[0]
    want_w, want_b = _lstsq(h_new, h_old @ w2 + c2, mask, True)
    got_w = plans[1].effective_weight(0, sites[1].weight).astype(np.float64)
    got_b = np.asarray(plans[1].effective_bias(0, sites[1].bias_value), np.float64)
    y = h_old @ w2 + c2
    # damping is small: the fit is the least-squares one up to a small fraction of the output
    assert np.linalg.norm(h_new @ got_w + got_b - (h_new @ want_w + want_b)) < 0.05 * np.linalg.norm(y)
    assert np.linalg.norm(h_new @ got_w + got_b - y) < 1.05 * np.linalg.norm(h_new @ want_w + want_b - y)
    assert fitting.levels([0, 1], fitting.upstream(model, sites, [0, 1])) == {0: 0, 1: 1}


def test_exact_blocks_are_not_moved_by_the_refit():
    from builders import matmul_model, planted
    w, _ = planted(np.random.default_rng(7), 64, 64, 4)
    model = matmul_model(w, ["batch", 64])
    result = split_model(model, SplitConfig(parts=4, bench=False, min_elements=0, layout="batched"))
    assert result.report.sites[0].decision == "split"
    assert "refitted" not in result.report.sites[0].reason  # the masked weight is exact: nothing to fit
    x = np.random.default_rng(8).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(ort_run(result.model, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-5)


def test_calibration_batch_size_changes_nothing_but_memory(tmp_path):
    rng = np.random.default_rng(9)
    model, _ = _mlp(rng)
    cal = _calibration(tmp_path, rng)
    reports = [split_model(model, SplitConfig(parts=4, calibration=str(cal), bench=False, min_elements=0,
                                              calibration_batch=size, providers=("cpu",), layout="batched")).report
               for size in (7, 1000)]
    assert any(s.decision == "split" for s in reports[0].sites) and reports[0].error.held_out > 0
    assert reports[0].error.held_out == pytest.approx(reports[1].error.held_out, rel=1e-5)
    assert [s.retained for s in reports[0].sites] == pytest.approx([s.retained for s in reports[1].sites])


@pytest.mark.parametrize("bad", ["0", "-3", "x"])
def test_a_bad_calibration_batch_is_one_line_and_exit_2(tmp_path, capsys, bad):
    rng = np.random.default_rng(10)
    model, _ = _mlp(rng)
    onnx.save_model(model, tmp_path / "m.onnx")
    code = main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--parts", "2", "--calibration-batch", bad])
    err = capsys.readouterr().err
    assert code == 2 and "--calibration-batch" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------- the --tolerance search

def _deep(rng, layers=6, width=48):
    """x -> (MatMul + Add + Relu) x layers -> y, dense trained-like weights."""
    from builders import chain_model, feature_wise
    weights = [(rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32) for _ in range(layers)]
    return chain_model(weights, [[feature_wise("Relu", rng)] for _ in range(layers - 1)], ["batch", width])


def test_the_tolerance_search_holds_on_held_out_data_in_runs_linear_in_the_sites(tmp_path):
    rng = np.random.default_rng(11)
    model = _deep(rng)
    path = tmp_path / "cal.npz"
    np.savez(path, x=_inputs(rng, 400, k=48))
    result = split_model(model, SplitConfig(tolerance=0.05, calibration=str(path), bench=False, min_elements=0,
                                            layout="batched", providers=("cpu",)))
    report = result.report
    assert report.error.met is True and report.error.held_out <= 0.05
    split = [s for s in report.sites if s.decision == "split"]
    assert split, [s.reason for s in report.sites]
    assert report.verification_passed
    # one sensitivity run per site, a few confirmations, one refit pass per dependency level
    assert report.error.evaluations <= 3 * len(report.sites) + 8
    kept = [s for s in report.sites if s.decision == "kept"]
    assert all("--tolerance 0.05" in s.reason for s in kept)


def test_search_seconds_ends_with_what_was_measured_within_the_tolerance(tmp_path):
    rng = np.random.default_rng(12)
    model = _deep(rng)
    path = tmp_path / "cal.npz"
    np.savez(path, x=_inputs(rng, 200, k=48))
    report = split_model(model, SplitConfig(tolerance=0.05, calibration=str(path), bench=False, min_elements=0,
                                            search_seconds=1e-9, providers=("cpu",))).report
    assert report.n_split == 0
    assert all("--search-seconds" in s.reason for s in report.sites if s.decision == "kept")
    assert report.error is None or report.error.met is not False


def test_no_refit_is_recorded_in_the_options(tmp_path):
    rng = np.random.default_rng(13)
    model, _ = _mlp(rng)
    onnx.save_model(model, tmp_path / "m.onnx")
    cal = _calibration(tmp_path, rng)
    code = main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--parts", "2", "--min-elements", "0",
                 "--calibration", str(cal), "--no-refit", "--no-bench", "--layout", "batched"])
    assert code == 0
    written = onnx.load(str(tmp_path / "o.onnx"))
    import json
    options = json.loads({p.key: p.value for p in written.metadata_props}["onnx_split.options"])
    assert options["refit"] is False


def test_with_as_many_unknowns_as_rows_the_refit_reports_its_held_out_error_not_its_fit():
    from onnx_split.fitting import Fitter, Fold
    from onnx_split.plans import planner_for
    from onnx_split.refit import Problem, column_groups
    from onnx_split.sites import find_sites
    from builders import matmul_model
    rng = np.random.default_rng(14)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    site = find_sites(matmul_model(w, ["batch", 64]), min_elements=0)[0]
    plan = planner_for(np.abs(w).astype(np.float64), "metis", seed=0).for_parts(2)

    def moments(n):
        m = Moments(64)
        m.add(rng.standard_normal((n, 64)))
        return m.sum

    folds = [Fold(moments(24)), Fold(moments(24))]  # 32 kept rows per part, 24 samples per half
    fitted, reported = Fitter(site, folds).fit(plan)
    fresh = Problem(w.astype(np.float64), None, moments(5000))
    groups = column_groups(plan.masks[0])
    new = np.vstack([fitted.effective_weight(0, site.weight).astype(np.float64), np.zeros((1, 32))])
    truth = fresh.error(groups, new)
    assert reported == pytest.approx(truth, rel=0.3)  # the error it claims is the error it has
    in_sample = Problem(w.astype(np.float64), None, folds[0].gram + folds[1].gram)
    overfit = in_sample.solve(groups, 1e-9)
    assert in_sample.error(groups, overfit) < 0.5 * fresh.error(groups, overfit)  # what it avoided


# ---------------------------------------------------------------- lossy chains

def _aligned_chain(rng, noise=0.02):
    """x -> MatMul(W1) + b -> Relu -> MatMul(W2) + b -> y, both weights 4 blocks on the same hidden
    grouping (permuted), plus small dense noise: linked lossy splits that line up."""
    from builders import chain_model, feature_wise, planted
    w1, _ = planted(rng, 64, 64, 4, permute=False)
    w2, _ = planted(rng, 64, 64, 4, permute=False)
    hidden = rng.permutation(64)
    w1, w2 = w1[:, hidden], w2[hidden]
    w1 = (w1 + noise * rng.standard_normal(w1.shape)).astype(np.float32)
    w2 = (w2 + noise * rng.standard_normal(w2.shape)).astype(np.float32)
    return chain_model([w1, w2], [[feature_wise("Relu", rng)]], ["batch", 64])


def test_linked_lossy_splits_are_partitioned_jointly_with_no_gather_between_them(tmp_path):
    rng = np.random.default_rng(15)
    model = _aligned_chain(rng)
    path = tmp_path / "cal.npz"
    np.savez(path, x=rng.standard_normal((300, 64)).astype(np.float32))
    base = dict(parts=4, calibration=str(path), bench=False, layout="parallel", min_elements=0, providers=("cpu",))
    joint = split_model(model, SplitConfig(**base))
    alone = split_model(model, SplitConfig(**base, chains=False))
    assert [len(c.sites) for c in joint.report.chains] == [2]
    assert joint.report.chains[0].boundary_gathers <= 2  # only at the chain's two ends
    assert joint.report.verification_passed and alone.report.verification_passed
    gathers = lambda m: sum(n.op_type == "Gather" for n in m.graph.node)  # noqa: E731
    assert gathers(joint.model) < gathers(alone.model)
    # every second-layer MatMul reads the output of one first-layer part only (through its Relu)
    producers = {o: n for n in joint.model.graph.node for o in n.output}
    second = [n for n in joint.model.graph.node if n.op_type == "MatMul" and
              any(x in producers and producers[x].op_type == "Relu" for x in n.input)]
    assert len(second) == 4
    assert joint.report.error.held_out <= 1.25 * alone.report.error.held_out + 1e-3


def test_a_joint_chain_does_not_refit_the_other_planned_sites_on_the_original_activations_again(tmp_path,
                                                                                                 monkeypatch):
    from onnx_split import lossy
    from builders import chain_model, feature_wise, planted
    rng = np.random.default_rng(16)
    weights = [(planted(rng, 32, 32, 4, permute=False)[0] + 0.02 * rng.standard_normal((32, 32))).astype(np.float32)
               for _ in range(3)]
    model = chain_model(weights, [[feature_wise("Relu", rng)], [feature_wise("Relu", rng)]], ["batch", 32])
    path = tmp_path / "cal.npz"
    np.savez(path, x=rng.standard_normal((200, 32)).astype(np.float32))
    monkeypatch.setattr(lossy, "MAX_CHAIN", 2)  # one chain of the first two layers; the third is another site
    opened = []
    fitter = lossy._Context.fitter
    monkeypatch.setattr(lossy._Context, "fitter", lambda self, i: opened.append(i) or fitter(self, i))
    result = split_model(model, SplitConfig(parts=4, calibration=str(path), bench=False, layout="parallel",
                                            min_elements=0, providers=("cpu",)))
    assert sorted(len(c.sites) for c in result.report.chains) == [1, 2]
    third = max(opened)
    assert opened.count(third) == 1  # its own plan, fitted once; the joint chain reused that fit
    assert all(opened.count(i) == 2 for i in set(opened) - {third})  # their own plans, then the joint layers


def test_a_joint_chain_that_would_raise_the_error_is_not_joined(tmp_path):
    # the plain digits MLP: 8 joint sub-networks would each see 8 of the 64 pixels
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    result = split_model(str(repo / "models" / "digits_mlp.onnx"),
                         SplitConfig(parts=8, calibration=str(repo / "models" / "digits_calibration.npz"),
                                     bench=False, layout="batched", verify=False))
    assert all(len(c.sites) == 1 for c in result.report.chains)
    assert any("not joined" in n for n in result.report.notes)


@pytest.mark.parametrize("best", range(4))
@pytest.mark.parametrize("start", [None, 1e-3, 1e-2, 1e-1, 1.0])
def test_the_damping_walk_finds_the_smallest_held_out_error_of_a_curve_that_falls_then_rises(best, start):
    from onnx_split.fitting import choose_damping
    from onnx_split.refit import DAMPINGS
    curve = {d: 1.0 + abs(n - best) + 0.1 * n for n, d in enumerate(DAMPINGS)}  # lowest at index ``best``
    tried = []
    damping, err = choose_damping(lambda d: tried.append(d) or curve[d], start)
    assert damping == DAMPINGS[best] and err == curve[damping]
    at = DAMPINGS.index(start) if start is not None else 0
    assert len(tried) == len(set(tried)) <= abs(at - best) + 3  # the start, a step the wrong way, one past
    if at == best:
        assert len(tried) == (2 if best in (0, len(DAMPINGS) - 1) else 3)


def test_a_refitted_plan_holds_only_the_entries_inside_its_blocks():
    from onnx_split.plans import planner_for
    from onnx_split.plans.blocks import KeptEntries
    rng = np.random.default_rng(31)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    plan = planner_for(np.abs(w).astype(np.float64), "metis", seed=0).for_parts(4)
    mask = plan.masks[0]
    fitted = np.where(mask, rng.standard_normal(w.shape), 0.0).astype(np.float32)
    held = plan.with_fit(((fitted, None),))
    assert isinstance(held.fitted[0][0], KeptEntries) and held.fitted[0][0].values.size == mask.sum() < w.size / 3
    np.testing.assert_array_equal(held.effective_weight(0, w), fitted)
    outside = fitted.copy()
    outside[~mask] = 1.0  # not a block plan's fit: kept whole, read back as it was
    np.testing.assert_array_equal(plan.with_fit(((outside, None),)).effective_weight(0, w), outside)


def test_calibration_runs_are_cut_to_what_their_captured_activations_allow(tmp_path, monkeypatch, caplog):
    """One sample's activations at every candidate site are measured; a run then holds no more
    samples than calibration.CAPTURE_BYTES allows, and the outcome is the same as in big runs."""
    import logging

    from onnx_split import calibration as calibration_module
    from onnx_split import pruned

    rng = np.random.default_rng(9)
    model, _ = _mlp(rng)
    cal = _calibration(tmp_path, rng)
    config = SplitConfig(parts=4, calibration=str(cal), bench=False, min_elements=0, providers=("cpu",),
                         layout="batched")  # split whatever the timings: the refit's outcome is compared
    sizes, real = [], pruned.Evaluator._run

    def spy(self, names, feeds, weights, biases):
        sizes.append(next(iter(feeds.values())).shape[0])
        return real(self, names, feeds, weights, biases)

    monkeypatch.setattr(pruned.Evaluator, "_run", spy)
    whole = split_model(model, config).report
    assert max(sizes) > 3
    per_sample = 64 * 4  # fc2's input, 64 floats a sample (fc1's is the graph input: fed, not captured)
    monkeypatch.setattr(calibration_module, "CAPTURE_BYTES", 3 * per_sample)
    sizes.clear()
    with caplog.at_level(logging.INFO, logger="onnx_split"):
        cut = split_model(model, config).report
    assert max(sizes) == 3
    assert "calibration runs of 3 samples, not 64" in caplog.text
    assert any(s.decision == "split" for s in whole.sites) and whole.error.held_out > 0
    assert cut.error.held_out == pytest.approx(whole.error.held_out, rel=1e-5)
    assert [s.retained for s in cut.sites] == pytest.approx([s.retained for s in whole.sites])
