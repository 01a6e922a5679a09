"""The forms of ``block-factor`` plans (``--factorize blocks`` / ``lowrank``): x @ B₁ · Π · B₂ as two
run-time MatMuls, fewer multiply-adds than the dense weight.

The activation is taken as rows [M, K] (flattened when it has more axes; Gemm's transA undone);
the input blocks and the output blocks are contiguous runs of K and N, so no Gather is written.

- ``factor-batched``: one MatMul per factor over all blocks. x [M, K] -> Reshape [M, G, K/G] ->
  Transpose [G, M, K/G] -> MatMul B₁ [G, K/G, M/G] -> Π (Reshape [G, M, G, r], Transpose to
  [G, M, G, r] with the two block axes swapped, Reshape [G, M, G·r]) -> MatMul B₂ [G, G·r, N/G]
  -> Transpose [M, G, N/G] -> Reshape [M, N]. Best at few rows (measured in docs/FACTORIZE.md).
- ``factor-parallel``: one MatMul per block of each factor (Split -> MatMul -> Concat, then Π as
  Reshape/Transpose/Reshape on [M, M_hidden], then Split -> MatMul -> Concat).

Low rank (G = 1) is two MatMuls in either form. ``--layout auto`` times both against the dense node
and keeps the fastest, or dense.
"""
from __future__ import annotations

import numpy as np

from .emit import Emitter, Unsupported
from .form import Form
from .registry import register


def _rows(em: Emitter, site, k: int) -> str:
    """The activation as [M, K]."""
    x = site.activation
    if site.trans_a:
        return em.node("Transpose", [x], "inputs/Transpose", "Gemm's transA: the activation as rows", perm=[1, 0])
    if site.activation_rank != 2:
        return em.reshape(x, em.ints("flat_shape", [-1, k]), "flatten/Reshape", "the activation as rows [M, K]")
    return x


def _restore(em: Emitter, y: str, site, n: int) -> str:
    """[M, N] back to the original output's shape."""
    if site.activation_rank == 2 or site.op_type == "Gemm":
        return y
    lead = em.node("Shape", [site.activation], "shape/Shape", "leading dims of the activation")
    lead = em.slice(lead, 0, -1, 0, "shape/Slice", "leading dims of the activation")
    shape = em.node("Concat", [lead, em.ints("shape/N", [n])], "shape/Concat", "output shape", axis=0)
    return em.reshape(y, shape, "unflatten/Reshape", "restore the leading dims")


def _describe(site, plan) -> str:
    return f"'{site.name}' as {plan.method}: {plan.label}"


def _low_rank(em: Emitter, x: str, site, plan) -> str:
    what = _describe(site, plan)
    h = em.node("MatMul", [x, em.const("U", plan.first[0])], "U/MatMul", f"x @ U of {what}")
    return em.node("MatMul", [h, em.const("V", plan.second[0])], "V/MatMul", f"(x @ U) @ V of {what}")


def _permute(em: Emitter, h: str, g: int, r: int, batched: bool, doc: str) -> str:
    """Π on the hidden features: [G, M, G·r] (batched) or [M, G·G·r] (parallel), block axes swapped."""
    if batched:
        h = em.reshape(h, em.ints("mix/split_shape", [g, -1, g, r]), "mix/split/Reshape", doc)
        h = em.node("Transpose", [h], "mix/Transpose", doc, perm=[2, 1, 0, 3])
        return em.reshape(h, em.ints("mix/join_shape", [g, -1, g * r]), "mix/join/Reshape", doc)
    h = em.reshape(h, em.ints("mix/split_shape", [-1, g, g, r]), "mix/split/Reshape", doc)
    h = em.node("Transpose", [h], "mix/Transpose", doc, perm=[0, 2, 1, 3])
    return em.reshape(h, em.ints("mix/join_shape", [-1, g * g * r]), "mix/join/Reshape", doc)


def emit_factor(em: Emitter, chain, plan, batched: bool) -> str:
    site = chain.first
    k, n = plan.layer_shape(0)
    g, r = plan.groups, plan.rank
    em.at(site.name, site.node)
    x = _rows(em, site, k)
    what = _describe(site, plan)
    mix = f"the stride permutation between the factors of {what}: each input block reaches every output block"
    if g == 1:
        y = _low_rank(em, x, site, plan)
    elif batched:
        h = em.reshape(x, em.ints("blocks_shape", [-1, g, k // g]), "blocks/Reshape", f"the {g} input blocks of {what}")
        h = em.node("Transpose", [h], "blocks/Transpose", f"the {g} input blocks first", perm=[1, 0, 2])
        h = em.node("MatMul", [h, em.const("B1", plan.first)], "B1/MatMul", f"the {g} blocks of B1 of {what}")
        h = _permute(em, h, g, r, True, mix)
        h = em.node("MatMul", [h, em.const("B2", plan.second)], "B2/MatMul", f"the {g} blocks of B2 of {what}")
        h = em.node("Transpose", [h], "outputs/Transpose", "the output blocks back in order", perm=[1, 0, 2])
        y = em.reshape(h, em.ints("outputs_shape", [-1, n]), "outputs/Reshape", f"the {n} outputs of '{site.name}'")
    else:
        xs = em.split(x, g, 1, "blocks/Split", f"the {g} input blocks of {what}")
        hs = [em.node("MatMul", [xs[s], em.const(f"block{s}/B1", plan.first[s])], f"block{s}/B1/MatMul",
                      f"block {s} of B1 of {what}") for s in range(g)]
        h = em.node("Concat", hs, "B1/Concat", f"the hidden features of {what}", axis=1)
        h = _permute(em, h, g, r, False, mix)
        zs = em.split(h, g, 1, "hidden/Split", f"the features of each output block of {what}")
        ys = [em.node("MatMul", [zs[d], em.const(f"block{d}/B2", plan.second[d])], f"block{d}/B2/MatMul",
                      f"block {d} of B2 of {what}") for d in range(g)]
        y = em.node("Concat", ys, "B2/Concat", f"the {n} outputs of '{site.name}'", axis=1)
    return em.finish_gemm(_restore(em, y, site, n), site)


def refuse_factor(chain, plan) -> str | None:
    if len(chain.sites) != 1:
        return "block-factor plans are made per site"
    if chain.first.weight.dtype.kind != "f":
        return f"the block-factor forms write float weights (this one is {chain.first.weight.dtype})"
    return None


def factor_macs(plan, layer: int | None = None) -> int:
    return plan.macs_factors()


FORMS = (
    Form("factor-batched", frozenset({"block-factor"}), lambda em, chain, plan: emit_factor(em, chain, plan, True),
         factor_macs, refuse_factor, "B1, the stride permutation, B2: one MatMul over all blocks per factor"),
    Form("factor-parallel", frozenset({"block-factor"}), lambda em, chain, plan: emit_factor(em, chain, plan, False),
         factor_macs, refuse_factor, "B1, the stride permutation, B2: one MatMul per block (Split -> MatMul -> Concat)"),
)
register(*FORMS)

__all__ = ["FORMS", "emit_factor"]
