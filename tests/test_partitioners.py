"""Lossy partitioners: balanced (metis, spectral, random), refinement, static tiles."""
import itertools
import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from onnx_split.partition import (BALANCED, Part, Plan, metis_blocks, random_blocks, retained, spectral_blocks,
                                  static_tiles)
from onnx_split.partition.balance import (assign, block_value, capacities, check_inputs, index_labels,
                                          plan_from_labels, refine)

SMART = {"metis": metis_blocks, "spectral": spectral_blocks}


def planted_scores(rng, k, n, groups, noise):
    """|W| with ``groups`` blocks (|N(0,1)|) under random row/column permutations, noise elsewhere;
    and the planted row and column labels."""
    row_part = rng.permutation(index_labels(k, groups))
    col_part = rng.permutation(index_labels(n, groups))
    scores = noise * np.abs(rng.standard_normal((k, n)))
    inside = row_part[:, None] == col_part[None, :]
    scores[inside] = np.abs(rng.standard_normal(int(inside.sum())))
    return scores, row_part, col_part


def groups(plan):
    return {(frozenset(p.rows.tolist()), frozenset(p.cols.tolist())) for p in plan.parts}


def check_balanced(plan, k, n, parts):
    assert (plan.k, plan.n) == (k, n)
    assert len(plan.parts) == parts == plan.n_components
    assert sorted(p.rows.size for p in plan.parts) == sorted(capacities(k, parts).tolist())
    assert sorted(p.cols.size for p in plan.parts) == sorted(capacities(n, parts).tolist())
    assert np.array_equal(np.sort(np.concatenate([p.rows for p in plan.parts])), np.arange(k))
    assert np.array_equal(np.sort(np.concatenate([p.cols for p in plan.parts])), np.arange(n))
    firsts = [int(p.cols[0]) for p in plan.parts]
    assert firsts == sorted(firsts)
    for p in plan.parts:
        assert p.rows.dtype == np.int64 and p.cols.dtype == np.int64
        assert np.all(np.diff(p.rows) > 0) and np.all(np.diff(p.cols) > 0)
    assert plan.unused_rows.size == 0 and plan.dead_cols.size == 0


@pytest.mark.parametrize("method", sorted(SMART))
@pytest.mark.parametrize("shape", [(256, 256), (192, 320), (250, 254)])
@pytest.mark.parametrize("parts", [2, 4, 8])
def test_recovers_planted_blocks(method, shape, parts):
    rng = np.random.default_rng(parts * 1000 + shape[0])
    scores, row_part, col_part = planted_scores(rng, *shape, parts, noise=0.01)
    truth = plan_from_labels(row_part, col_part, parts, "planted")
    plan = SMART[method](scores, parts, seed=0)
    check_balanced(plan, *shape, parts)
    assert plan.method == method
    assert retained(plan, scores) >= retained(truth, scores) - 1e-9
    assert groups(plan) == groups(truth)


@pytest.mark.parametrize("parts", [2, 4, 8, 16])
def test_noisy_blocks_beat_random(parts):
    rng = np.random.default_rng(parts)
    scores, _, _ = planted_scores(rng, 256, 256, parts, noise=0.3)
    baseline = retained(random_blocks(scores, parts), scores)
    for method, partition in SMART.items():
        kept = retained(partition(scores, parts), scores)
        assert kept > baseline + 0.05, (method, kept, baseline)
        assert kept > 1 / parts + 0.05, (method, kept)


@pytest.mark.parametrize("method", sorted(BALANCED))
@pytest.mark.parametrize("shape,parts", [((64, 64), 4), ((37, 53), 5), ((100, 7), 3), ((1, 1), 1), ((1, 1), 4),
                                         ((3, 50), 8), ((50, 3), 8)])
def test_balanced_sizes_and_clamp(method, shape, parts):
    scores = np.abs(np.random.default_rng(7).standard_normal(shape))
    check_balanced(BALANCED[method](scores, parts), *shape, min(parts, *shape))


@pytest.mark.parametrize("method", sorted(BALANCED))
def test_one_part_keeps_everything(method):
    scores = np.abs(np.random.default_rng(1).standard_normal((30, 40)))
    plan = BALANCED[method](scores, 1)
    check_balanced(plan, 30, 40, 1)
    assert plan.parts[0].macs == 30 * 40
    assert retained(plan, scores) == pytest.approx(1.0)


@pytest.mark.parametrize("method", sorted(BALANCED))
def test_all_zero_scores_give_a_balanced_plan(method):
    plan = BALANCED[method](np.zeros((20, 30)), 4)
    check_balanced(plan, 20, 30, 4)
    assert retained(plan, np.zeros((20, 30))) == 1.0


