"""Calibration moments of the candidate sites, and the refit of their lossy plans (refit.py) in the
sites' own terms: Gemm's alpha, beta and C, the weight as stored.

- :func:`collect`: one streamed pass over the calibration batches, the activations entering every
  main-graph candidate site summed into :class:`~onnx_split.moments.Moments` (never all samples'
  activations at once).
- :func:`fit`: a plan's kept blocks refitted to the layer's original output.
- :func:`sequential`: the chosen plans refitted in dependency order, each site on the activations
  the already-refitted sites before it produce (so errors do not compound), one streamed pass per
  level of the sites' dependency graph.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from .chains import feature_vector
from .pruned import Evaluator, has_constant_bias
from .refit import DAMPING, DAMPINGS, Problem, column_groups
from .sites import Site
from .moments import STORED, Moments, rows


def _key(site: Site) -> tuple[str, bool]:
    return site.activation, site.trans_a


def refittable(site: Site) -> bool:
    """A main-graph site whose activation can be captured and whose alpha is not 0."""
    return site.scope == "main" and site.alpha != 0.0


def collect(evaluator: Evaluator, sites: list[Site], indices: list[int], batches: list[dict],
            progress=None, weights: dict | None = None, biases: dict | None = None,
            original: bool = False, reference: bool = False
            ) -> dict[tuple[str, bool], Moments | tuple[Moments, ...]]:
    """{(activation, trans_a): Moments} over ``batches`` for the main-graph sites of ``indices``
    (stored in moments.STORED).

    With ``weights``/``biases`` (sites already refitted) and ``original``, each entry is the pair
    (moments of the new activation X', cross moments [X',1]^T[X,1] with the original's X); with
    ``reference`` as well, a third: the original's own [X,1]^T[X,1] (summed as the first pass sums it)."""
    progress = progress or (lambda *a: None)
    keyed = {}
    for i in indices:
        if refittable(sites[i]):
            keyed.setdefault(_key(sites[i]), sites[i])
    names = list(dict.fromkeys(k[0] for k in keyed))
    found: dict = {}
    for n, batch in enumerate(batches):
        progress(n, len(batches))
        new = evaluator.activations(batch, weights or {}, biases or {}, names)
        old = evaluator.activations(batch, {}, {}, names) if original else None
        for key, site in keyed.items():
            x_new = rows(site, new[key[0]])
            if key not in found:
                k = x_new.shape[1]
                found[key] = tuple(Moments(k, STORED) for _ in range(3 if reference else 2)) if original else \
                    Moments(k, STORED)
            if original:
                x_old = rows(site, old[key[0]])
                found[key][0].add(x_new)
                found[key][1].add(x_old, x_new)
                if reference:
                    found[key][2].add(x_old)
            else:
                found[key].add(x_new)
    progress(len(batches), len(batches))
    return found


def params(site: Site) -> tuple[np.ndarray, np.ndarray | None]:
    """(alpha * W, beta * C as one value per output) in ``y = x @ W + b`` form; the bias is None
    where the site has no constant per-feature C (a refit then leaves the bias alone)."""
    weight = site.weight.astype(np.float64) * site.alpha
    bias = None
    if has_constant_bias(site) and site.beta != 0.0 and np.size(site.bias_value) == weight.shape[1]:
        vector = feature_vector(site.bias_value, weight.shape[1], None)
        if vector is not None and vector.ndim == 1:
            bias = vector.astype(np.float64) * site.beta
    return weight, bias


@dataclass
class Fold:
    """The moments of one set of calibration samples for one site: ``gram`` = [X',1]^T[X',1],
    ``cross`` = [X',1]^T[X,1] and ``original`` = [X,1]^T[X,1] (None: X' = X)."""

    gram: np.ndarray
    cross: np.ndarray | None = None
    original: np.ndarray | None = None


def choose_damping(held_out, start: float | None = None) -> tuple[float, float]:
    """(damping, its held-out error): the damping of :data:`~onnx_split.refit.DAMPINGS` where
    ``held_out(damping)`` is smallest, found by walking from ``start`` (the first of them if it
    is not one) towards smaller errors until the error stops falling. A ridge fit's held-out error
    falls and then rises with the damping, so the walk ends at the smallest of them wherever that
    holds (on every site measured: docs/SIGNIFICANCE.md) and tries two or three dampings where
    ``start`` is, or is next to, the best (sites of one model tend to choose alike)."""
    at = DAMPINGS.index(start) if start in DAMPINGS else 0
    errors = {at: held_out(DAMPINGS[at])}

    def walk(step: int) -> bool:
        """Walk from ``at`` by ``step`` while the error falls; whether it fell at all."""
        nonlocal at
        moved = False
        while 0 <= at + step < len(DAMPINGS):
            nxt = at + step
            errors[nxt] = held_out(DAMPINGS[nxt])
            if not errors[nxt] < errors[at]:
                break
            at, moved = nxt, True
        return moved

    if not walk(1):
        walk(-1)
    return DAMPINGS[at], errors[at]


