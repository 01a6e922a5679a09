"""Shared machinery of the lossy (balanced) partitioners: capacities, assignment, refinement, plans.

A lossy partitioner labels every input (row) and every output (column) of ``y = x @ W`` with one
of ``parts`` parts; part ``p`` computes ``y[..., cols_p] = x[..., rows_p] @ W[rows_p][:, cols_p]``
and every weight outside those diagonal blocks is dropped. With a significance matrix ``scores``
(K x N, nonnegative) the quality of a labelling is its *retained significance*: the sum of
``scores`` inside the blocks over the sum of all of it.

Balance: the rows are split into parts whose sizes differ by at most one (:func:`capacities`), and
so are the columns; which parts hold the one-larger sizes is left free (decided by the data).

Refinement (:func:`refine`) alternates two exact-size assignment problems. With the column labels
fixed, row ``i`` placed in part ``p`` keeps ``g[i, p] = sum_{j in cols_p} scores[i, j]``; rows are
assigned to maximize the sum of their gains subject to the sizes (a transportation problem: greedy
by gain, pairwise exchanges between parts, then negative-cycle canceling, which ends at the optimum
or after a cap on cycles, see :func:`assign`). Then the
columns, given the rows, the same way; repeat. Every step starts from the current labels as one
candidate and keeps the better, so the retained significance never decreases.

Pure numpy/scipy: no onnx import here.
"""
from __future__ import annotations

import numpy as np

from .plan import Part, Plan

_EMPTY = np.zeros(0, dtype=np.int64)


def check_inputs(scores: np.ndarray, parts: int) -> tuple[np.ndarray, int]:
    """``scores`` as float64 and ``parts`` clamped to ``min(K, N)``; ValueError on bad input."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D, got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError(f"scores must be non-empty, got shape {scores.shape}")
    scores = scores.astype(np.float64, copy=False)
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    if (scores < 0).any():
        raise ValueError("scores must be nonnegative")
    if int(parts) < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    return scores, min(int(parts), *scores.shape)


def capacities(total: int, parts: int) -> np.ndarray:
    """``parts`` sizes summing to ``total`` that differ by at most one (larger ones first)."""
    base, extra = divmod(int(total), int(parts))
    return (base + (np.arange(parts) < extra)).astype(np.int64)


def one_hot(labels: np.ndarray, parts: int) -> np.ndarray:
    """len(labels) x parts float64 indicator matrix."""
    out = np.zeros((labels.size, parts), dtype=np.float64)
    out[np.arange(labels.size), labels] = 1.0
    return out


def block_value(scores: np.ndarray, row_part: np.ndarray, col_part: np.ndarray, parts: int) -> float:
    """Sum of ``scores`` inside the diagonal blocks of the labelling."""
    col_gain = one_hot(row_part, parts).T @ scores  # parts x N
    return float(col_gain[col_part, np.arange(col_part.size)].sum())


def retained(plan: Plan, scores: np.ndarray) -> float:
    """Fraction of ``scores`` inside the plan's parts (summed per part, so overlapping rows count
    once per part they feed); 1.0 when ``scores`` sums to zero."""
    scores = np.asarray(scores, dtype=np.float64)
    total = float(scores.sum())
    if total == 0.0:
        return 1.0
    kept = sum(float(scores[np.ix_(p.rows, p.cols)].sum()) for p in plan.parts)
    return kept / total


def _sizes_fit(labels: np.ndarray, parts: int) -> bool:
    if labels.size == 0 or labels.min() < 0 or labels.max() >= parts:
        return False
    sizes = np.sort(np.bincount(labels, minlength=parts))[::-1]
    return bool(np.array_equal(sizes, capacities(labels.size, parts)))


def _greedy(gain: np.ndarray, room: np.ndarray, extra: int = 0) -> np.ndarray:
    """Labels maximizing ``gain`` greedily: (item, part) pairs in decreasing gain (ties: lower index
    first), an item taking its pair when the part has room. Part ``p`` holds ``room[p]`` items, and
    up to ``extra`` parts may hold one more; ``room.sum() + extra`` must equal the item count."""
    items, parts = gain.shape
    labels = [-1] * items
    count = [0] * parts
    room = [int(r) for r in room]
    left = items
    for flat in np.argsort(-gain, axis=None, kind="stable").tolist():
        item, part = divmod(flat, parts)
        if labels[item] >= 0:
            continue
        if count[part] < room[part]:
            pass
        elif count[part] == room[part] and extra > 0:
            extra -= 1
        else:
            continue
        labels[item] = part
        count[part] += 1
        left -= 1
        if left == 0:
            break
    return np.asarray(labels, dtype=np.int64)


def _best_moves(gain: np.ndarray, labels: np.ndarray, best: np.ndarray, which) -> None:
    """Rows ``which`` of ``best`` set: ``best[p, q]`` is the most an item of part ``p`` gains by
    moving to part ``q`` (-inf for an empty part). It depends on ``p``'s members only."""
    for p in which:
        members = np.flatnonzero(labels == p)
        best[p] = (gain[members] - gain[members, p][:, None]).max(axis=0) if members.size else -np.inf


