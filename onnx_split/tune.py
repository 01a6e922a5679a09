"""``--layout auto``: keep a rewrite only where it is measured faster.

For each chain (a site, or layers split together) every layout is written into a small model of its
own, next to a model of the original nodes, and all are timed in ORT, interleaved, on the chain's
real input activations (the original model is run once per batch to get them). The layout with the
best worst-case speedup over the measured batches and providers is kept if it is slower than dense
nowhere and faster by the margin on average; otherwise the chain stays dense. The whole rewritten model is then timed against
the original, and the original is written when the rewrite does not pay there either.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .bench import Runner, round_robin
from .chains import Chain
from .rewrite import FALLBACK, FORMS, LAYOUTS, Unsupported, emit_chain, refusal
from .rewrite.apply import import_custom_domain
from .isolate import Probe, probe_models
from .runtime import capture, ort_error, provider_status
from .sites import default_opset

log = logging.getLogger(__name__)

SCREEN_BYTES = 256 * 2**20
"""Candidates are screened for ORT crashes in one child per batch of units of about this many bytes."""

Timer = Callable[[dict[str, onnx.ModelProto], dict[str, np.ndarray], str, float, int], dict[str, float]]
"""(candidate models, feeds, provider, seconds, threads) -> median milliseconds per candidate."""


@dataclass
class TuneResult:
    chain: list[str]
    choice: str  # "dense" or a name in rewrite.FORMS
    reason: str
    times_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    """candidate -> {"CPU, batch 32": median ms}"""


def static_choice(chain: Chain, plan) -> str:
    """The form written where nothing could be measured: the parallel layout's rule; for a plan kind
    the parallel forms do not take (dynamic plans), the first registered form that writes it."""
    fallback = LAYOUTS[FALLBACK]
    if plan.kind in FORMS[fallback.cost_form].accepts:
        return fallback.pick(chain, plan)
    return next((name for name in FORMS if refusal(name, chain, plan) is None), "dense")


def tune_chains(original: onnx.ModelProto, chains: list[tuple[Chain, object]],
                points: list[tuple[str, dict[str, np.ndarray]]], *, providers: list[str], seconds: float,
                threads: int | tuple[int, ...], margin: float, progress=None, timer: Timer | None = None
                ) -> list[TuneResult]:
    """Measure every layout of every chain at every thread count of ``threads``; return each
    chain's choice with all the times (the best worst case over batches, providers and counts)."""
    counts = (threads,) if isinstance(threads, int) else tuple(threads)
    threads = counts[0]  # capturing activations and screening for crashes: once, at the first count
    timer = timer or measure
    progress = progress or (lambda stage, done, total: None)
    usable = [p for p in providers if provider_status(p) is None]
    tunable = [i for i, (chain, _) in enumerate(chains) if chain.first.scope == "main"]
    results: list[TuneResult] = []
    for chain, plan in chains:
        form = static_choice(chain, plan)
        why = "inside a subgraph, where activations cannot be captured" if chain.first.scope != "main" else (
            "no provider runs here")
        results.append(TuneResult([s.name for s in chain.sites], form, f"not measured ({why}): static rule"))
    if not tunable or not usable:
        return results
    try:
        activations = _activations(original, [chains[i][0] for i in tunable], points, threads)
    except Exception as exc:  # ORT raises its own types; the model may not run on these inputs
        for i in tunable:
            results[i].reason = f"not measured (the original failed to run: {ort_error(exc)}): static rule"
        return results
    budget = seconds / (len(tunable) * len(usable) * len(points) * len(counts))
    done = 0
    for batch in _batches(original, chains, tunable, activations[points[0][0]]):
        crashed = _screen(batch, chains, activations, points, usable, threads)
        for i, models in batch:
            progress("tune", done, len(tunable))
            done += 1
            chain, plan = chains[i]
            results[i] = _tune_one(chain, models, crashed.get(i, {}), activations, points, usable, budget, counts,
                                   timer, margin, results[i])
            log.info("%s: %s (%s)", chain.name, results[i].choice, results[i].reason)
    progress("tune", len(tunable), len(tunable))
    return results


