"""The lossy side: calibration data, budgets, the tolerance search, activation-aware significance,
verification against the pruned model, --dry-run, and their errors (library and CLI)."""
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import (chain_model, low_rank_case, feature_wise, gemm_model, matmul_model, ort_run, planted,
                      two_input_model)
from onnx_split import InputError, SplitConfig, split_model, survey_model
from onnx_split.plans import planner_for
from onnx_split.calibration import load_calibration, random_calibration
from onnx_split.cli import main
from onnx_split.partition import exact_components
from onnx_split.pruned import masked, pruned_model, relative_error
from onnx_split.report import ErrorReport, SplitReport
from onnx_split.significance import magnitude
from onnx_split.sites import find_sites
from onnx_split.verify import VerificationEntry


# ---------------------------------------------------------------- helpers

def _noisy(rng, k, n, parts, noise=0.003):
    """Planted blocks plus small dense noise: every split drops something (lossy), nothing is zero."""
    w, _ = planted(rng, k, n, parts)
    return (w + noise * rng.standard_normal(w.shape)).astype(np.float32)


def _config(**kw):
    base = dict(layout="batched", bench=False, min_elements=0, providers=("cpu",))
    base.update(kw)
    return SplitConfig(**base)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _bad(tmp_path, capsys, argv, match, inputs=()):
    """Exit 2, one line on stderr naming the problem, no traceback, nothing written, inputs intact."""
    before = {p: _digest(p) for p in inputs}
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("onnx_split: error:"), err
    assert "Traceback" not in err and match in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert {p: _digest(p) for p in inputs} == before


def _save(model, path):
    onnx.save_model(model, str(path))
    return path


def _effective(model, names_k):
    """The effective weights of y = sum_i x_i @ W_i (no bias): feed the identity to one input at a
    time and zeros to the others. ``names_k``: {input name: K}."""
    out = {}
    for name, k in names_k.items():
        feeds = {other: np.zeros((k, kk), np.float32) for other, kk in names_k.items()}
        feeds[name] = np.eye(k, dtype=np.float32)
        out[name] = ort_run(model, feeds)[0]
    return out


def _site(report, node):
    return next(s for s in report.sites if s.node == node)


# ---------------------------------------------------------------- 1. calibration errors

@pytest.fixture
def models(tmp_path):
    rng = np.random.default_rng(0)
    w, _ = planted(rng, 64, 64, 4)
    return {"one": _save(matmul_model(w, ["batch", 64]), tmp_path / "one.onnx"),
            "two": _save(two_input_model(w, w), tmp_path / "two.onnx"),
            "fixed": _save(matmul_model(w, [4, 64]), tmp_path / "fixed.onnx")}


_F = np.float32
CALIBRATION_ERRORS = {
    "missing": ("one", None, "--calibration file not found"),
    "text": ("one", "text", "is not a readable .npz file (numpy.savez output, one array per graph input): it is not "
                            "a zip archive (an .npz is one)"),  # (not numpy's word on pickles)
    "npy": ("one", "npy", "a single .npy array, not an .npz archive of named arrays"),
    "wrong name": ("one", {"y": np.zeros((8, 64), _F)}, "has no array named 'x'"),
    "extra array": ("one", {"x": np.zeros((8, 64), _F), "z": np.zeros((8, 3), _F)}, "not graph inputs: z"),
    "float64": ("one", {"x": np.zeros((8, 64), np.float64)}, "'x' has dtype float64, the model wants float32"),
    "feature shape": ("one", {"x": np.zeros((8, 63), _F)}, "'x' has shape [8, 63]"),
    "rank": ("one", {"x": np.zeros((8, 2, 64), _F)}, "'x' has shape [8, 2, 64]"),
    "counts disagree": ("two", {"x1": np.zeros((8, 64), _F), "x2": np.zeros((7, 64), _F)},
                        "disagree on the number of samples: [7, 8]"),
    "one sample": ("one", {"x": np.zeros((1, 64), _F)}, "at least 2 samples"),
    "fixed first dim": ("fixed", {"x": np.zeros((10, 64), _F)}, "dynamic first (batch) dim, but it is fixed at 4"),
}


def _calibration_file(tmp_path, content):
    path = tmp_path / "cal.npz"
    if content == "text":
        path.write_text("these are not the samples you are looking for\n" * 20)
    elif content == "npy":
        with open(path, "wb") as f:  # np.save to an open file keeps the .npz name
            np.save(f, np.zeros((8, 64), _F))
    elif content is not None:
        np.savez(path, **content)
    return path


@pytest.mark.parametrize("case", list(CALIBRATION_ERRORS))
def test_bad_calibration_file_is_a_one_line_input_error(tmp_path, models, case):
    which, content, match = CALIBRATION_ERRORS[case]
    path = _calibration_file(tmp_path, content)
    model = onnx.load(str(models[which]))
    with pytest.raises(InputError) as info:
        load_calibration(path, model)
    assert match in str(info.value) and "\n" not in str(info.value)
    # and through split_model, which loads it before anything else is done
    with pytest.raises(InputError, match=re.escape(match)):
        split_model(model, _config(keep=0.9, calibration=str(path)))


@pytest.mark.parametrize("case", list(CALIBRATION_ERRORS))
def test_bad_calibration_file_via_the_cli_exits_2_and_writes_nothing(tmp_path, capsys, models, case):
    which, content, match = CALIBRATION_ERRORS[case]
    path = _calibration_file(tmp_path, content)
    inputs = [models[which]] + ([path] if path.exists() else [])
    _bad(tmp_path, capsys, [models[which], tmp_path / "o.onnx", "--keep", "0.9", "--calibration", path,
                            "--min-elements", "0", "--no-bench", "--layout", "batched"], match, inputs)


def test_bad_calibration_file_in_a_dry_run_exits_2(tmp_path, capsys, models):
    path = _calibration_file(tmp_path, {"x": np.zeros((8, 63), _F)})
    _bad(tmp_path, capsys, [models["one"], "--dry-run", "--calibration", path, "--min-elements", "0"],
         "'x' has shape [8, 63]", [models["one"], path])


def test_fixed_first_dim_is_refused_even_when_the_sample_count_matches(tmp_path, models):
    path = _calibration_file(tmp_path, {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(_F)})
    model = onnx.load(str(models["fixed"]))
    with pytest.raises(InputError, match="dynamic batch dim"):
        split_model(model, _config(keep=0.9, calibration=str(path)))


