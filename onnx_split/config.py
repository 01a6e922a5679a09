"""All options of the pass, in one frozen dataclass."""
from __future__ import annotations

import dataclasses
import json
import os
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping

from .errors import InputError
from .factorize import CHOICES as FACTORIZATIONS
from .factorize import METHODS as SPARSE_FACTORIZATIONS
from .plans import PLANNERS
from .rewrite.registry import layout_names
from .where import compile_patterns

LAYOUTS = layout_names()
PARTITIONERS = ("components", *PLANNERS)
"""``components`` is exact (lossless); the others (plans.PLANNERS) drop the weights outside their blocks."""
DEFAULT_LOSSY = "metis"
"""The partitioner a budget uses unless told. On the matrices of docs/PARTITIONERS.md metis and
spectral co-clustering retain the same significance to within 0.3 points (spectral ahead by 0.01
points on average), and metis is 1.3x faster in total. (Held-out accuracy on the trained models of
docs/SIGNIFICANCE.md favours neither everywhere.)"""
SCORES = ("auto", "magnitude", "activation")
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MAX_THREADS = 4 * (os.cpu_count() or 1)
"""More ORT intra-op threads than this only oversubscribes the machine (and can take minutes)."""


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
    fold: bool = True
    """Fold a split's first and last permutation into the dense MatMul/Gemm next to it (its weight,
    bias and the feature-wise constants between them take the split's order, and the two Gathers
    go); False leaves every site that is not split as it was."""
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
    threads: int | tuple[int, ...] = 1
    """intra_op_num_threads of the sessions (fixed, for stable ratios): one count, or several (``(1, 8)``),
    each of which ``--layout auto`` tunes at and the latency is timed at; verification, calibration
    and the output error run at the first (``base_threads``)."""
    partitioner: str = "components"
    """``components``: exact connected components (lossless). ``metis``/``spectral``: balanced
    block-diagonal partitions into G parts under row/column permutations, maximizing retained
    significance; ``tiles``: static b x b tiles, the highest-significance fraction kept; ``random``:
    a random balanced partition (a baseline). Any budget below without a partitioner uses metis."""
    parts: int | None = None
    """Lossy: split every candidate site into exactly this many balanced parts."""
    keep: float | None = None
    """Lossy: per site, the most parts (fewest FLOPs) that keep at least this fraction of significance."""
    flops: float | None = None
    """Lossy: per site, the fewest parts that cost at most this fraction of the dense FLOPs."""
    tolerance: float | None = None
    """Lossy: the largest saving whose relative output error ||y'-y||/||y|| stays within this on the
    calibration data (then checked on held-out samples)."""
    calibration: str | None = None
    """An .npz of calibration samples, one array per graph input, first axis = samples."""
    score: str = "auto"
    """Significance: ``magnitude`` |w|, ``activation`` |w| * ||x_i|| over calibration data; ``auto``
    is activation with --calibration, else magnitude."""
    tile: int = 64
    """Tile size b of ``--partitioner tiles``."""
    holdout: float = 0.25
    """Fraction of the calibration samples held out of the search to check the result on."""
    refit: bool = True
    """Lossy: solve the kept blocks (and a Gemm's constant bias) for the weights that best
    reproduce each layer's original output on the calibration data (least squares, damped),
    sequentially so that each site is fitted on the outputs of the sites rewritten before it."""
    calibration_batch: int = 64
    """Calibration samples per ORT run: activations are summed batch by batch, never held for all
    samples at once."""
    search_seconds: float | None = None
    """Wall-clock limit of the ``--tolerance`` search; when it runs out, the best choice measured
    within the tolerance so far is kept (sites not yet measured stay dense)."""
    include: tuple[str, ...] = ()
    """Node-name patterns (globs, or regular expressions with the prefix ``re:``; see where.py): when
    given, only the sites matching one of them are split."""
    exclude: tuple[str, ...] = ()
    """Node-name patterns of sites never split (they win over ``include``)."""
    dynamic_keep: float | None = None
    """Dynamic block skipping: every eligible site keeps this fraction of its input blocks per call
    (the rest of its weight rows are skipped for that call); see dynamic.py."""
    dynamic_rule: str = "topk"
    """``topk``: the best ``dynamic_keep`` of the blocks, every call; ``threshold``: blocks scoring
    above a per-site threshold calibrated to keep ``dynamic_keep`` of them on average."""
    dynamic_block: int = 128
    """Input features per block of a dynamic site."""
    dynamic_score: str = "xw"
    """Block score: ``xw`` ||x_b||*||W_b||, ``x`` ||x_b||."""
    dynamic_compensate: bool = False
    """A skipped block counts as its calibration mean instead of zero: each site adds, per skipped
    block b, mu_b @ W_b, with mu_b the mean of x_b over the calibration calls that skipped b
    (needs calibration samples)."""
    dynamic_form: str = "auto"
    """``kernel`` (the compiled DynamicBlockMatMul op), ``portable`` (standard ONNX, one If per
    block), ``fallback`` (the kernel's node plus a model-local function of the portable form: the
    kernel where registered, standard ONNX elsewhere; IR >= 10), ``auto``: the faster measured, the
    kernel written as the fallback form where it can be."""
    factorize: str | None = None
    """Replace every eligible weight by sparse factors fitted on calibration data: ``dsf`` (W = A·B,
    both sparse), or one sparse matrix by ``magnitude``, ``wanda``, ``sparsegpt`` or ``admm``
    (factorize/); written compressed, one dense MatMul at run time. Needs ``density``, or for the
    sparse methods ``tolerance`` (a density per site from factor_budget.LADDER, the output error within
    it; factor_budget.py)."""
    density: float | None = None
    """``--factorize``: the fraction of each weight's entries kept as non-zeros (over both factors for dsf);
    for ``blocks`` and ``lowrank``, the factors' parameters as a fraction of the weight's."""
    blocks: int | None = None
    """``--factorize blocks``: the blocks of each block-diagonal factor (None: 4)."""
    workers: int = 1
    """``--factorize``: fit the sites of one dependency level in this many worker processes at once
    (fit_pool.py; 1: in this process). The factors are the same whatever the count."""
    fit_seconds: float | None = None
    """``--factorize``: a site whose fit, by its estimate, would end more than this many seconds
    after the fitting began (its first estimate) is not started (it stays dense, the reason saying so)."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        _finite_number("threshold", self.threshold, ">= 0")
        if not self.threshold >= 0:
            raise InputError(f"--threshold must be >= 0, got {self.threshold}")
        if self.max_parts < 1:
            raise InputError(f"--max-parts must be >= 1, got {self.max_parts}")
        if self.min_elements < 0:
            raise InputError(f"--min-elements must be >= 0, got {self.min_elements}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None:
                _finite_number(name, value, ">= 0")
                if not value >= 0:
                    raise InputError(f"--{name} must be >= 0, got {value}")
        for name in ("bench_seconds", "tune_seconds", "min_speedup"):
            _finite_number(name.replace("_", "-"), getattr(self, name), "> 0")
        if not self.bench_seconds > 0:  # NaN too
            raise InputError(f"--bench-seconds must be > 0, got {self.bench_seconds}")
        if not self.tune_seconds > 0:
            raise InputError(f"--tune-seconds must be > 0, got {self.tune_seconds}")
        if not self.min_speedup > 0:
            raise InputError(f"--min-speedup must be > 0, got {self.min_speedup}")
        self._check_lossy()
        batches = tuple(int(b) for b in self.batches)
        if any(b < 1 for b in batches):
            raise InputError(f"--batch sizes must be >= 1, got {list(batches)}")
        object.__setattr__(self, "batches", batches)
        counts = (self.threads,) if isinstance(self.threads, numbers.Integral) else tuple(self.threads)
        if not counts or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts):
            raise InputError(f"--threads wants whole numbers like 1 or 1,8, got {self.threads!r}")
        for count in counts:
            if count < 1:
                raise InputError(f"--threads must be >= 1, got {count}")
            if count > MAX_THREADS:
                raise InputError(f"--threads {count} is more than {MAX_THREADS} (4 per core of this machine)")
        counts = tuple(dict.fromkeys(int(c) for c in counts))
        object.__setattr__(self, "threads", counts[0] if len(counts) == 1 else counts)
        if self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed}")
        if self.providers is not None and not [p for p in self.providers if str(p).strip()]:
            raise InputError("--providers names no provider: give cpu, cuda or both (or leave it out)")
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(normalize_provider(p) for p in self.providers))
        shapes = {str(k): tuple(int(d) for d in v) for k, v in dict(self.input_shapes).items()}
        for name, dims in shapes.items():
            if any(d < 1 for d in dims):
                raise InputError(f"--input-shape {name}:{','.join(map(str, dims))}: every dim must be >= 1 "
                                 f"(an empty input verifies and times nothing)")
        object.__setattr__(self, "input_shapes", shapes)
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns or ())
            try:
                compile_patterns(f"--{name}", patterns)
            except ValueError as exc:
                raise InputError(str(exc)) from None
            object.__setattr__(self, name, patterns)

    def _check_lossy(self) -> None:
        if self.partitioner not in PARTITIONERS:
            raise InputError(f"--partitioner must be one of {', '.join(PARTITIONERS)}, not {self.partitioner!r}")
        if self.score not in SCORES:
            raise InputError(f"--score must be one of {', '.join(SCORES)}, not {self.score!r}")
        budgets = [name for name in ("parts", "keep", "flops", "tolerance") if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise InputError(f"give one budget, not {' and '.join('--' + b for b in budgets)}")
        if self.parts is not None and self.parts < 1:
            raise InputError(f"--parts must be >= 1, got {self.parts}")
        for name in ("keep", "flops"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise InputError(f"--{name} must be a fraction in (0, 1], got {value}")
        wants = {"keep": "a fraction in (0, 1]", "flops": "a fraction in (0, 1]", "tolerance": ">= 0",
                 "holdout": "a fraction in (0, 1)"}
        for name, want in wants.items():
            if getattr(self, name) is not None:
                _finite_number(name, getattr(self, name), want)
        if self.tolerance is not None and not self.tolerance >= 0:
            raise InputError(f"--tolerance must be >= 0, got {self.tolerance}")
        if self.tile < 1:
            raise InputError(f"--tile must be >= 1, got {self.tile}")
        if isinstance(self.calibration_batch, bool) or not isinstance(self.calibration_batch, int) \
                or self.calibration_batch < 1:
            raise InputError(f"--calibration-batch must be a whole number >= 1, got {self.calibration_batch!r}")
        if self.search_seconds is not None:
            _finite_number("search-seconds", self.search_seconds, "> 0")
            if not self.search_seconds > 0:
                raise InputError(f"--search-seconds must be > 0, got {self.search_seconds}")
        if not 0 < self.holdout < 1:
            raise InputError(f"--holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.search_seconds is not None and self.tolerance is None:
            raise InputError("--search-seconds limits the --tolerance search: give --tolerance E too")
        if self.partitioner == "tiles" and self.parts is not None:
            raise InputError("--parts does not apply to --partitioner tiles: use --keep, --flops or --tolerance")
        if budgets and self.threshold > 0:
            raise InputError(f"--threshold applies to the exact partitioner; a budget ({budgets[0]}) chooses what "
                             f"to drop by significance instead")
        if self.partitioner == "components" and budgets and self.factorize is None:
            object.__setattr__(self, "partitioner", DEFAULT_LOSSY)
        self._check_dynamic(budgets)
        self._check_factorize(budgets)

    def _check_factorize(self, budgets: list[str]) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, numbers.Integral) or self.workers < 1:
            raise InputError(f"--workers must be a whole number >= 1, got {self.workers!r}")
        object.__setattr__(self, "workers", int(self.workers))
        if self.fit_seconds is not None:
            _finite_number("fit-seconds", self.fit_seconds, "> 0")
            if not self.fit_seconds > 0:
                raise InputError(f"--fit-seconds must be > 0, got {self.fit_seconds}")
        if self.blocks is not None:
            if self.factorize != "blocks":
                raise InputError("--blocks is the block count of --factorize blocks: give --factorize blocks too")
            if isinstance(self.blocks, bool) or not isinstance(self.blocks, numbers.Integral) or self.blocks < 2:
                raise InputError(f"--blocks must be an integer >= 2 (--factorize lowrank is one block), "
                                 f"got {self.blocks!r}")
        if self.factorize is None:
            if self.density is not None:
                raise InputError("--density is the budget of --factorize: give --factorize METHOD too")
            for name, given in (("workers", self.workers != 1), ("fit-seconds", self.fit_seconds is not None)):
                if given:
                    raise InputError(f"--{name} applies to the fits of --factorize: give --factorize METHOD too")
            return
        if self.factorize not in FACTORIZATIONS:
            raise InputError(f"--factorize must be one of {', '.join(FACTORIZATIONS)}, not {self.factorize!r}")
        others = [b for b in budgets if b != "tolerance"]
        if others:
            raise InputError(f"--factorize takes --density or --tolerance as its budget, not --{others[0]}")
        if self.density is not None and self.tolerance is not None:
            raise InputError("--factorize takes one budget: --density D (every site) or --tolerance E (a density "
                             "per site, chosen within E), not both")
        if self.tolerance is not None and self.factorize not in SPARSE_FACTORIZATIONS:
            raise InputError(f"--tolerance chooses a density per site for the sparse methods "
                             f"({', '.join(SPARSE_FACTORIZATIONS)}); --factorize {self.factorize} takes --density D")
        if self.tolerance is not None and (self.workers != 1 or self.fit_seconds is not None):
            raise InputError("--workers and --fit-seconds apply to --factorize with --density; the --tolerance "
                             "search fits its ladder in this process, without a time budget")
        if self.density is None and self.tolerance is None:
            raise InputError(f"--factorize {self.factorize} needs --density D (the fraction of each weight kept) "
                             f"or --tolerance E")
        if self.density is not None:
            _finite_number("density", self.density, "a fraction in (0, 1]")
            if not 0 < self.density <= 1:
                raise InputError(f"--density must be a fraction in (0, 1], got {self.density}")
        if self.dynamic_keep is not None:
            raise InputError("--factorize does not combine with --dynamic-keep")
        if self.partitioner != "components" or self.threshold > 0:
            raise InputError("--factorize replaces the weights by factors: it takes no --partitioner or --threshold")

    def _check_dynamic(self, budgets: list[str]) -> None:
        if self.dynamic_keep is None:
            return
        _finite_number("dynamic-keep", self.dynamic_keep, "a fraction in (0, 1]")
        if not 0 < self.dynamic_keep <= 1:
            raise InputError(f"--dynamic-keep must be a fraction in (0, 1], got {self.dynamic_keep}")
        others = [b for b in budgets if b != "tolerance"]
        if others:
            raise InputError(f"--dynamic-keep keeps every weight: it does not combine with --{others[0]} "
                             f"(--tolerance chooses which sites are dynamic)")
        if self.dynamic_rule not in ("topk", "threshold"):
            raise InputError(f"--dynamic-rule must be topk or threshold, not {self.dynamic_rule!r}")
        if self.dynamic_score not in ("xw", "x"):
            raise InputError(f"--dynamic-score must be xw or x, not {self.dynamic_score!r}")
        if self.dynamic_compensate and self.calibration is None:
            raise InputError("--dynamic-compensate needs --calibration: a skipped block's mean over random inputs "
                             "says nothing about the model's real inputs")
        if self.dynamic_form not in ("auto", "kernel", "portable", "fallback"):
            raise InputError(f"--dynamic-form must be auto, kernel, portable or fallback, not {self.dynamic_form!r}")
        if isinstance(self.dynamic_block, bool) or not isinstance(self.dynamic_block, int) or self.dynamic_block < 1:
            raise InputError(f"--dynamic-block must be a whole number >= 1, got {self.dynamic_block!r}")
        if self.dynamic_form == "kernel":
            from .kernel import kernel_absence

            why = kernel_absence()
            if why is not None:
                raise InputError(f"--dynamic-form kernel: {why}; use --dynamic-form portable")

    @property
    def budget(self) -> str | None:
        """The budget option given, as the CLI spells it, or None."""
        for name in ("parts", "keep", "flops", "tolerance"):
            if getattr(self, name) is not None:
                return f"--{name} {getattr(self, name):g}"
        return None

    @property
    def thread_counts(self) -> tuple[int, ...]:
        """Every thread count to tune and time at."""
        return (self.threads,) if isinstance(self.threads, int) else tuple(self.threads)

    @property
    def base_threads(self) -> int:
        """The thread count verification, calibration and the output error run at: the first."""
        return self.thread_counts[0]

    @property
    def lossy(self) -> bool:
        return self.partitioner != "components"

    @property
    def resolved_score(self) -> str:
        if self.score != "auto":
            return self.score
        return "activation" if self.calibration is not None else "magnitude"

    def to_json(self) -> str:
        """The options as recorded in the output model's metadata and in the report."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _finite_number(option: str, value, want: str) -> None:
    """A one-line InputError unless ``value`` is a finite real number (inf and NaN never make sense
    as a tolerance, a threshold, a budget or a time)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"--{option} must be {want} and finite, got {value!r}")


def normalize_provider(name: str) -> str:
    key = name.strip()
    full = PROVIDER_ALIASES.get(key.lower(), key)
    if full not in PROVIDER_ALIASES.values():
        raise InputError(f"unknown provider {name!r}: use cpu or cuda (or their ORT names)")
    return full