def _tune_one(chain: Chain, models: dict, crashed: dict[str, str], activations, points, providers, budget: float,
              threads: tuple[int, ...], timer: Timer, margin: float, static: TuneResult) -> TuneResult:
    """One unit's choice: candidates that crash ORT are left out, the rest timed against dense."""
    if "dense" in crashed:
        return TuneResult(static.chain, static.choice, f"not measured ({crashed['dense']}): static rule")
    for form, why in crashed.items():
        log.info("%s: %s left out: %s", chain.name, form, why)
        del models[form]
    if len(models) == 1:  # only dense is left
        return TuneResult(static.chain, "dense", f"kept dense: every layout crashed ({next(iter(crashed.values()))})")
    times, failed = _time_candidates(models, activations, points, providers, budget, threads, timer)
    if failed is not None:
        return TuneResult(static.chain, static.choice, f"not measured ({failed}): static rule")
    choice, reason = choose(times, margin)
    return TuneResult(static.chain, choice, reason, times)


def _batches(original, chains, tunable: list[int], examples):
    """The tunable units' candidates, in batches of about SCREEN_BYTES: [(unit index, models)]."""
    batch, size = [], 0
    for i in tunable:
        chain, plan = chains[i]
        models = candidates(original, chain, plan, examples)
        batch.append((i, models))
        size += sum(m.ByteSize() for m in models.values())
        if size >= SCREEN_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _screen(batch, chains, activations, points, providers, threads: int) -> dict[int, dict[str, str]]:
    """{unit index: {candidate: why}} for the candidates that crash ORT (opened at the level the
    timing uses, run once per point), all found in one child process."""
    probes, owners = [], []
    for i, models in batch:
        names = _inputs(models["dense"])
        for form, model in models.items():
            source = model.SerializeToString()
            for provider in providers:
                for label, _ in points:
                    feeds = {name: activations[label][name] for name in names}
                    probes.append(Probe(source, f"candidate '{form}' of {chains[i][0].name}", provider,
                                        "enabled", threads, feeds))
                    owners.append((i, form))
    crashed: dict[int, dict[str, str]] = {}
    for (i, form), result in zip(owners, probe_models(probes, skip_crashed_labels=True)):
        if result.crashed:
            crashed.setdefault(i, {}).setdefault(form, result.reason)
    return crashed


def _time_candidates(models, activations, points, providers, budget: float, threads: tuple[int, ...],
                     timer: Timer):
    """({candidate: {point: ms}}, None), or (None, why) when a run failed. A point is a provider and
    a batch, and the thread count when more than one is timed."""
    times: dict[str, dict[str, float]] = {name: {} for name in models}
    for provider in providers:
        for label, _ in points:
            feeds = {name: activations[label][name] for name in _inputs(models["dense"])}
            for count in threads:
                where = f"{provider.replace('ExecutionProvider', '')}, {label}"
                if len(threads) > 1:
                    where += f", {count} thread{'s' if count != 1 else ''}"
                try:
                    measured = timer(models, feeds, provider, budget, count)
                except Exception as exc:  # ORT raises its own types
                    return None, f"{where}: {ort_error(exc)}"
                for name, ms in measured.items():
                    times[name][where] = ms
    return times, None


def choose(times: dict[str, dict[str, float]], margin: float) -> tuple[str, str]:
    """The candidate with the best worst-case speedup over ``dense`` across the measured points
    (batch sizes and providers: the speedup the user can count on), ties broken by the geometric
    mean; it must be slower than dense nowhere and at least ``margin`` times faster on geometric
    mean, else ``dense`` is kept. With the reason."""
    dense = times["dense"]
    best, best_key = None, (0.0, 0.0)
    slower = []
    for name, measured in times.items():
        if name == "dense":
            continue
        speedups = [dense[p] / measured[p] for p in dense if measured.get(p, 0) > 0]
        if not speedups:
            continue
        worst = min(speedups)
        mean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        if worst < 1.0:
            slower.append(f"{name} {worst:.2f}x")
        elif (worst, mean) > best_key:
            best, best_key = name, (worst, mean)
    worst, mean = best_key
    if best is not None and mean >= margin:
        return best, (f"{best}: at least {worst:.2f}x faster than dense at every measured point "
                      f"({mean:.2f}x geometric mean over {len(dense)})")
    found = f"best {best} {mean:.2f}x" if best is not None else "no layout as fast"
    more = f"; slower somewhere: {', '.join(slower)}" if slower else ""
    return "dense", f"kept dense: {found}, below the {margin:g}x margin{more}"