def _exchange(gain: np.ndarray, labels: np.ndarray, passes: int = 20) -> np.ndarray:
    """Pairwise exchanges between parts while one raises the total gain. Exchanges keep every
    part's size; a single move from a part one larger to one smaller keeps the multiset of sizes.

    A pair of parts is only looked at when its best exchange or move gains more than ``tol``
    (``best``, kept up to date as parts change): the pairs skipped are those where the exchange
    below would find nothing, so the labels are the same as looking at every pair."""
    labels = labels.copy()
    parts = gain.shape[1]
    tol = 1e-12 * max(float(np.abs(gain).max(initial=0.0)), 1e-300)
    best = np.empty((parts, parts))
    _best_moves(gain, labels, best, range(parts))
    sizes = np.bincount(labels, minlength=parts)
    for _ in range(passes):
        changed = False
        for p in range(parts):
            for q in range(p + 1, parts):
                if not (best[p, q] + best[q, p] > tol
                        or (sizes[p] == sizes[q] + 1 and best[p, q] > tol)
                        or (sizes[q] == sizes[p] + 1 and best[q, p] > tol)):
                    continue
                touched = False
                in_p, in_q = np.flatnonzero(labels == p), np.flatnonzero(labels == q)
                to_q = gain[in_p, q] - gain[in_p, p]  # gain of moving each row of p to q
                to_p = gain[in_q, p] - gain[in_q, q]
                order_p, order_q = np.argsort(-to_q, kind="stable"), np.argsort(-to_p, kind="stable")
                m = min(in_p.size, in_q.size)
                swaps = int(np.count_nonzero(to_q[order_p[:m]] + to_p[order_q[:m]] > tol))
                if swaps:
                    labels[in_p[order_p[:swaps]]] = q
                    labels[in_q[order_q[:swaps]]] = p
                    touched = True
                    in_p, in_q = np.flatnonzero(labels == p), np.flatnonzero(labels == q)
                moved = None
                if in_p.size == in_q.size + 1:
                    moved = (p, q, in_p)
                elif in_q.size == in_p.size + 1:
                    moved = (q, p, in_q)
                if moved is not None:
                    src, dst, members = moved
                    delta = gain[members, dst] - gain[members, src]
                    pick = int(np.argmax(delta))
                    if delta[pick] > tol:
                        labels[members[pick]] = dst
                        sizes[src] -= 1
                        sizes[dst] += 1
                        touched = True
                if touched:
                    changed = True
                    _best_moves(gain, labels, best, (p, q))
        if not changed:
            break
    return labels


def _negative_cycle(cost: np.ndarray, tol: float) -> list[tuple[int, int]] | None:
    """Edges (p, q) of a cycle of total ``cost`` below ``-tol`` (Bellman-Ford from a virtual source
    joined to every node), or None when there is none."""
    nodes = cost.shape[0]
    dist = np.zeros(nodes)
    pred = np.full(nodes, -1)
    for _ in range(nodes + 1):
        via = dist[:, None] + cost
        best_from = np.argmin(via, axis=0)
        best = via[best_from, np.arange(nodes)]
        better = best < dist - tol
        if not better.any():
            return None
        dist[better] = best[better]
        pred[better] = best_from[better]
    node = int(np.flatnonzero(better)[0])
    for _ in range(nodes):  # walk back into the cycle
        node = int(pred[node])
    cycle, u = [], node
    while True:
        cycle.append((int(pred[u]), u))
        u = int(pred[u])
        if u == node:
            break
    return cycle if sum(cost[p, q] for p, q in cycle) < -tol else None


