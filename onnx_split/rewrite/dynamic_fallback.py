"""``dynamic-fallback`` form: one file that runs everywhere. The site becomes one
``onnx_split.DynamicBlockMatMul`` node, like the kernel form, *and* the model gets a model-local
function of that name whose body is the portable form (block scores, selection, one If per block).

Measured with ONNX Runtime 1.31.1 (docs/DYNAMIC.md, tests/test_dynamic.py): where the kernel
library is registered, ORT runs the node with the kernel; where it is not, ORT inlines the function
and runs the same selection in standard ops. The body takes W whole and slices each block inside
its branch; with graph optimizations on, ORT folds those Slices of a constant into constants. Each
site's function is an overload of the one op name (IR version >= 10), so the kernel's name matches.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..kernel import DOMAIN, OP
from ..version import __version__
from .dynamic_kernel import kernel_cost, kernel_node
from .dynamic_portable import portable_nodes, refuse_portable
from .emit import Emitter, Unsupported
from .form import Form
from .registry import register

MIN_IR = 10
FALLBACK_NOTE = ("runs in any ONNX Runtime (its dynamic sites fall back to standard ONNX); register "
                 "onnx_split.kernel_library() with sess_options.register_custom_ops_library for the compiled kernel")
ATTRIBUTES = ["block", "rule", "keep", "threshold"]


def emit_fallback(em: Emitter, chain, plan) -> str:
    site = chain.first
    if em.ir_version < MIN_IR:
        raise Unsupported(f"the dynamic-fallback form needs IR version >= {MIN_IR} for one function per site "
                          f"(this model has {em.ir_version})")
    body = Emitter(site.name, em.opset, em.taken, em.layout, em.ir_version, source=site.node)
    formal_x, formal_w, formal_s = body.name("fallback/x"), body.name("fallback/W"), body.name("fallback/S")
    formals = [formal_x, formal_w, formal_s]
    formal_c = None
    if plan.fill is not None:  # the node's inputs 3 (bias: none) and 4 (C)
        formal_c = body.name("fallback/C")
        formals += [body.name("fallback/bias"), formal_c]
    y = portable_nodes(body, site, plan, x=formal_x, weight=formal_w, scales=formal_s, compensation=formal_c)
    constants = [onnx.helper.make_node("Constant", [], [t.name], name=f"{t.name}/Constant", value=t)
                 for t in body.initializers]
    y_raw = kernel_node(em, site, plan, site.activation)
    node = em.nodes[-1]
    node.overload = em.name("dynamic")  # unique in the model: this site's function
    func = onnx.helper.make_function(
        DOMAIN, OP, formals, [y], constants + body.nodes,
        [onnx.helper.make_opsetid("", em.opset)], attributes=ATTRIBUTES,
        doc_string=f"onnx_split {__version__}: '{site.name}' as {plan.label}, in standard ONNX (runs where "
                   f"the DynamicBlockMatMul kernel is not registered)")
    func.overload = node.overload
    em.functions.append(func)
    return em.finish_gemm(y_raw, site)


def refuse_fallback(chain, plan) -> str | None:
    why = refuse_portable(chain, plan)
    if why is not None:
        return why
    if chain.first.weight is not None and chain.first.weight.dtype != np.float32:
        return "the dynamic kernel computes float32 only"
    return None


FORM = Form("dynamic-fallback", frozenset({"dynamic"}), emit_fallback, kernel_cost, refuse_fallback,
            "the DynamicBlockMatMul node plus a model-local function of the portable form: the kernel where it "
            "is registered, standard ONNX elsewhere")
register(FORM)