@pytest.mark.parametrize("method", sorted(BALANCED))
def test_sparse_scores_with_empty_rows_and_columns(method):
    scores = np.zeros((40, 60))
    scores[:20, :30] = 1.0
    scores[20:30, 30:45] = 1.0  # rows 30..39 and columns 45..59 are empty
    plan = BALANCED[method](scores, 2)
    check_balanced(plan, 40, 60, 2)
    if method != "random":
        assert retained(plan, scores) == pytest.approx(1.0)


@pytest.mark.parametrize("method", sorted(BALANCED))
@pytest.mark.parametrize("bad,parts", [(-np.ones((4, 4)), 2), (np.full((4, 4), np.nan), 2), (np.ones(8), 2),
                                       (np.ones((4, 4)), 0), (np.ones((0, 4)), 1), (np.full((4, 4), np.inf), 2)])
def test_bad_input_raises(method, bad, parts):
    with pytest.raises(ValueError):
        BALANCED[method](bad, parts)


def test_check_inputs_clamps_and_converts():
    scores, parts = check_inputs(np.ones((3, 9), np.float32), 16)
    assert parts == 3 and scores.dtype == np.float64
    assert check_inputs(np.ones((9, 5)), 2)[1] == 2


def test_capacities():
    assert capacities(10, 3).tolist() == [4, 3, 3]
    assert capacities(12, 4).tolist() == [3, 3, 3, 3]
    assert capacities(5, 5).tolist() == [1] * 5


@pytest.mark.parametrize("seed", range(40))
def test_assign_is_optimal(seed):
    """The balanced assignment equals the brute-force optimum over which parts get the larger sizes."""
    rng = np.random.default_rng(seed)
    parts = int(rng.integers(2, 6))
    items = int(rng.integers(parts, 30))
    gain = rng.random((items, parts)) if seed % 2 else rng.integers(0, 4, (items, parts)).astype(float)
    labels = assign(gain)
    assert sorted(np.bincount(labels, minlength=parts).tolist()) == sorted(capacities(items, parts).tolist())
    base, extra = divmod(items, parts)
    best = -np.inf
    for larger in itertools.combinations(range(parts), extra):
        slots = np.array([p for p in range(parts) for _ in range(base + (p in larger))])
        r, c = linear_sum_assignment(-gain[:, slots])
        best = max(best, gain[r, slots[c]].sum())
    assert gain[np.arange(items), labels].sum() == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape,parts", [((64, 64), 4), ((45, 70), 6), ((128, 96), 16)])
def test_refine_never_decreases(seed, shape, parts):
    rng = np.random.default_rng(seed)
    scores = np.abs(rng.standard_normal(shape)) ** 3
    row_part = rng.permutation(index_labels(shape[0], parts))
    col_part = rng.permutation(index_labels(shape[1], parts))
    before = block_value(scores, row_part, col_part, parts)
    rows, cols = refine(scores, row_part, col_part, parts)
    after = block_value(scores, rows, cols, parts)
    assert after >= before - 1e-9 * scores.sum()
    assert after > before  # random labels are improvable on random scores
    check_balanced(plan_from_labels(rows, cols, parts, "x"), *shape, parts)
    # a second refine from its own output cannot decrease either
    rows2, cols2 = refine(scores, rows, cols, parts, rounds=3)
    assert block_value(scores, rows2, cols2, parts) >= after - 1e-9 * scores.sum()


def test_refine_rebalances_unbalanced_labels():
    scores = np.abs(np.random.default_rng(3).standard_normal((20, 24)))
    rows, cols = refine(scores, np.zeros(20, np.int64), np.r_[np.zeros(20), np.ones(4)].astype(np.int64), 2)
    check_balanced(plan_from_labels(rows, cols, 2, "x"), 20, 24, 2)


def test_plan_from_labels_drops_empty_parts():
    plan = plan_from_labels(np.array([1, 1, 0, 3]), np.array([2, 0, 0, 1, 1]), 4, "x")
    assert [(p.rows.tolist(), p.cols.tolist()) for p in plan.parts] == [([2], [1, 2]), ([0, 1], [3, 4])]
    assert plan.unused_rows.tolist() == [3] and plan.dead_cols.tolist() == [0]
    assert plan.n_components == 2 and plan.threshold == 0.0 and plan.method == "x"


def test_retained_sums_overlapping_parts():
    scores = np.arange(12, dtype=float).reshape(3, 4)
    plan = Plan(3, 4, (Part(np.array([0, 1]), np.array([0])), Part(np.array([1, 2]), np.array([2, 3]))),
                np.zeros(0, np.int64), np.array([1]), 2, "x", 0.0)
    assert retained(plan, scores) == pytest.approx((0 + 4 + 6 + 7 + 10 + 11) / scores.sum())
    assert retained(plan, np.zeros((3, 4))) == 1.0


