"""``blocks``: the plan kind of every split today — a weight (or a chain of weights) computed as
independent blocks under row/column permutations (``partition.ChainPlan``).

Exact plans (connected components at ``--threshold``) claim to compute the original weights;
lossy plans (a budget chose the blocks) compute the weights inside their blocks and drop the rest.
Either way the rewritten nodes multiply by :meth:`BlockPlan.effective_weight`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..partition import ChainPlan, Plan


class PackedMasks:
    """Per layer, a K x N boolean mask held as bits: 1/8 of the bytes of numpy's bool array (a
    ``--tolerance`` search holds a plan per rung and site: as bool arrays their masks were as many
    bytes as the model's float32 weights). Indexing unpacks a fresh array of that layer."""

    def __init__(self, masks):
        self.shapes = tuple(tuple(int(d) for d in np.shape(m)) for m in masks)
        self.bits = tuple(np.packbits(np.asarray(m, bool), axis=None) for m in masks)

    def __getitem__(self, layer: int) -> np.ndarray:
        shape = self.shapes[layer]
        return np.unpackbits(self.bits[layer], count=math.prod(shape)).reshape(shape).view(bool)

    def __len__(self) -> int:
        return len(self.bits)

    def __iter__(self):
        return (self[layer] for layer in range(len(self)))

    def key(self, layer: int) -> tuple:
        """What tells this layer's mask from any other (its shape and bits)."""
        return self.shapes[layer], self.bits[layer].tobytes()


@dataclass(frozen=True, eq=False)
class BlockPlan:
    kind: ClassVar[str] = "blocks"
    partition: ChainPlan
    masks: PackedMasks | None = None
    """Per layer, the K x N entries the plan keeps (lossy plans; given as arrays, held as
    :class:`PackedMasks`); None: the partition's blocks."""
    approximates: bool = False
    label: str = ""
    retained: float | None = None
    """Lossy plans: the fraction of the weight's significance inside the kept blocks."""
    score: str | None = None
    flops: float = 1.0
    """Fraction of the dense multiply-adds in the form the budget counted (lossy plans)."""
    fitted: tuple | None = None
    """Refitted lossy plans: per layer, (weight, C) the rewrite multiplies by instead of the
    original's kept entries: the weight [K, N] (zero outside the blocks; held as
    :class:`KeptEntries` where the plan has masks) and the Gemm's C as stored (None: C unchanged).
    See refit.py."""

    def __post_init__(self):
        if self.masks is not None and not isinstance(self.masks, PackedMasks):
            object.__setattr__(self, "masks", PackedMasks(self.masks))

    @property
    def n_layers(self) -> int:
        return self.partition.n_layers

    @property
    def parts(self):
        return self.partition.parts

    def layer_shape(self, layer: int) -> tuple[int, int]:
        return int(self.partition.sizes[layer]), int(self.partition.sizes[layer + 1])

    def macs_dense(self, layer: int | None = None) -> int:
        if layer is None:
            return self.partition.macs_dense
        k, n = self.layer_shape(layer)
        return k * n

    def effective_weight(self, layer: int, weight: np.ndarray) -> np.ndarray:
        """The weight with every entry outside the plan's blocks zeroed (the weight itself when that
        changes nothing: exact components at threshold 0 have only zeros there)."""
        if self.fitted is not None:
            fitted = self.fitted[layer][0]
            return fitted.array(weight.dtype) if isinstance(fitted, KeptEntries) else fitted.astype(weight.dtype)
        if self.masks is not None:
            mask = self.masks[layer]
        elif self.partition.threshold == 0:
            return weight
        else:
            mask = coverage(self.partition, layer)
        return np.where(mask, weight, np.zeros((), dtype=weight.dtype)).astype(weight.dtype)

    def effective_bias(self, layer: int, bias):
        """The Gemm's C the rewritten node of ``layer`` adds, given the original one."""
        if self.fitted is not None and self.fitted[layer][1] is not None:
            return np.asarray(self.fitted[layer][1]).astype(np.asarray(bias).dtype).reshape(np.shape(bias))
        return bias

    @property
    def refitted(self) -> bool:
        return self.fitted is not None

    def summary(self, layer: int) -> dict:
        return {"parts": len(self.partition.parts),
                "part_shapes": [list(p.layer_shape(layer)) for p in self.partition.parts],
                "retained": self.retained}

    def with_cost(self, flops: float) -> "BlockPlan":
        return dataclasses.replace(self, flops=flops)

    def with_fit(self, fitted: tuple | None) -> "BlockPlan":
        """The same blocks, multiplying by ``fitted`` (per layer (weight, C or None)), or by the
        masked original weights again (None). A weight that is zero outside the layer's mask is
        kept as its entries inside it: a ``--tolerance`` search holds a fitted plan per rung and
        site, and a rung of G parts keeps about 1/G of the weight."""
        if fitted is not None and self.masks is not None:
            fitted = tuple((KeptEntries.of(w, self.masks, layer), c) for layer, (w, c) in enumerate(fitted))
        return dataclasses.replace(self, fitted=fitted)


@dataclass(frozen=True, eq=False)
class KeptEntries:
    """A weight that is zero outside layer ``layer`` of ``masks``, as its entries inside it
    (row-major order)."""

    masks: PackedMasks
    layer: int
    values: np.ndarray

    @staticmethod
    def of(weight, masks: PackedMasks, layer: int):
        """``weight`` as its entries inside the layer's mask, or ``weight`` itself when it is not an
        array of the mask's shape that is zero outside it."""
        mask = masks[layer]
        if not isinstance(weight, np.ndarray) or weight.shape != mask.shape or np.any(weight[~mask]):
            return weight
        return KeptEntries(masks, layer, weight[mask])

    @property
    def mask(self) -> np.ndarray:
        return self.masks[self.layer]

    def array(self, dtype) -> np.ndarray:
        mask = self.mask
        out = np.zeros(mask.shape, dtype=dtype)
        out[mask] = self.values
        return out


def coverage(partition: ChainPlan, layer: int) -> np.ndarray:
    """K x N: True where one of the partition's parts computes the weight of ``layer``."""
    mask = np.zeros((partition.sizes[layer], partition.sizes[layer + 1]), dtype=bool)
    for part in partition.parts:
        mask[np.ix_(part.levels[layer], part.levels[layer + 1])] = True
    return mask


def block_mask(plan: Plan) -> np.ndarray:
    """K x N: True where one of the plan's parts computes the weight (outputs no part feeds, the
    plan's ``dead_cols``, are False: the rewrite gives them zero weights)."""
    mask = np.zeros((plan.k, plan.n), dtype=bool)
    for part in plan.parts:
        mask[np.ix_(part.rows, part.cols)] = True
    return mask


def exact_plan(partition: ChainPlan) -> BlockPlan:
    """The plan of exact components (one layer or a joint chain): verified against the original."""
    return BlockPlan(partition, label=f"{len(partition.parts)} parts of {partition.n_components} components")


def lossy_plan(plan: Plan, scores: np.ndarray, label: str, score: str | None, cost) -> BlockPlan:
    """A budget's candidate: ``plan``'s blocks kept, the rest dropped. Outputs no block feeds get a
    one-input part of their own (their weights are zero), so they cost one multiply-add each."""
    partition, mask = ChainPlan.from_plan(plan, dead_part=True), block_mask(plan)
    total = float(scores.sum())
    kept = 1.0 if total == 0 else float(scores[mask].sum()) / total
    candidate = BlockPlan(partition, (mask,), True, label, kept, score)
    return candidate.with_cost(cost(candidate) / plan.macs_dense)
