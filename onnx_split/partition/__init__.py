"""Partitioners: pure numpy/scipy. One layer gets a :class:`Plan`, a chain of layers a :class:`ChainPlan`.

Exact: :func:`exact_components`. Lossy, balanced (``BALANCED``): :func:`metis_blocks`,
:func:`spectral_blocks`, :func:`random_blocks` (baseline); lossy, static tiles: :func:`static_tiles`.
:func:`retained` is the fraction of significance a plan keeps.
"""
from .balance import retained
from .chain import ChainPart, ChainPlan, joint_components
from .components import exact_components
from .metis import metis_blocks
from .plan import Part, Plan
from .random_split import random_blocks
from .spectral import spectral_blocks
from .tiles import static_tiles

BALANCED = {"metis": metis_blocks, "spectral": spectral_blocks, "random": random_blocks}

__all__ = ["BALANCED", "ChainPart", "ChainPlan", "Part", "Plan", "exact_components", "joint_components",
           "metis_blocks", "random_blocks", "retained", "spectral_blocks", "static_tiles"]
