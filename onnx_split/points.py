"""Where verification, tuning and timing run: the providers, and one set of inputs per batch size."""
from __future__ import annotations

import numpy as np
import onnx

from .config import SplitConfig
from .inputs import batch_shapes, make_feeds
from .runtime import CPU, CUDA, available_providers, provider_status

Point = tuple[str, dict[str, np.ndarray]]
"""(label, feeds): "batch 32" and the inputs at that batch size."""


def providers_for(config: SplitConfig) -> tuple[list[str], list[str]]:
    """The providers to verify and time on, and notes (a CUDA that does not run here)."""
    if config.providers is not None:
        return list(config.providers), []
    found = available_providers()
    notes = [] if CUDA in found else [f"CUDA not verified or timed: {provider_status(CUDA)}"]
    return found or [CPU], notes


def measuring_points(original: onnx.ModelProto, config: SplitConfig) -> tuple[list[Point], list[str]]:
    """The inputs to verify, tune and time at: one set per ``--batch`` size, else the given ones;
    and how they were made."""
    if not config.batches or config.inputs_path is not None:
        feeds, notes = make_feeds(original, config.input_shapes, config.inputs_path, config.seed)
        if config.batches:
            notes.append("--batch is ignored with --inputs: the given inputs set the batch")
        return [(_describe(feeds), feeds)], notes
    points, notes = [], []
    for batch in config.batches:
        shapes = batch_shapes(original, batch, config.input_shapes)
        feeds, notes = make_feeds(original, shapes, None, config.seed)
        points.append((f"batch {batch}", feeds))
    return points, notes


def _describe(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(v.shape)}" for name, v in feeds.items())
