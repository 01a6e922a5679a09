"""Lossy balanced partition by spectral co-clustering (Dhillon, KDD 2001).

With ``A = scores`` (K x N), D1 = diag(row sums) and D2 = diag(column sums), the normalized
matrix ``A_n = D1^-1/2 A D2^-1/2`` has largest singular value 1 (vectors D1^1/2 1, D2^1/2 1);
its next singular vectors relax the normalized cut of the bipartite input/output graph. Taking
the singular vectors 2 .. l + 1, ``l = ceil(log2(parts))``, the inputs and outputs are embedded
together as ``Z = [D1^-1/2 U; D2^-1/2 V]`` and clustered by k-means into ``parts`` clusters, rows
and columns of one cluster forming one part. Zero degrees get a zero embedding.

The clusters are then made exactly balanced (each side assigned to the clusters by squared
distance to the centroids under the size constraints) and improved by :func:`balance.refine`.

SVD: numpy's dense SVD for small matrices, else ARPACK (``scipy.sparse.linalg.svds``) on ``A_n``
as a linear operator, started from a vector of a seeded generator; k-means (``kmeans2``, k-means++
start) is seeded too, so a seed gives one plan.

Pure numpy/scipy: no onnx import here.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.sparse.linalg import LinearOperator, svds

from .balance import assign, check_inputs, index_labels, plan_from_labels, refine
from .plan import Plan

DENSE_SVD_LIMIT = 384  # min(K, N) up to which numpy's full SVD is used
KMEANS_RESTARTS = 4
SVD_TOL = 1e-4  # ARPACK relative accuracy; clustering needs the subspace, not digits


def _inverse_sqrt(degree: np.ndarray) -> np.ndarray:
    out = np.zeros_like(degree)
    np.divide(1.0, np.sqrt(degree), out=out, where=degree > 0)
    return out


def embedding(scores: np.ndarray, dims: int, rng: np.random.Generator) -> np.ndarray:
    """(K + N) x dims co-clustering embedding: singular vectors 2 .. dims + 1 of ``A_n``."""
    k, n = scores.shape
    r1, r2 = _inverse_sqrt(scores.sum(axis=1)), _inverse_sqrt(scores.sum(axis=0))
    if min(k, n) <= max(DENSE_SVD_LIMIT, dims + 1):
        u, _, vt = np.linalg.svd(r1[:, None] * scores * r2[None, :], full_matrices=False)
        u, v = u[:, 1:dims + 1], vt[1:dims + 1].T
    else:
        op = LinearOperator((k, n), dtype=np.float64,
                            matvec=lambda x: r1 * (scores @ (r2 * np.ravel(x))),
                            rmatvec=lambda y: r2 * (scores.T @ (r1 * np.ravel(y))))
        u, s, vt = svds(op, k=dims + 1, v0=rng.standard_normal(min(k, n)), tol=SVD_TOL)
        order = np.argsort(-s, kind="stable")[1:]
        u, v = u[:, order], vt[order].T
    return np.vstack([r1[:, None] * u, r2[:, None] * v])


def _kmeans(points: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Centroids of the best (least squared error) of a few seeded k-means++ runs."""
    best, best_err = None, np.inf
    for _ in range(KMEANS_RESTARTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty clusters are fine: the assignment fills them
            centroids, labels = kmeans2(points, clusters, iter=30, minit="++", rng=rng)
        err = float(((points - centroids[labels]) ** 2).sum())
        if err < best_err:
            best, best_err = centroids, err
    return best


def spectral_blocks(scores: np.ndarray, parts: int, *, seed: int = 0) -> Plan:
    """Balanced ``parts``-way plan of ``scores`` (K x N) by spectral co-clustering, refined."""
    scores, parts = check_inputs(scores, parts)
    k, n = scores.shape
    if parts == 1:
        return plan_from_labels(np.zeros(k, np.int64), np.zeros(n, np.int64), 1, "spectral")
    if not scores.any():  # all-zero scores: every plan retains everything
        return plan_from_labels(index_labels(k, parts), index_labels(n, parts), parts, "spectral")
    rng = np.random.default_rng(seed)
    z = embedding(scores, math.ceil(math.log2(parts)), rng)
    centroids = _kmeans(z, parts, rng)
    cost = ((z[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)  # (K + N) x parts
    row_part, col_part = assign(-cost[:k]), assign(-cost[k:])
    row_part, col_part = refine(scores, row_part, col_part, parts)
    return plan_from_labels(row_part, col_part, parts, "spectral")
