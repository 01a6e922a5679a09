"""``dynamic-kernel`` form: a dynamic plan as one ``onnx_split.DynamicBlockMatMul`` node, run by the
compiled kernel (onnx_split/kernels/dynamic_block_matmul.c, found by ``onnx_split.kernel_library()``).

The node reads the activation, the weight [K, N] as stored (the kernel reads the kept rows in
place), the per-block score scales S, and applies the selection itself; a Gemm's alpha and bias
follow as usual. A model holding this node needs the library registered in its session
(``SessionOptions.register_custom_ops_library(onnx_split.kernel_library())``); without it ONNX
Runtime refuses to load it ("onnx_split:DynamicBlockMatMul(-1) is not a registered function/op"),
it never runs dense. The model metadata ``onnx_split.load`` says so.
"""
from __future__ import annotations

import numpy as np

from ..kernel import DOMAIN, OP, kernel_absence
from .emit import Emitter
from .form import Form
from .registry import register

LOAD_NOTE = ("needs the onnx_split kernel: sess_options.register_custom_ops_library(onnx_split.kernel_library()) "
             "before onnxruntime.InferenceSession(...)")


def kernel_node(em: Emitter, site, plan, x: str) -> str:
    """The DynamicBlockMatMul node of ``plan`` on activation ``x``; returns its output (before alpha/bias)."""
    w = em.const("W", np.ascontiguousarray(site.weight, dtype=np.float32))
    s = em.const("S", np.asarray(plan.scales, dtype=np.float32))
    inputs = [x, w, s]
    compensation = plan.compensation(site.weight)
    if compensation is not None:  # no bias input (finish_gemm adds Gemm's C), then each skipped block's row
        inputs += ["", em.const("C", compensation)]
    doc = (f"'{site.name}' as {plan.label}: keeps the blocks of inputs with the largest "
           f"{'||x_b||*||W_b||' if plan.score == 'xw' else '||x_b||'} over the call's rows")
    return em.node(OP, inputs, OP, doc, domain=DOMAIN, block=plan.block, rule=0 if plan.rule == "topk" else 1,
                   keep=plan.keep_blocks if plan.rule == "topk" else 0, threshold=float(plan.threshold))


def emit_kernel(em: Emitter, chain, plan) -> str:
    site = chain.first
    return em.finish_gemm(kernel_node(em, site, plan, site.activation), site)


def refuse_kernel(chain, plan) -> str | None:
    site = chain.first
    if len(chain.sites) != 1:
        return "dynamic plans are made per site"
    if site.weight.dtype != np.float32:
        return f"the dynamic kernel computes float32 only (this weight is {site.weight.dtype})"
    if site.trans_a:
        return "Gemm with transA: the kernel takes the activation as rows"
    absent = kernel_absence()
    if absent is not None:
        return absent
    return None


def kernel_cost(plan, layer: int | None = None) -> int:
    return plan.macs_kept()


FORM = Form("dynamic-kernel", frozenset({"dynamic"}), emit_kernel, kernel_cost, refuse_kernel,
            "one onnx_split.DynamicBlockMatMul node run by the compiled kernel (reads the kept rows of W in place)")
register(FORM)
