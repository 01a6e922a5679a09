"""All options of the pass, in one frozen dataclass."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Mapping

from .errors import InputError

LAYOUTS = ("auto", "parallel", "batched", "function")
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class SplitConfig:
    """Options of :func:`onnx_split.split_model`. Every field has a working default."""

    threshold: float = 0.0
    """Weights with ``|w| <= threshold`` are dropped. 0 drops exact zeros only (lossless)."""
    max_parts: int = 16
    """Components are packed into at most this many parts, balanced by FLOPs."""
    min_elements: int = 4096
    """Weights with fewer elements are kept (not worth a rewrite). 0 splits everything."""
    layout: str = "auto"
    """``auto``: measure every layout and the dense original per site in ORT, keep the fastest.
    ``parallel``: per part Slice/Gather -> MatMul -> Concat. ``batched``: one MatMul over
    [P, n, k]. ``function``: one ``onnx_split`` node per site whose function body is the parallel
    layout."""
    chains: bool = True
    """Keep the parts of consecutive split layers apart across feature-wise ops (one network
    becomes several); False splits each layer on its own."""
    batches: tuple[int, ...] = ()
    """Batch sizes to tune and time at (the first dim of every graph input whose first dim is
    dynamic); empty: the inputs verification uses."""
    tune_seconds: float = 10.0
    """Time budget of ``--layout auto`` for all its measurements together."""
    min_speedup: float = 1.02
    """``--layout auto`` writes the original model unless the rewritten one is measured at least
    this much faster (and no slower at any measured batch and provider)."""
    verify: bool = True
    providers: tuple[str, ...] | None = None
    """ORT providers to verify and time on; None means every available one of CPU and CUDA."""
    rtol: float | None = None
    """Relative tolerance; None picks one by output dtype (see ``verify.default_tolerances``)."""
    atol: float | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    inputs_path: str | None = None
    """An .npz file of real inputs, one array per graph input name."""
    seed: int = 0
    bench: bool = True
    bench_seconds: float = 1.0
    """Time budget per provider for the latency measurement (after warm-up)."""
    threads: int = 1
    """intra_op_num_threads for verification and timing sessions (fixed, for stable ratios)."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if not self.threshold >= 0:
            raise InputError(f"--threshold must be >= 0, got {self.threshold}")
        if self.max_parts < 1:
            raise InputError(f"--max-parts must be >= 1, got {self.max_parts}")
        if self.min_elements < 0:
            raise InputError(f"--min-elements must be >= 0, got {self.min_elements}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InputError(f"--{name} must be >= 0, got {value}")
        if not self.bench_seconds > 0:  # NaN too
            raise InputError(f"--bench-seconds must be > 0, got {self.bench_seconds}")
        if not self.tune_seconds > 0:
            raise InputError(f"--tune-seconds must be > 0, got {self.tune_seconds}")
        if not self.min_speedup > 0:
            raise InputError(f"--min-speedup must be > 0, got {self.min_speedup}")
        batches = tuple(int(b) for b in self.batches)
        if any(b < 1 for b in batches):
            raise InputError(f"--batch sizes must be >= 1, got {list(batches)}")
        object.__setattr__(self, "batches", batches)
        if self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(normalize_provider(p) for p in self.providers))
        shapes = {str(k): tuple(int(d) for d in v) for k, v in dict(self.input_shapes).items()}
        object.__setattr__(self, "input_shapes", shapes)

    def to_json(self) -> str:
        """The options as recorded in the output model's metadata and in the report."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def normalize_provider(name: str) -> str:
    key = name.strip()
    full = PROVIDER_ALIASES.get(key.lower(), key)
    if full not in PROVIDER_ALIASES.values():
        raise InputError(f"unknown provider {name!r}: use cpu or cuda (or their ORT names)")
    return full
