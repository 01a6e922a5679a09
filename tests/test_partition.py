import ast
from pathlib import Path

import numpy as np
import pytest

from builders import planted
from onnx_split.partition import exact_components


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("parts", [1, 2, 5, 8])
def test_finds_exactly_the_planted_components_under_permutation(seed, parts):
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(parts * 3, 200)), int(rng.integers(parts * 3, 200))
    w, blocks = planted(rng, k, n, parts)
    plan = exact_components(w, 0.0, max_parts=64)
    assert plan.n_components == parts
    found = sorted((p.rows.tolist(), p.cols.tolist()) for p in plan.parts)
    assert found == sorted((r.tolist(), c.tolist()) for r, c in blocks)
    assert plan.macs_split == sum(r.size * c.size for r, c in blocks)
    assert plan.unused_rows.size == 0 and plan.dead_cols.size == 0


def test_unused_inputs_and_dead_outputs():
    w = np.zeros((6, 5), np.float32)
    w[0, 1] = w[2, 1] = 1.0
    w[3, 4] = -2.0
    plan = exact_components(w)
    assert plan.unused_rows.tolist() == [1, 4, 5]
    assert plan.dead_cols.tolist() == [0, 2, 3]
    assert [p.rows.tolist() for p in plan.parts] == [[0, 2], [3]]
    # dead outputs go to the part with the fewest rows, as zero columns
    assert [p.cols.tolist() for p in plan.with_dead_columns()] == [[1], [0, 2, 3, 4]]


def test_threshold_drops_small_weights_and_keeps_nan():
    w = np.array([[1.0, 0.01], [0.02, 1.0]], np.float32)
    assert exact_components(w, 0.0).n_components == 1
    assert exact_components(w, 0.05).n_components == 2
    w[0, 1] = np.nan
    assert exact_components(w, 0.05).n_components == 1


def test_packing_respects_max_parts_and_balances():
    rng = np.random.default_rng(0)
    w, _ = planted(rng, 64, 64, 16, permute=True)
    plan = exact_components(w, 0.0, max_parts=4)
    assert plan.n_components == 16 and len(plan.parts) == 4
    macs = [p.macs for p in plan.parts]
    assert max(macs) == min(macs) == 16 * 16
    # every row and column is owned by exactly one part
    assert sorted(np.concatenate([p.rows for p in plan.parts]).tolist()) == list(range(64))
    assert sorted(np.concatenate([p.cols for p in plan.parts]).tolist()) == list(range(64))


def test_diagonal_weight_packs_to_max_parts():
    plan = exact_components(np.eye(32, dtype=np.float32), 0.0, max_parts=4)
    assert plan.n_components == 32
    assert [p.shape for p in plan.parts] == [(8, 8)] * 4


def test_partition_code_does_not_import_onnx():
    folder = Path(__file__).parents[1] / "onnx_split" / "partition"
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("onnx", "onnxruntime") for n in names), path


def test_dense_shortcut_agrees_with_the_graph_path():
    """A weight with one full row is decided without the graph; the answer must be the same."""
    from onnx_split.partition.components import _labels
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(7)
    for _ in range(20):
        mask = rng.random((12, 9)) < 0.3
        mask[rng.integers(12)] = True  # a full row
        mask[:, rng.integers(9)] = False  # an output no input feeds
        mask[rng.integers(12)] = False  # an input no output uses (may undo the full row: both paths run)
        n_fast, fast = _labels(mask)
        adj = sparse.csr_matrix(mask)
        _, slow = connected_components(sparse.bmat([[None, adj], [adj.T, None]], format="csr"), directed=False)
        # same partition of the nodes, whatever the label numbers
        pairs = {(int(a), int(b)) for a, b in zip(fast, slow)}
        assert len(pairs) == len(set(fast.tolist())) == len(set(slow.tolist()))
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[5] = 0.0
    w[:, 7] = 0.0
    plan = exact_components(w)
    assert plan.n_components == 1 and plan.unused_rows.tolist() == [5] and plan.dead_cols.tolist() == [7]
