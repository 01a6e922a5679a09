"""``--tolerance``: share one output-error budget among the sites, in time linear in their number.

Each site offers options (its ladder of plans, refitted) with
- ``gain``: what choosing it saves: measured milliseconds when the candidates were timed, else
  multiply-adds per row;
- ``error``: the estimated relative output error of the model if only this site took it:
  its local (layer-output) error on the calibration rows times the site's measured propagation
  factor (one whole-model run per site; lossy.py).

Errors of different sites are taken as independent, so the model's estimated error is the root of
the sum of their squares. :func:`allocate` is a greedy multiple-choice knapsack: it repeatedly takes
the option with the most gain per unit of added squared error that still fits. The caller confirms
the choice with whole-model runs; :func:`back_off` gives the next, safer choice when the estimate
was optimistic. Pure Python: no model runs here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    plan: object
    gain: float
    error: float


def probe_rung(local: list[float], target: float | None = None) -> int:
    """Which of a site's rungs (their layer errors ``local``) its one whole-model run measures, to
    learn how its layer error reaches the outputs: one whose layer error is above 0 (a rung that
    drops nothing measures nothing), the closest to ``target`` in log scale, or without a target
    the median one; any rung when none is above 0."""
    live = [r for r, e in enumerate(local) if e > 0] or list(range(len(local)))
    if target is None:
        return sorted(live, key=lambda r: local[r])[len(live) // 2]
    return min(live, key=lambda r: abs(math.log(local[r] / max(target, 1e-12))) if local[r] > 0 else 0.0)


def propagated(local: list[float], probe: int, measured: float) -> list[float]:
    """Every rung's estimated output error from the probe's ``measured`` one: the layer errors
    scaled by the probe's output/layer ratio; a rung with no layer error gets none, unless the
    probe had none either (then it is the probe's measured figure)."""
    if local[probe] > 0:
        factor = measured / local[probe]
        out = [factor * e if e > 0 else 0.0 for e in local]
    else:
        out = [measured] * len(local)  # (none is above 0: see probe_rung)
    out[probe] = measured
    return out


def estimate(options: dict[int, list[Option]], choice: dict[int, int]) -> float:
    """The estimated output error of ``choice`` (site -> option index)."""
    return math.sqrt(sum(options[i][r].error ** 2 for i, r in choice.items()))


def allocate(options: dict[int, list[Option]], budget: float, path: list | None = None) -> dict[int, int]:
    """site -> chosen option index (sites left dense are absent), estimated error <= ``budget``;
    ``path`` (a list) receives the choice after every step taken."""
    chosen: dict[int, int] = {}
    room = budget * budget
    used = 0.0
    while True:
        best = None
        for i, opts in options.items():
            now = chosen.get(i)
            gain0 = opts[now].gain if now is not None else 0.0
            err0 = opts[now].error ** 2 if now is not None else 0.0
            for r, option in enumerate(opts):
                added_gain = option.gain - gain0
                if not added_gain > 0 or not math.isfinite(option.error):
                    continue
                added = option.error ** 2 - err0
                if used + added > room * (1 + 1e-12):
                    continue
                key = (added <= 0, added_gain / max(added, 1e-300))
                if best is None or key > best[0]:
                    best = (key, i, r, added)
        if best is None:
            return chosen
        _, i, r, added = best
        chosen[i] = r
        used += added
        if path is not None:
            path.append(dict(chosen))


def back_off(options: dict[int, list[Option]], choice: dict[int, int]) -> dict[int, int] | None:
    """``choice`` with its costliest site (most squared error per unit of gain) one step safer: the
    option of that site with the next smaller error (at an equal error, the one that saves less:
    the estimate that failed gave no other order, and a rung saving less is most often one that
    drops less), or dense. None when nothing is left to undo."""
    if not choice:
        return None
    worst = max(choice, key=lambda i: options[i][choice[i]].error ** 2 / max(options[i][choice[i]].gain, 1e-300))
    now = options[worst][choice[worst]]
    safer = [r for r, o in enumerate(options[worst])
             if o.gain > 0 and (o.error < now.error or (o.error == now.error and o.gain < now.gain))]
    out = dict(choice)
    if safer:
        out[worst] = max(safer, key=lambda r: (options[worst][r].error, options[worst][r].gain))
    else:
        del out[worst]
    return out