def _cancel_cycles(gain: np.ndarray, labels: np.ndarray, max_cycles: int) -> np.ndarray:
    """Exact finish of the balanced assignment: while some cyclic chain of moves (each part gives
    its cheapest item to the next) raises the total gain, apply it. A virtual node, reached from
    the one-larger parts and reaching the others, admits chains that move a larger size to another
    part. With none left the labels are optimal (negative-cycle optimality of the flow problem)."""
    items, parts = gain.shape
    labels = labels.copy()
    tol = 1e-12 * max(float(np.abs(gain).max(initial=0.0)), 1e-300) * max(items, 1)
    base = items // parts
    rows = np.arange(items)
    for _ in range(max_cycles):
        loss = gain[rows, labels][:, None] - gain  # loss of moving item i to part q
        sizes = np.bincount(labels, minlength=parts)
        order = np.argsort(labels, kind="stable")
        cost = np.full((parts + 1, parts + 1), np.inf)
        filled = np.flatnonzero(sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[filled]
        cost[filled, :parts] = np.minimum.reduceat(loss[order], starts, axis=0)
        np.fill_diagonal(cost, np.inf)
        cost[parts, np.flatnonzero(sizes > base)] = 0.0
        cost[np.flatnonzero(sizes == base), parts] = 0.0 if (sizes > base).any() else np.inf
        cycle = _negative_cycle(cost, tol)
        if cycle is None:
            break
        moves = []
        for p, q in cycle:
            if p < parts and q < parts:
                members = np.flatnonzero(labels == p)
                moves.append((members[np.argmin(loss[members, q])], q))
        for item, q in moves:
            labels[item] = q
    return labels


def assign(gain: np.ndarray, start: np.ndarray | None = None, max_cycles: int = 2000) -> np.ndarray:
    """Labels for the items (rows of ``gain``, items x parts) with balanced sizes
    (:func:`capacities`, larger sizes on any parts) maximizing the total gain.

    From ``start`` when it is balanced, else from a greedy assignment: pairwise exchanges, then
    cycle canceling, which ends at the optimum (or after ``max_cycles`` cycles). Never worse than
    ``start``."""
    items, parts = gain.shape
    if start is not None and _sizes_fit(start, parts):
        labels = start
    else:
        base, extra = divmod(items, parts)
        labels = _greedy(gain, np.full(parts, base), extra)
    return _cancel_cycles(gain, _exchange(gain, labels), max_cycles)


def rebalance(labels: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Balanced labels close to ``labels``: over-full parts give up the items that lose the least
    gain by leaving, which go (greedily by gain) to the under-full parts. The parts that are largest
    now get the one-larger sizes."""
    items, parts = gain.shape
    labels = labels.astype(np.int64).copy()
    sizes = np.bincount(labels, minlength=parts)
    target = np.empty(parts, dtype=np.int64)
    target[np.argsort(-sizes, kind="stable")] = capacities(items, parts)
    under = np.flatnonzero(sizes < target)
    if under.size == 0:
        return labels
    best_under = gain[:, under].max(axis=1)
    movers = []
    for p in np.flatnonzero(sizes > target):
        members = np.flatnonzero(labels == p)
        loss = gain[members, p] - best_under[members]
        movers.append(members[np.argsort(loss, kind="stable")[: sizes[p] - target[p]]])
    movers = np.concatenate(movers)
    labels[movers] = under[_greedy(gain[np.ix_(movers, under)], (target - sizes)[under])]
    return labels


ROUND_GAIN = 3e-3
"""refine stops once a round raises the retained significance by less than this fraction."""


def refine(scores: np.ndarray, row_part: np.ndarray, col_part: np.ndarray, parts: int,
           rounds: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Alternating capacity-constrained improvement of a labelling (see the module docstring).

    Labels that are not balanced are first rebalanced (:func:`rebalance`). Returns the best
    balanced (row_part, col_part) seen; its retained significance is never below that of the
    (balanced) input."""
    scores = np.asarray(scores, dtype=np.float64)
    row_part, col_part = np.asarray(row_part, dtype=np.int64), np.asarray(col_part, dtype=np.int64)
    if not _sizes_fit(row_part, parts):
        row_part = rebalance(row_part, scores @ one_hot(col_part, parts))
    if not _sizes_fit(col_part, parts):
        col_part = rebalance(col_part, (one_hot(row_part, parts).T @ scores).T)
    best = block_value(scores, row_part, col_part, parts)
    tol = 1e-12 * max(float(scores.sum()), 1e-300)
    for _ in range(rounds):
        rows = assign(scores @ one_hot(col_part, parts), start=row_part)
        col_gain = (one_hot(rows, parts).T @ scores).T  # N x parts
        cols = assign(col_gain, start=col_part)
        value = float(col_gain[np.arange(cols.size), cols].sum())
        if value <= best + tol:
            if value > best:
                row_part, col_part, best = rows, cols, value
            break
        gained, (row_part, col_part, best) = value - best, (rows, cols, value)
        if gained < ROUND_GAIN * best:  # another round would gain next to nothing
            break
    return row_part, col_part


def index_labels(total: int, parts: int) -> np.ndarray:
    """Balanced labels in index order: the first ``capacities[0]`` items in part 0, and so on."""
    return np.repeat(np.arange(parts, dtype=np.int64), capacities(total, parts))


def plan_from_labels(row_part: np.ndarray, col_part: np.ndarray, parts: int, method: str) -> Plan:
    """A :class:`Plan` with one part per label that has both rows and columns, sorted by first
    column; rows of a label without columns are unused, columns of a label without rows are dead."""
    row_part, col_part = np.asarray(row_part, dtype=np.int64), np.asarray(col_part, dtype=np.int64)
    out, unused, dead = [], [_EMPTY], [_EMPTY]
    for p in range(parts):
        rows = np.flatnonzero(row_part == p).astype(np.int64)
        cols = np.flatnonzero(col_part == p).astype(np.int64)
        if rows.size and cols.size:
            out.append(Part(rows, cols))
        else:
            unused.append(rows)
            dead.append(cols)
    out.sort(key=lambda part: int(part.cols[0]))
    return Plan(k=row_part.size, n=col_part.size, parts=tuple(out), unused_rows=np.sort(np.concatenate(unused)),
                dead_cols=np.sort(np.concatenate(dead)), n_components=len(out), method=method, threshold=0.0)