class Fitter:
    """The refits of one site's plans from the moments of its calibration samples.

    With two folds (the two halves of the search samples), the damping is chosen by
    cross-validation, fitted on one half and measured on the other, and the error a fit reports
    is that held-out error: a refit that only memorises the calibration rows (as many unknowns
    as rows) is not mistaken for a good one. The damping is chosen on the site's first plan and
    kept for its others. The final fit uses both halves; with ``final_fold`` (a search that measures
    its plans on the other half: lossy.py) it is the fit on that half, and each error is that fit's,
    measured on the other half only."""

    def __init__(self, site: Site, folds: list[Fold], damping: float | None = None, start: float | None = None,
                 final_fold: int | None = None):
        """``damping``: use this one instead of choosing (a site refitted again keeps its choice);
        ``start``: where the choice starts (:func:`choose_damping`), e.g. another site's choice;
        ``final_fold``: the final fit on that fold's rows only, not on all of them (a search that
        measures its plans on the other fold's samples: lossy.py)."""
        self.site, self.damping, self.start = site, damping, start
        weight, bias = params(site)
        self.has_bias = bias is not None
        problems = [Problem(weight, bias, f.gram, f.cross, f.original) for f in folds]
        self.folds = problems if len(problems) > 1 else []
        self.final_fold = final_fold if self.folds else None
        if self.final_fold is not None:  # all rows together are never solved on
            self.final = self.folds[self.final_fold]
        else:
            self.final = Problem.combined(problems) if self.folds else problems[0]
        self._measured: dict = {}  # (mask shape, packed mask, refit) -> (masked error, error, damping)

    def _on_folds(self, groups, news: list[np.ndarray], blocks: list[list[np.ndarray]]) -> float:
        """The error over both folds of ``news[f]`` measured on fold f (``blocks[f]``: fold f's
        :meth:`~onnx_split.refit.Problem.blocks` of ``groups``)."""
        num = den = 0.0
        for problem, new, fold_blocks in zip(self.folds, news, blocks):
            e = problem.error(groups, new, fold_blocks)
            num, den = num + e * e * problem.den, den + problem.den
        return float(np.sqrt(num / den)) if den > 0 else 0.0

    def fit(self, plan, refit: bool = True, final: bool = True):
        """(plan, its layer error): refitted where that lowers the (held-out) error, else the
        masked plan with its error. Without ``final`` only the error is wanted: the plan comes
        back unfitted (the dry run)."""
        found, err = self.fit_mask(plan.masks[0], refit, final)
        return (plan.with_fit(None) if found is None else plan.with_fit((found,))), err

    def fit_mask(self, mask: np.ndarray, refit: bool = True, final: bool = True):
        """((weight, C) as the site stores them, or None for the masked original; the layer error).
        A mask measured before (the dry run's probe, fitted for good after its error was read)
        is not measured again: only its final solve is left."""
        groups = column_groups(mask)
        key = (mask.shape, np.packbits(mask).tobytes(), refit)
        new = None
        if key in self._measured:
            masked_err, err, damping = self._measured[key]
        else:
            masked_err, err, damping, new = self._measure(mask, groups, refit)
            self._measured[key] = masked_err, err, damping
        if not refit:
            return None, masked_err
        if not err < masked_err or not final:
            return None, (masked_err if not err < masked_err else err)
        if new is None:
            new = self.final.solve(groups, damping)
        site, stored_c = self.site, None
        if self.has_bias:
            stored_c = (new[-1] / site.beta).astype(site.bias_value.dtype).reshape(np.shape(site.bias_value))
        return ((new[:-1] / site.alpha).astype(site.weight.dtype), stored_c), err

    def _measure(self, mask: np.ndarray, groups, refit: bool):
        """(masked error, refitted error, damping, the final refit where it came for free): the
        errors held out over the folds when there are two (with ``final_fold``: the fit on that fold
        measured on the other, the fit that is then kept); None for what ``refit`` skips."""
        if self.final_fold is not None:
            return self._measure_one_way(mask, groups, refit)
        if self.folds:
            blocks = [p.blocks(groups) for p in self.folds]
            masked_err = self._on_folds(groups, [p.masked(mask) for p in self.folds], blocks)
        else:
            blocks = self.final.blocks(groups)
            masked_err = self.final.error(groups, self.final.masked(mask), blocks)
        if not refit:
            return masked_err, None, None, None
        if self.folds:  # fitted on one half, measured on the other
            (a, b), (in_a, in_b) = self.folds, blocks

            def held_out(d: float) -> float:
                return self._on_folds(groups, [b.solve(groups, d, in_b), a.solve(groups, d, in_a)], blocks)

            if self.damping is None:  # chosen once per site
                self.damping, err = choose_damping(held_out, self.start)
            else:
                err = held_out(self.damping)
            return masked_err, err, self.damping, None
        damping = DAMPING if self.damping is None else self.damping  # one fold: a damping chosen before, if any
        new = self.final.solve(groups, damping, blocks)
        return masked_err, self.final.error(groups, new, blocks), damping, new

    def _measure_one_way(self, mask: np.ndarray, groups, refit: bool):
        """:meth:`_measure` where only the fit on ``final_fold`` is kept: each damping tried is one
        solve on that fold and one error on the other (half the solves of both ways), and the
        solve of the damping chosen is the fit."""
        fit_on, other = self.final, self.folds[1 - self.final_fold]
        in_fit, in_other = fit_on.blocks(groups), other.blocks(groups)
        masked_err = other.error(groups, other.masked(mask), in_other)
        if not refit:
            return masked_err, None, None, None
        solved: dict[float, np.ndarray] = {}

        def held_out(d: float) -> float:
            solved[d] = fit_on.solve(groups, d, in_fit)
            return other.error(groups, solved[d], in_other)

        if self.damping is None:  # chosen once per site
            self.damping, err = choose_damping(held_out, self.start)
        else:
            err = held_out(self.damping)
        return masked_err, err, self.damping, solved[self.damping]