def _batch_one_model():
    """x[batch, 64] @ W -> Reshape to [1, 64]: runs at batch 1 (what verification feeds) only."""
    w, _ = planted(np.random.default_rng(0), 64, 64, 4)
    f = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["h"], name="fc1"),
         onnx.helper.make_node("Reshape", ["h", "shape"], ["y"], name="flat")], "g",
        [onnx.helper.make_tensor_value_info("x", f, ["batch", 64])], [onnx.helper.make_tensor_value_info("y", f, [1, 64])],
        [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(np.array([1, 64], np.int64), "shape")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def test_batch_one_model_splits_losslessly_and_without_verification():
    model = _batch_one_model()
    assert split_model(model, _config()).report.verification_passed is True
    assert split_model(model, _config(keep=0.9, verify=False)).report.sites[0].decision == "split"


def test_unneeded_error_measurement_failing_does_not_abort_the_split():
    """With --keep the error is measured for the report only: a model that cannot run on the random
    samples gets a note, not an abort."""
    result = split_model(_batch_one_model(), _config(keep=0.9))
    assert result.report.sites[0].decision == "split" and result.report.verification_passed is True
    assert result.report.error is None
    assert any("output error was not measured" in n for n in result.report.notes)


def test_tolerance_without_calibration_needs_a_dynamic_batch_dim(tmp_path, capsys, models):
    model = onnx.load(str(models["fixed"]))
    with pytest.raises(InputError, match="--tolerance needs calibration samples.*'x' has it fixed at 4"):
        split_model(model, _config(tolerance=0.1))
    with pytest.raises(InputError, match="--score activation needs calibration samples"):
        split_model(model, _config(keep=0.9, score="activation"))
    _bad(tmp_path, capsys, [models["fixed"], tmp_path / "o.onnx", "--tolerance", "0.1", "--min-elements", "0",
                            "--no-bench"], "need every graph input to have a dynamic first", [models["fixed"]])


# ---------------------------------------------------------------- 2. the search / held-out split

def _ids_model(k=4):
    w = np.ones((k, 3), np.float32)
    return two_input_model(w, w)


@pytest.mark.parametrize("n,holdout", [(2, 0.25), (2, 0.99), (3, 0.5), (10, 0.01), (10, 0.99), (10, 0.25),
                                       (200, 0.25), (200, 0.1)])
def test_calibration_split_is_a_disjoint_cover_of_the_expected_size(tmp_path, n, holdout):
    ids = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)
    path = tmp_path / "ids.npz"
    np.savez(path, x1=ids, x2=-ids)
    cal = load_calibration(path, _ids_model(), holdout=holdout, seed=7)
    search, held = cal.search["x1"][:, 0].astype(int), cal.held_out["x1"][:, 0].astype(int)
    assert len(set(search) & set(held)) == 0
    assert sorted(set(search) | set(held)) == list(range(n))
    assert held.size == min(n - 1, max(1, math.ceil(holdout * n)))
    assert cal.n_held_out == held.size and cal.n_search == search.size == n - held.size
    # whole samples move together: every input's rows are the same samples, in their original order
    for part in (cal.search, cal.held_out):
        np.testing.assert_array_equal(part["x2"], -part["x1"])
        assert np.all(np.diff(part["x1"][:, 0]) > 0)
        np.testing.assert_array_equal(part["x1"], ids[part["x1"][:, 0].astype(int)])
    plural = "s" if search.size != 1 else ""
    assert f"{search.size} sample{plural} searched, {held.size} held out" in cal.source


def test_calibration_split_is_deterministic_by_seed(tmp_path):
    n = 200
    ids = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)
    path = tmp_path / "ids.npz"
    np.savez(path, x1=ids, x2=ids)
    held = lambda seed: tuple(load_calibration(path, _ids_model(), seed=seed).held_out["x1"][:, 0])
    assert held(3) == held(3)
    assert len({held(s) for s in range(4)}) == 4  # other seeds, other held-out samples


def test_random_calibration_stands_in_and_says_so():
    rng = np.random.default_rng(0)
    model = matmul_model(_noisy(rng, 32, 32, 2), ["batch", 32])
    cal = random_calibration(model, {}, holdout=0.25, seed=1, samples=40)
    assert cal.random and cal.n_search == 30 and cal.n_held_out == 10
    assert "seeded random inputs" in cal.source and "--calibration" in cal.source
    again = random_calibration(model, {}, holdout=0.25, seed=1, samples=40)
    np.testing.assert_array_equal(cal.held_out["x"], again.held_out["x"])


# ---------------------------------------------------------------- 3. budgets

@pytest.fixture(scope="module")
def two_sites():
    """y = x1 @ W1 + x2 @ W2: two noisy planted weights (8 and 4 blocks), no bias, so the effective
    weights of any rewrite can be read back by feeding the identity."""
    rng = np.random.default_rng(11)
    w1, w2 = _noisy(rng, 256, 256, 8), _noisy(rng, 128, 256, 4)
    return two_input_model(w1, w2), {"fc1": w1, "fc2": w2}, {"fc1": "x1", "fc2": "x2"}


def _read_back(result, weights, inputs):
    eff = _effective(result.model, {inputs[node]: w.shape[0] for node, w in weights.items()})
    return {node: eff[inputs[node]] for node in weights}


KEEP = {"metis": 0.9, "spectral": 0.9, "random": 0.3, "tiles": 0.8}


@pytest.mark.parametrize("partitioner", list(KEEP))
def test_keep_budget_keeps_at_least_that_much_and_takes_the_cheapest_plan(two_sites, partitioner):
    model, weights, inputs = two_sites
    keep = KEEP[partitioner]
    layout = "parallel" if partitioner == "tiles" else "batched"
    result = split_model(model, _config(partitioner=partitioner, keep=keep, layout=layout, tile=32, refit=False))
    report = result.report
    assert report.verification_passed is True
    split = [s for s in report.sites if s.decision == "split"]
    assert split, [s.reason for s in report.sites]
    eff = _read_back(result, weights, inputs)
    for rep in split:
        w = weights[rep.node]
        assert rep.partitioner == partitioner and rep.score == "magnitude"
        assert rep.retained >= keep
        # the retained figure is what the written model really keeps, by magnitude
        kept = eff[rep.node] != 0
        np.testing.assert_array_equal(eff[rep.node], masked(w, kept))
        assert np.abs(w)[kept].sum() / np.abs(w).sum() == pytest.approx(rep.retained, rel=1e-6)
        planner = planner_for(magnitude(w), partitioner, tile=32, seed=0, max_parts=16)
        option = planner.for_keep(keep)
        assert option.retained == pytest.approx(rep.retained)
        if partitioner == "tiles":
            count = int(option.label.split()[0])
            assert count == 1 or planner.at(count - 1).retained < keep  # one tile fewer would not keep enough
        else:
            g = rep.parts
            assert option.label == f"{g} {partitioner} parts"
            assert g + 1 > planner.max_parts or planner.at(g + 1).retained < keep  # one more part would not


@pytest.mark.parametrize("partitioner", list(KEEP))
def test_flops_budget_is_never_exceeded(two_sites, partitioner):
    model, weights, inputs = two_sites
    flops = 0.3
    layout = "parallel" if partitioner == "tiles" else "batched"
    result = split_model(model, _config(partitioner=partitioner, flops=flops, layout=layout, tile=32))
    report = result.report
    assert report.verification_passed is True
    split = [s for s in report.sites if s.decision == "split"]
    assert {s.node for s in split} == {"fc1", "fc2"}, [s.reason for s in report.sites]
    eff = _read_back(result, weights, inputs)
    for rep in split:
        w = weights[rep.node]
        k, n = w.shape
        assert sum(r * c for r, c in rep.part_shapes) / (k * n) <= flops
        assert np.count_nonzero(eff[rep.node]) / (k * n) <= flops  # the weights the written model computes
        planner = planner_for(magnitude(w), partitioner, tile=32, seed=0, max_parts=16)
        option = planner.for_flops(flops)
        assert option.flops <= flops and option.retained == pytest.approx(rep.retained)
        if partitioner == "tiles":
            count = int(option.label.split()[0])
            assert count + 1 >= planner.n_tiles or planner.at(count + 1).flops > flops  # the most tiles that fit
        else:
            g = rep.parts
            assert g == 2 or planner.at(g - 1).flops > flops  # the fewest parts that fit


