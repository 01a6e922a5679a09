"""Structured factorizations that run faster than the dense weight: W [K, N] ≈ B₁·Π·B₂.

- ``blocks``: B₁ [K, M] and B₂ [M, N] block-diagonal with G blocks each, and Π the fixed *stride*
  permutation of the M hidden features: hidden feature j of input block s goes to output block
  j // r at position s·r + j % r (r = M / G²). Every input block reaches every output block
  through r features of its own, so the product is dense, and W'[I_s, O_d] = P_sd·Q_ds is a
  rank-r product per pair of blocks (P_sd the columns of B₁'s block s that go to block d, Q_ds the
  rows of B₂'s block d that come from s). The input and output blocks are contiguous runs of K
  and N (no Gather is needed to line them up), and Π is a Reshape and a Transpose.
- ``lowrank``: the baseline, W ≈ U·V with rank R: G = 1 in the same representation.

Both minimise the layer error ||X(W − W')||_F on the calibration moments H = XᵀX:

- low rank exactly: with H + λI = LLᵀ, the rank-R truncated SVD of LᵀW gives U = L⁻ᵀU_R·S_R, V = V_Rᵀ;
- blocks by alternating least squares. The output blocks are independent (block d's outputs
  depend only on the P_sd and Q_ds of that d), so each is fitted on its own: it starts from the
  pairs' whitened rank-r SVDs (each input block whitened by its own H_ss), then alternates an exact
  refit of all Q_ds (one least squares over its G·r hidden features) with one Gauss-Seidel sweep
  over the input blocks, each P_sd set to its exact minimiser with the others fixed (each solve
  damped by ``DAMPING``); it stops when a round gains less than ``TOLERANCE`` of the error.

The parameter budget: ``density`` × K·N parameters over both factors. With G blocks and r
features per pair the factors hold G·r·(K + N) numbers, so r = ⌊density·K·N / (G·(K + N))⌋.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .sparse import EPS, layer_error

DAMPING = 1e-3
"""λ added to every Gram matrix the fits invert, as a fraction of its mean diagonal (refit.py's
default: with fewer calibration rows than inputs H is singular, and the fit must not interpolate)."""
ROUNDS = 60
TOLERANCE = 1e-5
"""A round that lowers the error by less than this fraction of it ends the fit."""
STRUCTURED = ("blocks", "lowrank")


class BlockShapes:
    """The shapes of B₁'s blocks ``first`` [G, K/G, M/G] and B₂'s ``second`` [G, M/G, N/G]."""

    first: np.ndarray
    second: np.ndarray

    @property
    def groups(self) -> int:
        return int(self.first.shape[0])

    @property
    def rank(self) -> int:
        """r: the hidden features of each (input block, output block) pair (low rank: R)."""
        return int(self.first.shape[2] // self.groups)

    @property
    def hidden(self) -> int:
        return int(self.groups * self.first.shape[2])


@dataclass(frozen=True, eq=False)
class Structured(BlockShapes):
    """W' = B₁·Π·B₂ in the ``x @ W`` orientation (float64)."""

    method: str
    density: float
    """The parameters of both factors as a fraction of K·N."""
    first: np.ndarray
    """B₁'s blocks [G, K/G, M/G]; column t·r + u of block s feeds output block t."""
    second: np.ndarray
    """B₂'s blocks [G, M/G, N/G]; row s·r + u of block d comes from input block s."""

    @property
    def params(self) -> int:
        return int(self.first.size + self.second.size)

    @property
    def weight(self) -> np.ndarray:
        return product(self.first, self.second)

    def error(self, weight: np.ndarray, gram: np.ndarray) -> float:
        return layer_error(weight, self.weight, gram)


