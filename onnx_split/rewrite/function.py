"""``function`` layout: a rewritten site (or chain of sites) becomes one node of the ``onnx_split``
domain, defined by a model-local ONNX function whose body is the parallel layout.

Netron shows one node per site that opens into its parts; ORT inlines the function when it loads
the model. The parts' weights stay graph initializers and are the node's inputs (so they are
stored once, as usual); small index and shape constants live in the body as Constant nodes.
Model-local functions need IR version 8; function overloads (one op name, many bodies) need 10,
so older models get one op name per site instead.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..version import __version__
from ..chains import Chain
from .emit import Emitter, Unsupported, tag
from .form import Layout
from .registry import register
from .parallel import LAYOUT as PARALLEL

DOMAIN = "onnx_split"
SMALL = 64  # constants up to this many elements go into the body


def wrap_function(em: Emitter, chain: Chain, output: str, opset: int, index: int,
                  overloads: set[str]) -> onnx.FunctionProto:
    """Replace ``em``'s nodes by one call of a new function (returned); its weights stay in ``em``.
    ``overloads`` are the function ids already written (updated)."""
    if em.ir_version < 8:
        raise Unsupported(f"the function layout needs IR version >= 8 (this model has {em.ir_version})")
    produced = {o for n in em.nodes for o in n.output}
    small = [t for t in em.initializers if int(np.prod(t.dims, dtype=np.int64)) <= SMALL]
    large = [t for t in em.initializers if int(np.prod(t.dims, dtype=np.int64)) > SMALL]
    initial = {t.name for t in em.initializers}
    external = []
    for node in em.nodes:
        for name in node.input:
            if name and name not in produced and name not in initial and name not in external:
                external.append(name)
    body = [onnx.helper.make_node("Constant", [], [t.name], name=f"{t.name}/Constant", value=t) for t in small]
    body += em.nodes
    inputs = external + [t.name for t in large]
    op_type = "BlockMatMul" if len(chain.sites) == 1 else "BlockNetwork"
    overload = em.ir_version >= 10
    if not overload:
        op_type = f"{op_type}_{index}"
    func = onnx.helper.make_function(DOMAIN, op_type, inputs, [output], body,
                                     [onnx.helper.make_opsetid("", opset)],
                                     doc_string=f"onnx_split {__version__}: '{chain.name}' as {_parts(em)}")
    em.at(chain.first.name, chain.first.node)
    node = onnx.helper.make_node(op_type, inputs, [output], name=em.name("function"), domain=DOMAIN,
                                 doc_string=func.doc_string)
    if overload:
        label = chain.first.name if chain.first.scope == "main" else f"{chain.first.scope}/{chain.first.name}"
        unique, i = label, 1
        while unique in overloads:
            unique, i = f"{label}#{i}", i + 1
        overloads.add(unique)
        func.overload = node.overload = unique
    tag(node, chain.first.node, em.ir_version if overload else 0,
        (("onnx_split.site", chain.name), ("onnx_split.layout", "function")))
    em.nodes = [node]
    em.initializers = large
    return func


def _parts(em: Emitter) -> str:
    matmuls = sum(n.op_type == "MatMul" for n in em.nodes)
    return f"{matmuls} MatMul{'s' if matmuls != 1 else ''} in the parallel layout"


def add_functions(model: onnx.ModelProto, functions: list[onnx.FunctionProto]) -> None:
    if not functions:
        return
    model.functions.extend(functions)
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))



LAYOUT = Layout("function", PARALLEL.pick, "parallel", wrap=wrap_function,
                help="one onnx_split node per site whose function body is the parallel layout")
register(LAYOUT)