def values(sites: list[Site], plans: dict) -> tuple[dict, dict]:
    """({site: effective weight}, {site: effective C}) of ``plans`` (C only where it changed)."""
    weights = {i: plan.effective_weight(0, sites[i].weight) for i, plan in plans.items()}
    biases = {i: plan.effective_bias(0, sites[i].bias_value) for i, plan in plans.items()
              if getattr(plan, "refitted", False) and has_constant_bias(sites[i])}
    return weights, biases


def upstream(model: onnx.ModelProto, sites: list[Site], indices: list[int]) -> dict[int, set[int]]:
    """{site: the sites of ``indices`` whose outputs it depends on} (main graph)."""
    by_node = {sites[i].index: i for i in indices if sites[i].scope == "main"}
    depends: dict[str, frozenset] = {}
    found = {}
    for n, node in enumerate(model.graph.node):
        before = frozenset().union(*(depends.get(x, frozenset()) for x in node.input if x))
        if n in by_node:
            i = by_node[n]
            found[i] = set(depends.get(sites[i].activation, frozenset()))
            before = before | {i}
        for out in node.output:
            depends[out] = before
    return {i: found.get(i, set()) for i in indices}


def levels(chosen: list[int], ups: dict[int, set[int]]) -> dict[int, int]:
    """Each chosen site's level: 0 if no chosen site is upstream of it, else one more than theirs."""
    level: dict[int, int] = {}
    remaining = set(chosen)
    while remaining:
        ready = [i for i in remaining if all(j in level for j in ups.get(i, set()) & set(chosen))]
        if not ready:  # a cycle cannot happen in a valid graph; keep the rest at one level
            ready = list(remaining)
        for i in ready:
            level[i] = 1 + max((level[j] for j in ups.get(i, set()) & set(chosen) if j in level), default=-1)
        remaining -= set(ready)
    return level


def sequential(evaluator: Evaluator, sites: list[Site], plans: dict, first: dict, ups: dict[int, set[int]],
               folds: list[list[dict]], deadline: float | None = None,
               progress=None, dampings: dict | None = None) -> tuple[dict, bool]:
    """``plans`` (site -> unfitted plan) refitted level by level; ``first`` holds the plans already
    fitted on the original activations (used as they are for level 0). ``folds``: the search
    samples' batches, in one or two folds; each level's pass sums the new, cross and original
    moments of its sites (nothing of the first pass is kept for it); ``dampings``: per site, the
    damping its first fit chose (kept). Returns (plans, finished); unfinished when ``deadline``
    passed (the remaining sites keep their ``first`` fit)."""
    progress = progress or (lambda *a: None)
    fitted = dict(first)
    level = levels([i for i in plans if refittable(sites[i])], ups)
    top = max(level.values(), default=0)
    for lvl in range(1, top + 1):
        if deadline is not None and time.monotonic() > deadline:
            return fitted, False
        progress(lvl - 1, top)
        here = [i for i in plans if level.get(i) == lvl]
        weights, biases = values(sites, {j: fitted[j] for j in fitted if level.get(j, top + 1) < lvl})
        found = [collect(evaluator, sites, here, batches, weights=weights, biases=biases, original=True,
                         reference=True) for batches in folds]
        for i in here:
            key, k = _key(sites[i]), sites[i].weight.shape[0]
            triples = [f.get(key) for f in found]
            if any(t is None or t[0].k != k or not t[0].count or not t[2].count for t in triples):
                continue
            moments = [Fold(g.sum, c.sum, o.sum) for g, c, o in triples]
            fitted[i] = Fitter(sites[i], moments, (dampings or {}).get(i)).fit(plans[i])[0]
    progress(top, top)
    return fitted, True