@pytest.mark.parametrize("partitioner", ["metis", "spectral", "random"])
@pytest.mark.parametrize("parts", [2, 4, 8])
def test_parts_budget_gives_exactly_that_many_independent_blocks(two_sites, partitioner, parts):
    model, weights, inputs = two_sites
    result = split_model(model, _config(partitioner=partitioner, parts=parts))
    assert result.report.verification_passed is True
    eff = _read_back(result, weights, inputs)
    for rep in result.report.sites:
        assert rep.decision == "split" and rep.parts == parts and len(rep.part_shapes) == parts
        # the written model's weights really fall apart into that many blocks, of balanced sizes
        assert exact_components(eff[rep.node], 0.0, max_parts=64).n_components == parts
        k, n = weights[rep.node].shape
        assert {r for r, _ in rep.part_shapes} <= {k // parts, -(-k // parts)}
        assert {c for _, c in rep.part_shapes} <= {n // parts, -(-n // parts)}


def test_parts_beyond_max_parts_are_clamped(two_sites):
    model, _, _ = two_sites
    result = split_model(model, _config(parts=8, max_parts=4))
    assert [s.parts for s in result.report.sites] == [4, 4]


# ---------------------------------------------------------------- 4. --tolerance

@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A 256 -> 256 -> 128 MLP of noisy planted weights, and 200 normal calibration samples."""
    rng = np.random.default_rng(5)
    model = chain_model([_noisy(rng, 256, 256, 8), _noisy(rng, 256, 128, 4)],
                        [[feature_wise("Relu", rng)]], ["batch", 256])
    path = tmp_path_factory.mktemp("cal") / "cal.npz"
    np.savez(path, x=rng.standard_normal((200, 256)).astype(np.float32))
    return model, path


def _saved(report):
    return sum(s.flops_before - s.flops_after for s in report.sites if s.decision == "split")


def _rel(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_tolerance_is_met_and_the_error_figures_are_real(mlp):
    model, path = mlp
    tol = 0.05
    result = split_model(model, _config(tolerance=tol, calibration=str(path), layout="parallel"))
    report, error = result.report, result.report.error
    assert report.n_split >= 1 and report.verification_passed is True
    assert error.tolerance == tol and error.search <= tol and error.search > 0
    assert error.search_samples == 150 and error.held_out_samples == 50 and error.evaluations > 0
    assert error.met == (error.held_out <= tol)
    assert "cal.npz: 150 samples searched, 50 held out" in error.data
    assert all(s.score == "activation" for s in report.sites if s.decision == "split")
    # recompute: the original and the written model in ORT on the very samples of each part
    cal = load_calibration(path, model, holdout=0.25, seed=0)
    for feeds, figure in ((cal.held_out, error.held_out), (cal.search, error.search)):
        ref, got = ort_run(model, feeds)[0], ort_run(result.model, feeds)[0]
        assert _rel(ref, got) == pytest.approx(figure, rel=1e-4)
    line = next(l for l in report.to_text().splitlines() if l.startswith("relative output error"))
    assert "on 50 held-out samples" in line and "met on held-out data" in line
    data = json.loads(report.to_json())["error"]
    assert data["held_out"] == pytest.approx(error.held_out) and data["met"] == error.met


def test_tolerance_zero_on_a_noisy_model_splits_nothing(mlp):
    model, path = mlp
    result = split_model(model, _config(tolerance=0.0, calibration=str(path)))
    report = result.report
    assert report.n_split == 0 and not report.modified
    assert report.error.search == 0 and report.error.held_out == 0 and report.error.met is True
    assert all("--tolerance 0" in s.reason for s in report.sites)
    # nothing was split: no reason says the budget went elsewhere
    assert all("more than the tolerance" in s.reason and "budget went" not in s.reason for s in report.sites)
    ref = ort_run(model, {"x": np.ones((2, 256), np.float32)})[0]
    np.testing.assert_array_equal(ort_run(result.model, {"x": np.ones((2, 256), np.float32)})[0], ref)


def test_a_larger_tolerance_saves_more(mlp):
    model, path = mlp
    small = split_model(model, _config(tolerance=0.02, calibration=str(path), layout="parallel")).report
    large = split_model(model, _config(tolerance=0.5, calibration=str(path), layout="parallel")).report
    assert 0 < _saved(small) < _saved(large)
    assert small.error.search <= 0.02 and large.error.search <= 0.5
    assert small.error.search < large.error.search


def test_without_calibration_the_report_says_seeded_random_inputs(mlp):
    model, _ = mlp
    report = split_model(model, _config(tolerance=0.05)).report
    assert "seeded random inputs" in report.error.data and report.error.met is not None
    assert all(s.score == "magnitude" for s in report.sites if s.decision == "split")
    assert "seeded random inputs" in report.to_text()


# ---------------------------------------------------------------- 5. verification against the pruned model

@pytest.mark.parametrize("kind", ["matmul", "gemm_transb"])
@pytest.mark.parametrize("layout", ["parallel", "batched"])
def test_lossy_result_is_the_pruned_model_not_the_original(kind, layout):
    rng = np.random.default_rng(3)
    w = _noisy(rng, 256, 192, 4)
    if kind == "matmul":
        model, x = matmul_model(w, ["batch", 256]), {"x": rng.standard_normal((5, 256)).astype(np.float32)}
    else:
        model = gemm_model(w, 5, trans_b=1, alpha=0.5, beta=2.0, c_shape=(192,))
        x = {"a": rng.standard_normal((5, 256)).astype(np.float32)}
    result = split_model(model, _config(parts=4, layout=layout, refit=False))
    report = result.report
    assert report.sites[0].decision == "split" and report.sites[0].parts == 4
    assert report.verification and all(v.passed for v in report.verification)
    assert {v.optimization for v in report.verification} >= {"disabled", "enabled"}
    assert report.verification_passed is True
    if kind == "matmul":
        assert "against the pruned original (dropped weights zeroed)" in report.to_text()
    sites = find_sites(model, min_elements=0)
    mask = planner_for(magnitude(sites[0].weight), "metis", seed=0).for_parts(4).masks[0]
    pruned = pruned_model(model, sites, {0: mask})
    original = ort_run(model, x)[0]
    for opt in ("disabled", "enabled"):
        got = ort_run(result.model, x, opt)[0]
        np.testing.assert_allclose(got, ort_run(pruned, x, opt)[0], rtol=1e-5, atol=1e-5)
        assert relative_error([original], [got]) > 1e-3  # lossy: not the original


def test_the_pruned_model_drops_the_branch_weight_it_replaced_and_computes_the_masked_weights():
    from builders import if_model
    rng = np.random.default_rng(31)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    model = if_model(w, 3, 2.0)  # W read by the then-branch from the outer graph; V the else-branch's own
    before = model.SerializeToString()
    sites = find_sites(model, min_elements=0)
    masks = {i: rng.random(s.weight.shape) < 0.5 for i, s in enumerate(sites)}
    pruned = pruned_model(model, sites, masks)
    assert model.SerializeToString() == before  # the input is not touched
    branches = {a.name: a.g for a in pruned.graph.node[0].attribute}
    then_g, else_g = branches["then_branch"], branches["else_branch"]
    assert [t.name for t in pruned.graph.initializer] == ["W"]  # an outer graph's weight stays where it is
    at = {s.name: i for i, s in enumerate(sites)}
    assert [t.name for t in then_g.initializer] == [f"onnx_split.weight.{at['then_fc']}"]
    assert [t.name for t in else_g.initializer] == [f"onnx_split.weight.{at['else_fc']}"]  # V is gone
    x = rng.standard_normal((3, 16)).astype(np.float32)
    for cond, i in ((True, at["then_fc"]), (False, at["else_fc"])):
        (got,) = ort_run(pruned, {"cond": np.array(cond), "x": x})
        np.testing.assert_allclose(got, x @ masked(sites[i].weight, masks[i]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 6. activation-aware significance

@pytest.fixture(scope="module")
def quiet_features(tmp_path_factory):
    """x @ W, 128 x 128. Features 0..63 are ~0 in the data but carry huge weights in a 2-block pattern
    (rows 0..31 -> cols 0..31 and 64..95; rows 32..63 -> the rest); features 64..127 are loud, with
    moderate weights in the other 2-block pattern (rows 64..95 -> cols 0..63; rows 96..127 -> 64..127)."""
    rng = np.random.default_rng(21)
    w = 0.01 * rng.standard_normal((128, 128))
    a, b = np.r_[0:32, 64:96], np.r_[32:64, 96:128]
    w[np.ix_(np.arange(0, 32), a)] = 10 * (1 + rng.random((32, 64)))
    w[np.ix_(np.arange(32, 64), b)] = 10 * (1 + rng.random((32, 64)))
    loud = np.zeros((128, 128), bool)
    loud[64:96, 0:64] = loud[96:128, 64:128] = True
    w[loud] = 1 + rng.random(int(loud.sum()))
    w = w.astype(np.float32)
    x = rng.standard_normal((200, 128))
    x[:, :64] *= 1e-4
    path = tmp_path_factory.mktemp("quiet") / "cal.npz"
    np.savez(path, x=x.astype(np.float32))
    return matmul_model(w, ["batch", 128]), w, loud, path


def test_activation_score_drops_the_connections_of_quiet_features(quiet_features):
    model, w, loud, path = quiet_features
    by = {}
    for score in ("activation", "magnitude"):
        result = split_model(model, _config(parts=2, calibration=str(path), score=score))
        rep = result.report.sites[0]
        assert rep.decision == "split" and rep.score == score and rep.partitioner == "metis"
        eff = ort_run(result.model, {"x": np.eye(128, dtype=np.float32)})[0]
        by[score] = (rep, eff != 0, result.report.error)
    rep, kept, error = by["activation"]
    assert kept[loud].all()  # every heavy weight of a loud feature is kept
    cal = load_calibration(path, model)
    scores = np.abs(w.astype(np.float64)) * np.linalg.norm(cal.search["x"].astype(np.float64), axis=0)[:, None]
    assert scores[kept].sum() / scores.sum() == pytest.approx(rep.retained, rel=1e-6)
    assert rep.retained > 0.99
    _, kept_m, error_m = by["magnitude"]
    assert kept_m[loud].mean() < 0.75  # magnitude follows the quiet features' huge weights instead
    assert error.held_out < 0.05 < error_m.held_out


def test_auto_score_is_activation_with_calibration_only(quiet_features):
    model, _, _, path = quiet_features
    assert SplitConfig(parts=2).resolved_score == "magnitude"
    assert SplitConfig(parts=2, calibration=str(path)).resolved_score == "activation"
    rep = split_model(model, _config(parts=2, calibration=str(path))).report.sites[0]
    assert rep.score == "activation"


def _norms(model, feeds, batch=64):
    from onnx_split import fitting
    from onnx_split.pruned import Evaluator
    sites = find_sites(model, min_elements=0)
    evaluator = Evaluator(model, sites, [0, *range(1, len(sites))], capture=tuple(s.activation for s in sites))
    n = next(iter(feeds.values())).shape[0]
    batches = [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]
    found = fitting.collect(evaluator, sites, list(range(len(sites))), batches)
    return [found[(s.activation, s.trans_a)].norms for s in sites]


def test_feature_norms_are_the_norms_of_each_sites_input_summed_batch_by_batch():
    rng = np.random.default_rng(8)
    w0, w1 = _noisy(rng, 64, 48, 2), _noisy(rng, 48, 32, 2)
    model = chain_model([w0, w1], [[feature_wise("Relu", rng)]], ["batch", 64])
    x = rng.standard_normal((30, 64)).astype(np.float32)
    norms = _norms(model, {"x": x}, batch=7)
    np.testing.assert_allclose(norms[0], np.linalg.norm(x.astype(np.float64), axis=0), rtol=1e-6)
    b0 = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "b0")
    h = np.maximum(x.astype(np.float64) @ w0 + b0, 0)
    np.testing.assert_allclose(norms[1], np.linalg.norm(h, axis=0), rtol=1e-4)
    np.testing.assert_allclose(_norms(model, {"x": x}, batch=64)[1], norms[1], rtol=1e-9)


@pytest.mark.parametrize("kind", ["3d", "trans_a"])
def test_feature_norms_reduce_every_axis_but_the_feature_axis(kind):
    rng = np.random.default_rng(9)
    w = _noisy(rng, 64, 32, 2)
    if kind == "3d":
        model, x = matmul_model(w, ["batch", 5, 64]), rng.standard_normal((3, 5, 64)).astype(np.float32)
        feeds, want = {"x": x}, np.linalg.norm(x.reshape(-1, 64).astype(np.float64), axis=0)
    else:
        model, x = gemm_model(w, 7, trans_a=1), rng.standard_normal((64, 7)).astype(np.float32)
        feeds, want = {"a": x}, np.linalg.norm(x.astype(np.float64), axis=1)
    np.testing.assert_allclose(_norms(model, feeds)[0], want, rtol=1e-6)


# ---------------------------------------------------------------- 7. --dry-run

@pytest.fixture
def exact_blocks(tmp_path):
    w, _ = planted(np.random.default_rng(4), 256, 256, 8)
    return _save(matmul_model(w, ["batch", 256]), tmp_path / "blocks.onnx")


_CELL = re.compile(r"([\d.]+)% / ([\d.]+)%")


def _table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """The dry run's header cells and {site: row cells} (cells split on two or more spaces)."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("site "))
    header = re.split(r"\s{2,}", lines[at].strip())
    rows = {}
    for line in lines[at + 1:]:
        if not line or line.startswith("not candidates"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return header, rows


def _levels(cells: list[str]) -> list[tuple[float, float]]:
    return [tuple(map(float, _CELL.fullmatch(c).groups())) for c in cells[3:] if c != "-"]


def test_dry_run_prints_every_level_and_writes_nothing(tmp_path, capsys, exact_blocks):
    before = _digest(exact_blocks)
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, exact_blocks, "--dry-run", "--min-elements", "0")
    assert code == 0 and err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == listing and _digest(exact_blocks) == before
    assert "nothing written" in out.splitlines()[0] and "metis partitioner" in out.splitlines()[0]
    header, rows = _table(out)
    assert header == ["site", "shape", "significance", "2 parts", "4 parts", "8 parts", "16 parts"]
    cells = rows["fc1"]
    assert cells[1] == "256x256" and cells[2] == "magnitude"
    levels = _levels(cells)
    assert len(levels) == 4
    kept = [r for r, _ in levels]
    assert kept[:3] == [100.0, 100.0, 100.0] and kept[3] < 100.0  # 8 exact planted blocks fit 8 parts
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    flops = [f for _, f in levels]
    assert flops[:3] == [50.0, 25.0, 12.5] and flops[3] < flops[2]


def test_dry_run_of_a_noisy_model_keeps_less_with_more_parts(tmp_path, capsys):
    src = _save(matmul_model(_noisy(np.random.default_rng(4), 256, 256, 8), ["batch", 256]), tmp_path / "n.onnx")
    code, out, _ = _run(capsys, src, "--dry-run", "--min-elements", "0")
    kept = [r for r, _ in _levels(_table(out)[1]["fc1"])]
    assert code == 0 and len(kept) == 4 and all(r < 100.0 for r in kept)
    assert all(a >= b for a, b in zip(kept, kept[1:]))


def test_dry_run_with_tiles_shows_tile_levels(tmp_path, capsys, exact_blocks):
    code, out, _ = _run(capsys, exact_blocks, "--dry-run", "--partitioner", "tiles", "--min-elements", "0")
    header, rows = _table(out)
    assert code == 0 and "tiles partitioner" in out and "64x64 tiles" in out
    assert header[3:] == ["1/2 of tiles", "1/4 of tiles", "1/8 of tiles", "1/16 of tiles"]
    # 16 tiles of 64x64: 8, 4, 2 and 1 kept; the kept tiles' area is that share of the FLOPs
    # (outputs no kept tile feeds ride along as zero columns of one part, so at least that)
    flops = [f for _, f in _levels(rows["fc1"])]
    assert all(f >= share for f, share in zip(flops, (50.0, 25.0, 12.5, 6.25)))
    code, out, _ = _run(capsys, exact_blocks, "--dry-run", "--partitioner", "tiles", "--tile", "32",
                        "--min-elements", "0")
    assert code == 0 and "32x32 tiles" in out and len(_levels(_table(out)[1]["fc1"])) == 4


def test_dry_run_with_calibration_uses_activation_significance(tmp_path, capsys, exact_blocks):
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(0).standard_normal((20, 256)).astype(np.float32))
    code, out, _ = _run(capsys, exact_blocks, "--dry-run", "--calibration", cal, "--min-elements", "0")
    assert code == 0 and _table(out)[1]["fc1"][2] == "activation"


def test_dry_run_reports_kept_sites_with_their_reason(tmp_path, capsys, exact_blocks):
    code, out, _ = _run(capsys, exact_blocks, "--dry-run")  # default --min-elements 4096 < 256 * 256
    assert code == 0 and "fc1" in _table(out)[1]
    code, out, _ = _run(capsys, exact_blocks, "--dry-run", "--min-elements", "100000")
    assert code == 0 and "no site can be split" in out and "fc1  256x256  kept:" in out


def test_dry_run_with_an_output_path_is_an_error(tmp_path, capsys, exact_blocks):
    _bad(tmp_path, capsys, [exact_blocks, tmp_path / "o.onnx", "--dry-run"], "--dry-run writes nothing",
         [exact_blocks])


# ---------------------------------------------------------------- 8. option validation

BAD_OPTIONS = [
    (["--partitioner", "components", "--parts", "4"], "--partitioner components is exact and lossless"),
    (["--threshold", "0.1", "--keep", "0.9"], "--threshold applies to the exact partitioner"),
    (["--parts", "4", "--keep", "0.5"], "give one budget, not --parts and --keep"),
    (["--flops", "0.5", "--tolerance", "0.1"], "give one budget, not --flops and --tolerance"),
    (["--keep", "0"], "--keep must be a fraction in (0, 1]"),
    (["--keep", "1.5"], "--keep must be a fraction in (0, 1]"),
    (["--keep", "nan"], "--keep must be a fraction in (0, 1]"),
    (["--flops", "0"], "--flops must be a fraction in (0, 1]"),
    (["--flops", "2"], "--flops must be a fraction in (0, 1]"),
    (["--parts", "0"], "--parts must be >= 1"),
    (["--tolerance", "-0.1"], "--tolerance must be >= 0"),
    (["--tolerance", "nan"], "--tolerance must be >= 0"),
    (["--holdout", "1", "--keep", "0.5"], "--holdout must be a fraction in (0, 1)"),
    (["--holdout", "0", "--keep", "0.5"], "--holdout must be a fraction in (0, 1)"),
    (["--tile", "0", "--keep", "0.5"], "--tile must be >= 1"),
    (["--search-seconds", "5"], "--search-seconds limits the --tolerance search: give --tolerance E too"),
    (["--search-seconds", "5", "--parts", "4"], "--search-seconds limits the --tolerance search"),
    (["--partitioner", "metis"], "give a budget"),
    (["--partitioner", "tiles"], "give a budget"),
    (["--partitioner", "tiles", "--parts", "4"], "--parts does not apply to --partitioner tiles"),
    (["--partitioner", "magic", "--keep", "0.5"], "invalid choice"),
    (["--score", "loud", "--keep", "0.5"], "invalid choice"),
]


@pytest.mark.parametrize("argv,match", BAD_OPTIONS)
def test_bad_lossy_options_exit_2_with_one_line(tmp_path, capsys, exact_blocks, argv, match):
    _bad(tmp_path, capsys, [exact_blocks, tmp_path / "o.onnx", "--no-bench", "--layout", "batched", *argv], match,
         [exact_blocks])


@pytest.mark.parametrize("kwargs,match", [
    (dict(parts=4, keep=0.5), "give one budget"),
    (dict(keep=0.0), "--keep must be a fraction"),
    (dict(keep=1.5), "--keep must be a fraction"),
    (dict(partitioner="tiles", parts=2), "--parts does not apply"),
    (dict(score="loud"), "--score must be one of"),
    (dict(partitioner="magic"), "--partitioner must be one of"),
])
def test_bad_lossy_config_raises_input_error(kwargs, match):
    with pytest.raises(InputError, match=re.escape(match)):
        SplitConfig(**kwargs)


def test_a_lossy_partitioner_without_a_budget_is_refused_by_the_library():
    model = matmul_model(_noisy(np.random.default_rng(0), 64, 64, 2), ["batch", 64])
    for partitioner in ("metis", "spectral", "random", "tiles"):
        with pytest.raises(InputError, match="give a budget"):
            split_model(model, _config(partitioner=partitioner))


def test_a_budget_alone_picks_metis_and_names_the_budget():
    config = SplitConfig(keep=0.5)
    assert config.partitioner == "metis" and config.lossy and config.budget == "--keep 0.5"
    assert SplitConfig().lossy is False and SplitConfig().budget is None


# ---------------------------------------------------------------- 9. a tolerance not met on held-out data

def _split_probe(tmp_path, model, n):
    """Which of n samples load_calibration holds out (seed 0, holdout 0.25), read back by sample id."""
    probe = tmp_path / "probe.npz"
    np.savez(probe, x=np.repeat(np.arange(n, dtype=np.float32)[:, None], 128, axis=1))
    held = load_calibration(probe, model).held_out["x"][:, 0].astype(int)
    probe.unlink()
    return held


@pytest.fixture
def unmet(tmp_path):
    """4 exact planted blocks plus huge dense weights on features 0..31, which are exactly 0 in every
    search sample but not in the held-out ones: the search sees no error at 4 parts, held-out data does."""
    rng = np.random.default_rng(12)
    w, _ = planted(rng, 128, 128, 4)
    w[:32] += 3 * rng.standard_normal((32, 128)).astype(np.float32)
    model = matmul_model(w, ["batch", 128])
    src = _save(model, tmp_path / "in.onnx")
    n = 40
    held = _split_probe(tmp_path, model, n)
    x = rng.standard_normal((n, 128)).astype(np.float32)
    search = np.setdiff1d(np.arange(n), held)
    x[search, :32] = 0
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=x)
    return src, cal


