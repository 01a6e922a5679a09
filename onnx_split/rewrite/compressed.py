"""``compressed`` form: a factorized plan's factors stored as a bitmask plus their non-zero values,
decoded by a constant subgraph, and multiplied by the site's own single MatMul or Gemm.

Per factor F [R, C] (written in the orientation the node reads: the product transposed for Gemm
transB), unless dense storage is no larger: the packed bits of F != 0 (uint8, R·C/8 bytes) and the
non-zeros in row-major order. The decoder unpacks the bits (BitShift, Mod), numbers the kept
entries (CumSum), picks their values (GatherElements: no Gather on activations is
written) and zeroes the rest (Where); two factors meet in one
MatMul of constants. Every input of the decoder is an initializer, so ONNX Runtime's constant
folding (any optimization level but disabled) replaces it by the dense product at load: the
model runs one dense MatMul, as the original does. With optimizations disabled the decoder runs
on every call: slower, same result. Needs opset 11 (BitShift, CumSum).
"""
from __future__ import annotations

import numpy as np
import onnx

from .emit import Emitter, Unsupported
from .form import Form
from .registry import register

MIN_OPSET = 11


def stored_bytes(matrix: np.ndarray) -> int:
    """Bytes of ``matrix`` as the decoder stores it: bits plus non-zero values."""
    return (matrix.size + 7) // 8 + np.count_nonzero(matrix) * matrix.dtype.itemsize


def decode(em: Emitter, local: str, matrix: np.ndarray, doc: str) -> str:
    """A tensor equal to ``matrix``: dense if that is no larger, else decoded from bits and values."""
    if stored_bytes(matrix) >= matrix.nbytes:
        return em.const(f"{local}/dense", matrix)
    flat = matrix.ravel()
    kept = flat != 0
    bits = em.const(f"{local}/bits", np.packbits(kept))
    values = em.const(f"{local}/values", flat[kept])
    column = em.reshape(bits, em.ints(f"{local}/column", [-1, 1]), f"{local}/bits/Reshape", doc)
    shifted = em.node("BitShift", [column, em.const(f"{local}/shifts", np.arange(7, -1, -1, dtype=np.uint8))],
                      f"{local}/BitShift", doc, direction="RIGHT")
    bit = em.node("Mod", [shifted, em.const(f"{local}/two", np.array([2], np.uint8))], f"{local}/Mod", doc)
    bit = em.reshape(bit, em.ints(f"{local}/flat", [-1]), f"{local}/flat/Reshape", doc)
    bit = em.slice(bit, 0, flat.size, 0, f"{local}/Slice", doc)
    keep = em.node("Cast", [bit], f"{local}/keep/Cast", doc, to=onnx.TensorProto.BOOL)
    count = em.node("Cast", [bit], f"{local}/count/Cast", doc, to=onnx.TensorProto.INT64)
    position = em.node("CumSum", [count, em.ints(f"{local}/axis", np.int64(0))], f"{local}/CumSum", doc)
    position = em.node("Sub", [position, em.ints(f"{local}/one", np.int64(1))], f"{local}/Sub", doc)
    picked = em.node("GatherElements", [values, position], f"{local}/GatherElements", doc, axis=0)
    zero = em.const(f"{local}/zero", np.zeros((), dtype=matrix.dtype))
    dense = em.node("Where", [keep, picked, zero], f"{local}/Where", doc)
    return em.reshape(dense, em.ints(f"{local}/shape", list(matrix.shape)), f"{local}/Reshape", doc)


def emit_compressed(em: Emitter, chain, plan) -> str:
    site = chain.first
    if em.opset < MIN_OPSET:
        raise Unsupported(f"the compressed form needs opset >= {MIN_OPSET} (this model has {em.opset})")
    factors = list(plan.factors)
    if site.trans_b:  # the node reads W^T = (A B)^T = B^T A^T
        factors = [np.ascontiguousarray(f.T) for f in reversed(factors)]
    what = f"{plan.method} factor{'s' if len(factors) > 1 else ''} of '{site.name}'"
    decoded = [decode(em, f"factor{i}", f, f"decode factor {i} of the {what} (folded at load)")
               for i, f in enumerate(factors)]
    weight = decoded[0]
    for i, other in enumerate(decoded[1:], 1):
        weight = em.node("MatMul", [weight, other], f"product{i}/MatMul",
                         f"the product of the {what}: a constant, folded at load")
    inputs = list(site.node.input)
    inputs[1] = weight
    return em.node(site.op_type, inputs, site.op_type, f"{site.op_type} of '{site.name}' by its {plan.label}",
                   attributes=site.node.attribute)


def refuse_compressed(chain, plan) -> str | None:
    site = chain.first
    if len(chain.sites) != 1:
        return "factorized plans are made per site"
    if site.weight.dtype.kind != "f":
        return f"the compressed form stores float weights (this one is {site.weight.dtype})"
    return None


def compressed_cost(plan, layer: int | None = None) -> int:
    return plan.macs_dense()


def written_bytes(plan) -> int:
    """What the form stores for ``plan``: per factor, bits and values or the dense matrix."""
    return sum(min(stored_bytes(f), f.nbytes) for f in plan.factors)


FORM = Form("compressed", frozenset({"factorized"}), emit_compressed, compressed_cost, refuse_compressed,
            "factors as bitmask + values, decoded by constants ORT folds at load; one dense MatMul")
register(FORM)

__all__ = ["FORM", "MIN_OPSET", "decode", "stored_bytes", "written_bytes"]