def product(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The dense [K, N] of B₁·Π·B₂ from the blocks (see the module)."""
    g, kg, mg = first.shape
    r, ng = mg // g, second.shape[2]
    p = first.reshape(g, kg, g, r)      # [s, i, d, u]
    q = second.reshape(g, g, r, ng)     # [d, s, u, j]
    return np.einsum("sidu,dsuj->sidj", p, q).reshape(g * kg, g * ng)


def pair_rank(shape: tuple[int, int], density: float, groups: int) -> int:
    """r for a ``density`` budget, at most what a pair of blocks can use (min(K, N) / G)."""
    k, n = shape
    r = int(math.floor(density * k * n / (groups * (k + n)) + 1e-9))
    return max(0, min(r, min(k, n) // groups))


def refusal(shape: tuple[int, int], density: float, groups: int) -> str | None:
    """Why ``shape`` cannot be factorized with ``groups`` blocks at ``density`` (None if it can)."""
    k, n = shape
    if groups > 1 and (k % groups or n % groups):
        return f"{groups} blocks need both sides divisible by {groups} (this weight is {k}x{n})"
    if pair_rank(shape, density, groups) < 1:
        what = f"{groups} blocks" if groups > 1 else "a rank-1 product"
        return f"density {density:g} is below what {what} of a {k}x{n} weight need"
    return None


def _damped(gram: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    out = np.array(gram, dtype=np.float64)
    out[np.diag_indices_from(out)] += damping * max(float(np.mean(np.diag(out))), EPS) + EPS
    return out


def _cholesky(gram: np.ndarray) -> np.ndarray:
    """L with LLᵀ = H + λI, λ raised tenfold (up to 1000 times) where rounding leaves H + λI indefinite."""
    for scale in (1.0, 10.0, 100.0, 1000.0):
        try:
            return scipy.linalg.cholesky(_damped(gram, DAMPING * scale), lower=True)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the calibration Gram matrix is not positive semidefinite")


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """gram⁻¹·rhs of a damped symmetric positive (semi)definite ``gram``."""
    try:
        return scipy.linalg.cho_solve((_cholesky(gram), True), rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(_damped(gram), rhs, rcond=None)[0]


def _whitened_svd(weight: np.ndarray, gram: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(U [K, rank], V [rank, N]) minimising ||X(W − UV)|| for H = ``gram``: the truncated SVD of
    LᵀW with H + λI = LLᵀ, the singular values split evenly between the factors."""
    lower = _cholesky(gram)
    u, s, vt = np.linalg.svd(lower.T @ weight, full_matrices=False)
    root = np.sqrt(s[:rank])
    left = scipy.linalg.solve_triangular(lower.T, u[:, :rank] * root, lower=False)
    return left, root[:, None] * vt[:rank]


def lowrank(weight: np.ndarray, gram: np.ndarray, density: float) -> Structured:
    rank = pair_rank(weight.shape, density, 1)
    left, right = _whitened_svd(weight, gram, rank)
    return Structured("lowrank", rank * sum(weight.shape) / weight.size, left[None], right[None])


def blocks(weight: np.ndarray, gram: np.ndarray, density: float, groups: int = 4, rounds: int = ROUNDS) -> Structured:
    why = refusal(weight.shape, density, groups)
    if why is not None:
        raise ValueError(why)
    k, n = weight.shape
    g, r = groups, pair_rank(weight.shape, density, groups)
    kg, ng = k // g, n // g
    first = np.zeros((g, kg, g * r))
    second = np.zeros((g, g * r, ng))
    for d in range(g):
        p, q = _fit_output_block(weight[:, d * ng:(d + 1) * ng], gram, g, r, rounds)
        for s in range(g):
            first[s][:, d * r:(d + 1) * r] = p[s]
            second[d][s * r:(s + 1) * r] = q[s]
    return Structured("blocks", g * r * (k + n) / weight.size, first, second)


def _fit_output_block(target: np.ndarray, gram: np.ndarray, g: int, r: int, rounds: int):
    """([P_s] [K/G, r] each, [Q_s] [r, N/G] each) for one output block's columns ``target`` [K, N/G]."""
    k = target.shape[0]
    kg = k // g
    rows = [slice(s * kg, (s + 1) * kg) for s in range(g)]
    p, q = [], []
    for s, at in enumerate(rows):
        left, right = _whitened_svd(target[at], gram[at, at], r)
        p.append(left)
        q.append(right)
    ht = gram @ target
    den = max(float(np.einsum("ij,ij->", target, ht)), EPS)
    previous = math.inf
    for _ in range(rounds):
        hp, zz, zy, stacked = _refit_q(gram, ht, p, rows)
        q = [stacked[s * r:(s + 1) * r] for s in range(g)]
        # residual gradient T = H(W − Σ_s E_s P_s Q_s), then each P_s exactly with the others fixed
        t = ht - hp @ stacked
        err = float(np.einsum("ij,ij->", target, t) - np.einsum("ij,ij->", stacked, zy - zz @ stacked))  # tr(EᵀHE)
        for s, at in enumerate(rows):
            qq = q[s] @ q[s].T
            step = _solve(gram[at, at], t[at] @ q[s].T)
            step = _solve(qq, step.T).T                       # H_ss⁻¹ T_s Q_sᵀ (Q_s Q_sᵀ)⁻¹
            p[s] = p[s] + step
            t -= gram[:, at] @ (step @ q[s])
        if previous - err < TOLERANCE * max(err, EPS * den):
            break
        previous = err
    stacked = _refit_q(gram, ht, p, rows)[3]  # the last sweep moved P: Q once more, for the final P
    return p, [stacked[s * r:(s + 1) * r] for s in range(g)]


def _refit_q(gram: np.ndarray, ht: np.ndarray, p: list, rows: list):
    """(H·B₁, B₁ᵀHB₁, B₁ᵀHW, the stacked Q_s): all Q_s at once, the least squares on the hidden
    features Z = X·B₁ (B₁ = blockdiag(P_s), [K, G·r]) for the output block's H·W = ``ht``."""
    hp = np.concatenate([gram[:, at] @ p[s] for s, at in enumerate(rows)], axis=1)
    zz = np.concatenate([p[s].T @ hp[at] for s, at in enumerate(rows)], axis=0)
    zy = np.concatenate([p[s].T @ ht[at] for s, at in enumerate(rows)], axis=0)
    return hp, zz, zy, _solve(zz, zy)


__all__ = ["BlockShapes", "STRUCTURED", "Structured", "blocks", "lowrank", "pair_rank", "product", "refusal"]