def test_tolerance_not_met_on_held_out_data_exits_1_and_writes_nothing(tmp_path, capsys, unmet):
    src, cal = unmet
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    argv = [src, out, "--tolerance", "0.05", "--calibration", cal, "--min-elements", "0", "--no-bench",
            "--layout", "batched", "--report", rep]
    code, stdout, err = _run(capsys, *argv)
    assert code == 1 and not out.exists()
    assert "NOT MET on held-out data" in stdout
    assert "--tolerance 0.05 NOT MET on held-out data" in err and "Traceback" not in err
    assert f"wrote {rep}" in stdout and "the model not written (use --force to write it anyway)" in err  # the report was
    data = json.loads(rep.read_text())
    assert data["error"]["met"] is False and data["error"]["search"] <= 0.05 < data["error"]["held_out"]
    assert data["verification_passed"] is False and data["written"] is False
    assert all(v["passed"] for v in data["verification"])  # the rewrite does compute the pruned model
    assert data["sites"][0]["decision"] == "split"
    rep.unlink()
    code, _, err = _run(capsys, *argv, "--force")
    assert code == 1 and out.exists() and "anyway (--force)" in err
    assert json.loads(rep.read_text())["written"] is True


def _report_with(met):
    report = SplitReport(version="x", config={})
    report.checker = {"passed": True}
    report.verification = [VerificationEntry(provider="CPUExecutionProvider", optimization="disabled",
                                             status="passed", passed=True)]
    report.error = ErrorReport("cal.npz", 0.01, 0.2, 30, 10, 0.1 if met is not None else None, met)
    return report