@pytest.mark.parametrize("method", sorted(BALANCED))
def test_same_seed_same_plan(method):
    scores, _, _ = planted_scores(np.random.default_rng(5), 120, 90, 4, noise=0.5)
    a, b = BALANCED[method](scores, 4, seed=3), BALANCED[method](scores, 4, seed=3)
    assert [(p.rows.tolist(), p.cols.tolist()) for p in a.parts] == [(p.rows.tolist(), p.cols.tolist()) for p in b.parts]


def test_random_seed_changes_plan():
    scores = np.ones((40, 40))
    assert groups(random_blocks(scores, 4, seed=0)) != groups(random_blocks(scores, 4, seed=1))


# ---- static tiles -------------------------------------------------------------------------------


def test_tiles_keep_all():
    scores = np.abs(np.random.default_rng(0).standard_normal((100, 70)))
    plan = static_tiles(scores, 32, 1.0)
    assert retained(plan, scores) == pytest.approx(1.0)
    assert [p.cols.tolist() for p in plan.parts] == [list(range(0, 32)), list(range(32, 64)), list(range(64, 70))]
    for p in plan.parts:
        assert p.rows.tolist() == list(range(100))
    assert plan.macs_split == 100 * 70 and plan.n_components == 3 and plan.method == "tiles"
    assert plan.unused_rows.size == 0 and plan.dead_cols.size == 0


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.3, 0.5, 0.75])
def test_tiles_keep_fraction(keep):
    rng = np.random.default_rng(1)
    scores = np.abs(rng.standard_normal((100, 70)))
    tile = 32
    plan = static_tiles(scores, tile, keep)
    row_sizes, col_sizes = [32, 32, 32, 4], [32, 32, 6]
    n_keep = math.ceil(round(keep * 12, 9))
    # brute force: the n_keep highest tile sums, by area
    sums = {(a, b): scores[32 * a:32 * a + row_sizes[a], 32 * b:32 * b + col_sizes[b]].sum()
            for a in range(4) for b in range(3)}
    chosen = sorted(sums, key=lambda t: (-sums[t], t))[:n_keep]
    assert plan.macs_split == sum(row_sizes[a] * col_sizes[b] for a, b in chosen)
    assert retained(plan, scores) == pytest.approx(sum(sums[t] for t in chosen) / scores.sum())
    for p in plan.parts:
        b = int(p.cols[0]) // tile
        want = [r for a, _ in sorted(t for t in chosen if t[1] == b) for r in range(32 * a, 32 * a + row_sizes[a])]
        assert p.rows.tolist() == want


def test_tiles_find_planted_tiles_and_dead_outputs():
    rng = np.random.default_rng(2)
    scores = 0.01 * np.abs(rng.standard_normal((128, 160)))  # 4 x 5 tiles of 32
    planted = [(0, 1), (2, 1), (3, 0), (1, 3), (3, 3)]  # output block 2 and 4 get nothing
    for a, b in planted:
        scores[32 * a:32 * (a + 1), 32 * b:32 * (b + 1)] += 1.0
    plan = static_tiles(scores, 32, len(planted) / 20)
    kept = {(int(r) // 32, int(p.cols[0]) // 32) for p in plan.parts for r in p.rows[::32]}
    assert kept == set(planted)
    assert [p.cols[0] // 32 for p in plan.parts] == [0, 1, 3]
    assert plan.dead_cols.tolist() == list(range(64, 96)) + list(range(128, 160))
    assert plan.unused_rows.size == 0
    assert plan.n_components == 3
    assert [p.rows.tolist() for p in plan.parts] == [list(range(96, 128)), list(range(0, 32)) + list(range(64, 96)),
                                                     list(range(32, 64)) + list(range(96, 128))]


def test_tiles_unused_rows_and_ties():
    scores = np.zeros((70, 64))
    scores[40:64, :] = 1.0  # only row tile 1 (rows 32..63) scores
    plan = static_tiles(scores, 32, 0.5)  # 3 x 2 tiles, keep 3: ties broken by row-major index
    assert [p.rows.tolist() for p in plan.parts] == [list(range(0, 64)), list(range(32, 64))]
    assert plan.unused_rows.tolist() == list(range(64, 70))
    assert retained(plan, scores) == pytest.approx(1.0)


@pytest.mark.parametrize("tile,keep", [(0, 0.5), (8, 0.0), (8, 1.5)])
def test_tiles_bad_arguments(tile, keep):
    with pytest.raises(ValueError):
        static_tiles(np.ones((16, 16)), tile, keep)
