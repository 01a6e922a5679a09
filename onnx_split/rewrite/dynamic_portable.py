"""``dynamic-portable`` form: a dynamic plan in standard ONNX, for runtimes without the kernel.

The block scores and the selection are computed with standard ops (Reshape, Pad, ReduceSumSquare,
Sqrt, Mul, then TopK + ScatterElements, or Greater); then each block of W is its own initializer,
guarded by an ``If`` on that block's selection: a kept block adds x_b @ W_b to the running sum, a
skipped one passes the sum on untouched. Measured in the issue's prototype: Gather/Slice of the
kept rows copies them and loses, the If-per-block form wins at K = 4096 but each If costs a few
microseconds, so ``--layout auto`` times it and keeps it only where it is faster than dense.
Needs opset 11 (ScatterElements, Slice with inputs).
"""
from __future__ import annotations

import numpy as np
import onnx

from .emit import Emitter, Unsupported
from .form import Form
from .registry import register

MIN_OPSET = 11


def selection(em: Emitter, site, plan, x: str, scales: str | None = None) -> str:
    """A bool [n_blocks] tensor: which blocks this call keeps."""
    k, block, n_blocks = plan.k, plan.block, plan.n_blocks
    flat = em.reshape(x, em.ints("rows_shape", [-1, k]), "score/Reshape", "the activation as rows [M, K]")
    if n_blocks * block != k:
        pads = em.ints("score/pads", [0, 0, 0, n_blocks * block - k])
        flat = em.node("Pad", [flat, pads], "score/Pad", "pad the last block with zero features")
    blocks = em.reshape(flat, em.ints("blocks_shape", [-1, n_blocks, block]), "score/blocks/Reshape",
                        "the activation as [M, blocks, block]")
    if em.opset >= 18:
        sums = em.node("ReduceSumSquare", [blocks, em.ints("score/axes", [0, 2])], "score/ReduceSumSquare",
                       "||x_b||^2 over the call's rows", keepdims=0)
    else:
        sums = em.node("ReduceSumSquare", [blocks], "score/ReduceSumSquare", "||x_b||^2 over the call's rows",
                       axes=[0, 2], keepdims=0)
    rows = em.node("Shape", [flat], "score/rows/Shape", "rows of the call")
    rows = em.node("Gather", [rows, em.ints("score/rows/index", np.int64(0))], "score/rows/Gather", "rows of the call",
                   axis=0)
    rows = em.node("Cast", [rows], "score/rows/Cast", "rows of the call", to=onnx.TensorProto.FLOAT)
    mean = em.node("Div", [sums, rows], "score/Div", "mean over the call's rows")
    norms = em.node("Sqrt", [mean], "score/Sqrt", "root mean square of ||x_b|| over the rows")
    scales = scales or em.const("S", np.asarray(plan.scales, dtype=np.float32))
    scores = em.node("Mul", [norms, scales], "score/Mul",
                     "block scores ||x_b|| * S_b")
    if plan.rule == "threshold":
        return em.node("Greater", [scores, em.const("threshold", np.asarray(plan.threshold, dtype=np.float32))],
                       "select/Greater", "keep the blocks scoring above the calibrated threshold")
    values, indices = em.name("select/TopK_values"), em.name("select/TopK_indices")
    em.node("TopK", [scores, em.ints("select/k", [plan.keep_blocks])], "select/TopK",
            f"the {plan.keep_blocks} best blocks", output=values)
    em.nodes[-1].output.append(indices)
    marks = em.node("ScatterElements", [em.const("select/zeros", np.zeros(n_blocks, np.float32)), indices,
                                        em.const("select/ones", np.ones(plan.keep_blocks, np.float32))],
                    "select/ScatterElements", "mark the kept blocks", axis=0)
    return em.node("Cast", [marks], "select/Cast", "kept blocks as bool", to=onnx.TensorProto.BOOL)


def emit_portable(em: Emitter, chain, plan) -> str:
    return em.finish_gemm(portable_nodes(em, chain.first, plan), chain.first)