def test_an_unmet_tolerance_fails_the_report():
    assert _report_with(False).verification_passed is False
    assert _report_with(True).verification_passed is True
    assert _report_with(None).verification_passed is True
    assert "NOT MET" in _report_with(False).to_text() and "NOT MET" not in _report_with(True).to_text()


# ---------------------------------------------------------------- 10. the written model

@pytest.mark.parametrize("layout", ["parallel", "batched", "function"])
def test_lossy_model_passes_the_full_checker_and_keeps_ir_and_opset(layout):
    rng = np.random.default_rng(13)
    ir, opset = (8, 17) if layout == "function" else (7, 13)
    model = matmul_model(_noisy(rng, 256, 256, 8), ["batch", 256], opset=opset, ir_version=ir)
    result = split_model(model, _config(keep=0.9, layout=layout))
    out = result.model
    assert result.report.sites[0].decision == "split", result.report.sites[0].reason
    assert result.report.checker == {"passed": True, "error": None}
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == ir
    assert {o.domain: o.version for o in out.opset_import}[""] == opset
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    names = [n.name for n in out.graph.node]
    assert all(names) and len(set(names)) == len(names)
    meta = {p.key: p.value for p in out.metadata_props}
    options = json.loads(meta["onnx_split.options"])
    assert options["partitioner"] == "metis" and options["keep"] == 0.9
    x = rng.standard_normal((3, 256)).astype(np.float32)
    assert ort_run(out, {"x": x})[0].shape == (3, 256)