def candidates(original: onnx.ModelProto, chain: Chain, plan,
               examples: dict[str, np.ndarray]) -> dict[str, onnx.ModelProto]:
    """``dense`` (the original nodes) and every registered form that can express the chain, each as a model
    from the chain's runtime inputs (typed like ``examples``, all but the last dim dynamic) to its
    output."""
    nodes, constants, runtime = chain_nodes(chain)
    runtime = [_input_info(name, examples[name]) for name in runtime]
    inits = [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()]
    models = {"dense": _model(original, nodes, inits, runtime, chain.last.output)}
    opset = default_opset(original)
    for form in FORMS:
        taken = {n.name for n in nodes} | {o for n in nodes for o in n.output} | set(constants) | set(examples)
        try:
            em, _ = emit_chain(chain, plan, form, opset=opset, taken=taken, ir_version=original.ir_version)
        except Unsupported as exc:
            log.info("%s: %s not possible: %s", chain.name, form, exc)
            continue
        nodes_of, inits_of = list(em.nodes), list(em.initializers)
        if em.shapes is not None and em.shapes.restored_from_carrier:  # the output's shape comes from a carrier
            nodes_of, inits_of = em.shapes.carrier_nodes + nodes_of, em.shapes.initializers + inits_of
        models[form] = _model(original, nodes_of, inits_of, runtime, chain.last.output)
    return models


def chain_nodes(chain: Chain) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], list[str]]:
    """The chain's original nodes in graph order, the constants they read, and their runtime inputs."""
    graph = chain.first.graph
    indices = sorted([s.index for s in chain.sites] + [i for link in chain.links for i in link.nodes])
    nodes = [graph.node[i] for i in indices]
    produced = {o for n in nodes for o in n.output}
    constants: dict[str, np.ndarray] = {}
    runtime: list[str] = []
    for node in nodes:
        for name in node.input:
            if not name or name in produced or name in constants or name in runtime:
                continue
            value = chain.first.constant(name)
            if value is None:
                runtime.append(name)
            else:
                constants[name] = value
    return nodes, constants, runtime


def _input_info(name: str, example: np.ndarray) -> onnx.ValueInfoProto:
    dims = [f"{name}_d{i}" for i in range(example.ndim - 1)] + list(example.shape[-1:])
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(example.dtype), dims)


def _model(original: onnx.ModelProto, nodes, initializers, inputs: list[onnx.ValueInfoProto],
           output: str) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(list(nodes), "candidate", inputs,
                                   [onnx.helper.make_empty_tensor_value_info(output)], list(initializers))
    model = onnx.helper.make_model(graph, opset_imports=list(original.opset_import), ir_version=original.ir_version)
    import_custom_domain(model)  # a dynamic-kernel candidate's node
    return model


def _inputs(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input]


def _activations(original: onnx.ModelProto, chains: list[Chain], points, threads: int) -> dict[str, dict]:
    """{point: {tensor: value}} for every runtime input of the chains, from one run of the original
    per point with those tensors made graph outputs."""
    wanted: list[str] = []
    for chain in chains:
        wanted += [name for name in chain_nodes(chain)[2] if name not in wanted]
    values = capture(original, wanted, [feeds for _, feeds in points], threads)
    return {label: found for (label, _), found in zip(points, values)}


def measure(models: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], provider: str, seconds: float,
            threads: int) -> dict[str, float]:
    """Median ms of each model, run round-robin after a warm-up (at most 200 rounds)."""
    names = list(models)
    runners = [Runner(models[name].SerializeToString(), provider, feeds, threads) for name in names]
    times = round_robin(runners, seconds=seconds, warmup=3, min_rounds=5, max_rounds=200)
    return {name: float(np.median(t)) for name, t in zip(names, times)}


def whole_model_verdict(latency: list, min_speedup: float) -> str | None:
    """Why the original should be written instead of the rewritten model (None: keep the rewrite):
    it was not measured faster than the original by ``min_speedup`` (geometric mean over the
    measured points), or it was slower somewhere."""
    measured = [e for e in latency if e.status == "measured" and e.speedup]
    if not measured:
        return None
    speedups = [e.speedup for e in measured]
    mean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
    worst = min(measured, key=lambda e: e.speedup)
    if mean >= min_speedup and worst.speedup >= 1.0:
        return None
    where = f"{worst.provider.replace('ExecutionProvider', '')} {worst.inputs}".strip()
    return (f"the rewritten model measured {mean:.2f}x the original's speed (worst {worst.speedup:.2f}x at {where}), "
            f"below --min-speedup {min_speedup:g} or slower somewhere: the original was written unchanged")