def portable_nodes(em: Emitter, site, plan, x: str | None = None, weight: str | None = None,
                   scales: str | None = None, compensation: str | None = None) -> str:
    """The selection and the If per block on activation ``x``; each block's weight is its own
    initializer, or (``weight`` given: a function body) a Slice of ``weight`` inside the block's
    branch, which ORT folds into a constant when it inlines the function. Returns x @ W masked.
    A compensated plan's skipped block adds its row of C (``compensation``: a function's input
    holding C, else a constant per block)."""
    if em.opset < MIN_OPSET:
        raise Unsupported(f"the portable dynamic form needs opset >= {MIN_OPSET} (this model has {em.opset})")
    x, dtype = x or site.activation, onnx.TensorProto.FLOAT
    keep = selection(em, site, plan, x, scales)
    shape = em.node("Shape", [x], "zeros/Shape", "leading dims of the activation")
    lead = em.slice(shape, 0, -1, 0, "zeros/Slice", "leading dims of the activation")
    out_shape = em.node("Concat", [lead, em.ints("zeros/N", [plan.n])], "zeros/Concat", "output shape", axis=0)
    acc = em.node("ConstantOfShape", [out_shape], "zeros/ConstantOfShape", "the sum starts at zero",
                  value=onnx.helper.make_tensor("zero", dtype, [1], [0.0]))
    dense = np.asarray(site.weight, dtype=np.float32)
    rows = plan.compensation(site.weight) if plan.fill is not None and compensation is None else None
    for b in range(plan.n_blocks):
        start, end = b * plan.block, min(plan.k, (b + 1) * plan.block)
        local = f"block{b}"
        cond = em.node("Gather", [keep, em.ints(f"{local}/index", np.int64(b))], f"{local}/Gather",
                       f"is block {b} kept", axis=0)
        w_b = em.const(f"{local}/W", np.ascontiguousarray(dense[start:end])) if weight is None else None
        outer, em.nodes = em.nodes, []
        if w_b is None:
            w_b = em.slice(weight, start, end, 0, f"{local}/W/Slice", f"rows {start}:{end} of W")
        xb = em.slice(x, start, end, em.axis(site.activation_rank, -1), f"{local}/Slice", f"inputs {start}:{end}")
        part = em.node("MatMul", [xb, w_b], f"{local}/MatMul", f"x_b @ W_b of block {b} of '{site.name}'")
        added = em.node("Add", [acc, part], f"{local}/Add", f"add block {b}")
        then_nodes, em.nodes = em.nodes, []
        if plan.fill is None:
            passed = em.node("Identity", [acc], f"{local}/skip/Identity", f"block {b} skipped")
        else:
            c_b = (em.const(f"{local}/C", rows[b]) if compensation is None else
                   em.node("Gather", [compensation, em.ints(f"{local}/C/index", np.int64(b))], f"{local}/C/Gather",
                           f"row {b} of C", axis=0))
            passed = em.node("Add", [acc, c_b], f"{local}/skip/Add", f"block {b} skipped: add its mean contribution")
        else_nodes, em.nodes = em.nodes, outer
        then_graph = onnx.helper.make_graph(then_nodes, em.name(f"{local}/then"), [],
                                            [onnx.helper.make_tensor_value_info(added, dtype, None)])
        else_graph = onnx.helper.make_graph(else_nodes, em.name(f"{local}/else"), [],
                                            [onnx.helper.make_tensor_value_info(passed, dtype, None)])
        acc = em.node("If", [cond], f"{local}/If", f"block {b} of '{site.name}' when it is kept",
                      then_branch=then_graph, else_branch=else_graph)
    return acc


def refuse_portable(chain, plan) -> str | None:
    site = chain.first
    if len(chain.sites) != 1:
        return "dynamic plans are made per site"
    if site.weight.dtype != np.float32:
        return f"the portable dynamic form is written for float32 (this weight is {site.weight.dtype})"
    if site.trans_a:
        return "Gemm with transA: the portable dynamic form takes the activation as rows"
    return None


def portable_cost(plan, layer: int | None = None) -> int:
    return plan.macs_kept()


FORM = Form("dynamic-portable", frozenset({"dynamic"}), emit_portable, portable_cost, refuse_portable,
            "standard ONNX: block scores and selection, then one If per block of W")
register(FORM)