def test_lossy_cli_writes_a_checked_model(tmp_path, capsys, exact_blocks):
    out = tmp_path / "o.onnx"
    code, stdout, err = _run(capsys, exact_blocks, out, "--keep", "0.99", "--min-elements", "0", "--no-bench",
                             "--layout", "batched")
    assert code == 0, err
    assert "keeps 100.0% of magnitude significance" in stdout
    last = stdout.strip().splitlines()[-1]
    # a lossy run's last line says what it was verified against and what the split costs at the outputs
    assert last.startswith(f"wrote {out}: 1 of 1 sites split, verified against the pruned original; "
                           f"held-out relative output error "), last
    assert last.endswith(" (no --tolerance bounds it)"), last
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out))
    # exact planted blocks: the lossy split loses nothing, and --keep 0.99 takes all 8 of them
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    np.testing.assert_allclose(ort_run(written, {"x": x})[0], ort_run(onnx.load(str(exact_blocks)), {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    assert re.search(r"^fc1\s+MatMul\s+256x256\s+8\s", stdout, re.M), stdout
    assert sum(n.op_type == "MatMul" for n in written.graph.node) == 1  # batched: one MatMul over the parts


# ---------------------------------------------------------------- the tolerance search on its own

def test_allocate_takes_the_most_gain_per_error_and_stays_within_the_budget():
    from onnx_split.allocate import Option, allocate, estimate
    # site 0: saves 10 at error .04 or 15 at .06; site 1: saves 10 at .01 or 20 at .03
    options = {0: [Option("a", 10, .04), Option("b", 15, .06)], 1: [Option("c", 10, .01), Option("d", 20, .03)]}
    choice = allocate(options, 0.05)
    assert estimate(options, choice) <= 0.05
    # site 1's deep option first (most gain per squared error), then site 0's .04 fits: .03^2 + .04^2 = .05^2
    assert choice == {1: 1, 0: 0}
    assert allocate(options, 0.0) == {}
    assert allocate(options, 1.0) == {0: 1, 1: 1}


def test_back_off_steps_the_costliest_site_to_a_safer_option_then_to_dense():
    from onnx_split.allocate import Option, back_off
    options = {0: [Option("a", 10, .01), Option("b", 12, .2)], 1: [Option("c", 10, .02)]}
    once = back_off(options, {0: 1, 1: 0})
    assert once == {0: 0, 1: 0}  # site 0's .2 for 12 was the worst error per gain
    assert back_off(options, {1: 0}) == {}
    assert back_off(options, {}) is None


def test_back_off_at_an_equal_estimate_steps_to_the_option_that_saves_less():
    from onnx_split.allocate import Option, back_off
    # both estimated at 0 (8 exact blocks, and 16 that cut them): the whole choice measured worse,
    # so the next step is the 8, not dense
    options = {0: [Option("8 parts", 10, 0.0), Option("16 parts", 12, 0.0)]}
    assert back_off(options, {0: 1}) == {0: 0}
    assert back_off(options, {0: 0}) == {}


def test_the_propagation_probe_is_a_rung_that_drops_something():
    from onnx_split.allocate import probe_rung, propagated
    local = [0.0, 0.0, 0.2, 0.8]  # two exact rungs, two lossy ones
    assert probe_rung(local, 0.0) == 2 and probe_rung(local, 0.5) in (2, 3) and probe_rung(local) in (2, 3)
    assert probe_rung([0.0, 0.0]) in (0, 1)
    # the exact rungs add nothing, the others scale by the probe's measured output/layer ratio
    assert propagated(local, 2, 0.1) == pytest.approx([0.0, 0.0, 0.1, 0.4])
    assert propagated([0.0, 0.0], 1, 0.0) == [0.0, 0.0]


def test_tolerance_zero_on_exact_blocks_keeps_the_exact_split(exact_blocks):
    """A rung that cuts an exact block (16 parts of 8 blocks) is not estimated lossless because
    the probe run measured a rung that drops nothing; the exact 8 parts are found at 0 as at 1e-3."""
    model = onnx.load(str(exact_blocks))
    for tol in (0.0, 1e-3):
        report = split_model(model, _config(tolerance=tol)).report
        (site,) = report.sites
        assert site.decision == "split" and site.parts == 8, (tol, site.reason)
        assert report.error.held_out == 0 and report.error.met is True


def test_lossy_metadata_states_the_budget_and_the_error_for_netron():
    rng = np.random.default_rng(3)
    w, _ = planted(rng, 64, 64, 4)
    w = w + 0.05 * rng.standard_normal(w.shape).astype(np.float32)  # noise outside the blocks: lossy
    result = split_model(matmul_model(w, ["batch", 64]), _config(parts=4))
    meta = {p.key: p.value for p in result.model.metadata_props}
    error = result.report.error
    assert error is not None and error.held_out > 0
    assert meta["onnx_split.lossy"].startswith("--parts 4, metis partitioner")
    assert f"{error.held_out:.3g} on {error.held_out_samples} held-out samples" in meta["onnx_split.lossy"]
    # a second, lossless run over the written model replaces every onnx_split key
    again = split_model(result.model, _config())
    assert "onnx_split.lossy" not in {p.key for p in again.model.metadata_props}


# ---------------------------------------------------------------- regressions found in review

def test_relative_error_counts_float_outputs_only_and_matching_non_finite_values_as_equal():
    from onnx_split.pruned import relative_error
    ref = np.array([3.0, np.nan, np.inf, 4.0], np.float32)
    assert relative_error([ref], [ref.copy()]) == 0.0
    assert relative_error([ref], [np.array([3.0, np.nan, np.inf, 4.5], np.float32)]) == pytest.approx(0.1)
    assert relative_error([ref], [np.array([3.0, 0.0, np.inf, 4.0], np.float32)]) == float("inf")
    assert relative_error([ref], [np.array([np.nan, np.nan, np.inf, 4.0], np.float32)]) == float("inf")
    # indices and other integer outputs do not enter the figure
    assert relative_error([ref, np.array([1, 2])], [ref.copy(), np.array([7, 9])]) == 0.0


def _with_output(model, node, output):
    model.graph.node.append(node)
    model.graph.output.append(output)
    return model


def test_an_argmax_output_does_not_change_the_error():
    w = _noisy(np.random.default_rng(5), 64, 64, 4)
    plain = matmul_model(w, ["batch", 64])
    with_index = _with_output(matmul_model(w, ["batch", 64]), onnx.helper.make_node("ArgMax", ["y"], ["top"], axis=1),
                              onnx.helper.make_tensor_value_info("top", onnx.TensorProto.INT64, ["batch", 1]))
    a = split_model(plain, _config(parts=4)).report.error
    b = split_model(with_index, _config(parts=4)).report.error
    assert a.held_out > 0 and b.held_out == pytest.approx(a.held_out)


def test_nan_in_an_output_that_no_split_touches_keeps_the_tolerance_met():
    w = _noisy(np.random.default_rng(6), 64, 64, 4)
    model = _with_output(matmul_model(w, ["batch", 64]), onnx.helper.make_node("Log", ["x"], ["logx"]),
                         onnx.helper.make_tensor_value_info("logx", onnx.TensorProto.FLOAT, ["batch", 64]))
    report = split_model(model, _config(tolerance=0.5)).report  # log of negative inputs: NaN in both models
    assert report.error.met is True and report.error.held_out < 0.5 and report.verification_passed is not False


def test_a_scalar_graph_input_is_passed_whole_to_every_sample(tmp_path):
    w = _noisy(np.random.default_rng(7), 64, 64, 4)
    f = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["h"], name="fc1"), onnx.helper.make_node("Mul", ["h", "t"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", f, ["batch", 64]), onnx.helper.make_tensor_value_info("t", f, [])],
        [onnx.helper.make_tensor_value_info("y", f, ["batch", 64])], [onnx.numpy_helper.from_array(w, "W")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    assert split_model(model, _config(keep=0.9)).report.error.held_out_samples == 16
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(0).standard_normal((20, 64)).astype(np.float32), t=np.array(2.0, np.float32))
    report = split_model(model, _config(tolerance=0.5, calibration=str(cal))).report
    assert report.error.search_samples == 15 and report.error.held_out_samples == 5


def test_nan_in_calibration_data_is_a_clear_error(tmp_path, models):
    data = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    data[3, 5] = np.nan
    path = _calibration_file(tmp_path, {"x": data})
    with pytest.raises(InputError, match="'x' holds NaN or infinite values"):
        split_model(onnx.load(str(models["one"])), _config(keep=0.9, calibration=str(path)))


def test_random_samples_refuse_a_first_dim_fixed_even_at_the_sample_count():
    w = _noisy(np.random.default_rng(8), 24, 24, 2)
    model = matmul_model(w, [64, 24])  # 64 = the number of random samples
    with pytest.raises(InputError, match="'x' has it fixed at 64"):
        split_model(model, _config(tolerance=0.1))


def test_tiles_label_retained_and_flops_agree_and_dead_outputs_are_the_bias():
    from onnx_split.plans import planner_for
    from onnx_split.significance import magnitude
    w = np.zeros((64, 64), np.float32)
    w[:8, :8] = 5.0  # one heavy 8x8 tile; the rest small noise
    w += 0.01 * np.random.default_rng(9).standard_normal(w.shape).astype(np.float32)
    planner = planner_for(magnitude(w), "tiles", tile=8)
    one = planner.at(1)
    assert one.masks[0].sum() == 64  # exactly the one tile is kept
    # outputs no kept tile feeds cost one multiply-add each (their own one-input part), not a tile's rows
    assert one.flops == pytest.approx((64 + 56) / (64 * 64))
    ladder = planner.ladder()
    assert all(a.flops >= b.flops for a, b in zip(ladder, ladder[1:]))
    result = split_model(matmul_model(w, ["batch", 64]),
                         _config(partitioner="tiles", tile=8, flops=0.03, layout="parallel", refit=False))  # one tile
    assert result.report.sites[0].decision == "split" and result.report.verification_passed
    assert result.report.sites[0].retained == pytest.approx(one.retained)
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    (y,) = ort_run(result.model, {"x": x})
    kept = np.zeros_like(w)
    kept[:8, :8] = w[:8, :8]
    np.testing.assert_allclose(y, x @ kept, rtol=1e-5, atol=1e-5)  # outputs 8.. read no weight: zero


def test_flops_budget_holds_in_the_batched_layout_padding_included():
    w = _noisy(np.random.default_rng(10), 10, 10, 3)
    report = split_model(matmul_model(w, ["batch", 10]), _config(flops=0.4, layout="batched")).report
    site = report.sites[0]
    assert site.decision == "split" and site.flops_after / site.flops_before <= 0.4


def test_flops_budget_takes_the_plan_keeping_most_not_merely_the_fewest_parts():
    w, _ = planted(np.random.default_rng(11), 256, 256, 8)  # 8 exact blocks: 8 parts keep everything
    model = matmul_model(w, ["batch", 256])
    site = split_model(model, _config(flops=0.2, layout="parallel")).report.sites[0]
    assert site.parts == 8 and site.retained == pytest.approx(1.0)  # 5 parts would fit too, keeping less
    dense = split_model(model, _config(flops=1.0)).report.sites[0]
    assert dense.decision == "kept" and "allows the dense cost" in dense.reason


@pytest.mark.parametrize("extra,match", [(["--report", "r.json"], "no --report"),
                                         (["--keep", "0.9"], "--keep 0.9 applies to a real run")])
def test_dry_run_refuses_what_it_would_ignore(tmp_path, capsys, exact_blocks, extra, match):
    argv = [exact_blocks, "--dry-run", *[str(tmp_path / e) if e.endswith(".json") else e for e in extra]]
    _bad(tmp_path, capsys, argv, match, [exact_blocks])


def test_percent_never_rounds_a_loss_up_to_100():
    from onnx_split.report import percent
    assert percent(1.0) == "100.0%" and percent(0.9998) == "99.98%" and percent(0.999999) == ">99.99%"
    assert percent(0.5) == "50.0%"


def test_dry_run_with_a_calibration_file_measures_each_level_alone(tmp_path, capsys):
    src = _save(matmul_model(_noisy(np.random.default_rng(12), 256, 256, 8, noise=0.05), ["batch", 256]),
                tmp_path / "n.onnx")
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(0).standard_normal((40, 256)).astype(np.float32))
    code, out, _ = _run(capsys, src, "--dry-run", "--calibration", cal, "--min-elements", "0")
    assert code == 0 and "relative output error of splitting this site alone" in out
    cells = _table(out)[1]["fc1"][3:]
    errors = [float(c.rsplit(" / ", 1)[1]) for c in cells]
    assert len(errors) == 4 and all(e > 0 for e in errors) and errors == sorted(errors)
    # the level measured (the median one, 8 parts) reads the figure a --tolerance search confirms
    # that plan at: fitted on one half of the search samples, measured on the other
    result = split_model(str(src), _config(tolerance=10.0, max_parts=8, calibration=str(cal)))
    confirmed = [p for p in result.report.search_trace if p["accepted"]]
    assert result.report.sites[0].parts == 8 and len(confirmed) == 1
    exact = [level["error"] for level in survey_model(str(src), _config(calibration=str(cal)))[0].levels]
    assert [float(f"{e:.3g}") for e in exact] == errors
    assert confirmed[0]["error"] == pytest.approx(exact[2], rel=1e-9)
    # without calibration data nothing is run: no error column
    rows = survey_model(str(src), _config())
    assert all(level["error"] is None for row in rows for level in row.levels)


@pytest.mark.parametrize("width, expected", [(8, 256), (4096, 16), (1 << 16, 4)])
def test_a_propagation_run_reads_as_many_samples_as_give_enough_output_values(width, expected):
    """lossy.sensitivity_samples: at most 256 samples, at least 4, else enough for 2^16 output values."""
    from onnx_split.lossy import sensitivity_samples
    from onnx_split.pruned import Evaluator
    rng = np.random.default_rng(3)
    model = matmul_model(rng.standard_normal((8, width)).astype(np.float32), ["batch", 8])
    sites = find_sites(model, min_elements=0)
    cal = random_calibration(model, {"x": (8,)}, samples=48)
    evaluator = Evaluator(model, sites, [0])
    assert sensitivity_samples(evaluator, cal) == expected
    assert evaluator.runs == 1  # one run on one sample told the output's size


@pytest.mark.parametrize("samples", [24, 200])
def test_the_tolerance_search_confirms_on_samples_its_fits_did_not_see(tmp_path, samples):
    """Inputs of low rank: a refit on few samples reproduces those samples far better than others.
    The search fits on one half of the search samples and confirms on the other, so the tolerance
    it accepts holds on the held-out samples. (Fitted and confirmed on the same 18 samples, this
    model's fc1 was accepted in 2 parts and missed the tolerance on the held-out ones.) With enough
    samples a split is found and holds too."""
    src, cal = low_rank_case(tmp_path, samples)
    result = split_model(str(src), _config(tolerance=0.1, calibration=str(cal)))
    error = result.report.error
    assert error.met is True and error.held_out <= 0.1
    assert all(p["error"] <= 0.1 for p in result.report.search_trace if p["accepted"])
    split = [s.parts for s in result.report.sites if s.parts]
    assert bool(split) == (samples == 200)
    # the report gives the error on the half the search measured on (no refit saw it) apart
    n = error.search_samples
    assert error.unseen_samples == n - n // 2 and error.unseen <= 0.1
    assert f"{error.unseen:.4g} on the {n - n // 2} of them no refit was fitted on" in result.report.to_text()


def test_a_refitted_budget_runs_search_figure_says_it_is_in_sample():
    """--parts with the refit: the refits were fitted on every search sample, so the error line
    says so (only the held-out figure is out of sample); without the refit it says nothing of it."""
    models = Path(__file__).resolve().parents[1] / "models"
    model, path = onnx.load(str(models / "digits_mlp.onnx")), models / "digits_calibration.npz"
    fitted = split_model(model, _config(parts=4, calibration=str(path))).report
    assert fitted.verified_against.startswith("the refitted original") and fitted.error.fitted is True
    line = next(l for l in fitted.to_text().splitlines() if l.startswith("relative output error"))
    assert f"{fitted.error.search_samples} search samples (the refits were fitted on them)" in line
    assert json.loads(fitted.to_json())["error"]["fitted"] is True
    plain = split_model(model, _config(parts=4, calibration=str(path), refit=False)).report
    assert plain.error.fitted is False and "fitted on them" not in plain.to_text()
    searched = split_model(model, _config(tolerance=0.05, calibration=str(path))).report
    assert searched.error.fitted is False  # the search fits on one half and says so in its own figure
