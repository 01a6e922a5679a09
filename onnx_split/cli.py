"""``python -m onnx_split IN OUT``: the only place that prints or chooses exit codes.

Exit codes: 0 written; 1 verification failed (nothing written unless --force); 2 bad input or usage.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from .version import __version__
from .calibration import CAPTURE_BYTES
from .config import DEFAULT_LOSSY, FACTORIZATIONS, LAYOUTS, PARTITIONERS, SCORES, SplitConfig
from .errors import OnnxSplitError, first_line
from .inputs import parse_input_shape
from .model_io import check_destination, plan_destinations, read_model, refuse_overwrite, same_file, stage_model
from .writes import stage_bytes
from .pipeline import split_held, survey_model
from . import plots
from .html_report import run_html, survey_html
from .plans import PLANNERS
from .plans.base import LEVELS
from .report import node_modules, survey_table
from .rewrite import LAYOUTS as REGISTERED_LAYOUTS
from .runtime import require_providers

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2
D = {f.name: f.default for f in dataclasses.fields(SplitConfig)}
"""SplitConfig's defaults: the CLI states them, it does not repeat them."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        print(f"onnx_split: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m onnx_split", description=(
        "Split the constant weights of MatMul/Gemm nodes along their near-zero structure into independent "
        "parts, verify the result in ONNX Runtime and time it."))
    p.add_argument("input", help="input .onnx model")
    p.add_argument("output", nargs="?", help="where to write the rewritten model (never the input); not with --dry-run")
    g = p.add_argument_group("partition")
    g.add_argument("--threshold", type=float, default=D["threshold"],
                   help=f"drop weights with |w| <= this; {D['threshold']:g} (default) drops exact zeros only: lossless")
    g.add_argument("--max-parts", type=int, default=D["max_parts"],
                   help=f"pack components into at most this many parts ({D['max_parts']})")
    g.add_argument("--min-elements", type=int, default=D["min_elements"],
                   help=f"keep weights with fewer elements ({D['min_elements']}); 0 splits everything")
    g.add_argument("--layout", choices=LAYOUTS, default=D["layout"],
                   help="auto (default): time every form and the dense original per site in ORT and keep the "
                        "fastest, then write the original unless the whole model is faster; "
                        + "; ".join(f"{name}: {lay.help}" for name, lay in REGISTERED_LAYOUTS.items()))
    g.add_argument("--no-chains", action="store_true",
                   help="split each layer on its own (default: consecutive split layers joined by feature-wise ops "
                        "become independent sub-networks, with no Concat/Slice between them)")
    g.add_argument("--no-fold", action="store_true",
                   help="leave the dense layers next to a split as they are (default: where a dense MatMul/Gemm feeds "
                        "a split, or reads it, through feature-wise ops only, its weight takes the split's order "
                        "and the Gather at that end of the split goes)")
    g.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="split only the MatMul/Gemm nodes whose name (or PyTorch module scope) matches PATTERN: a "
                        "glob matching the whole name ('*mlp*'), or with the prefix re: a regular expression searched "
                        "in it ('re:^/h\\.[0-5]/'); repeatable (any pattern may match)")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="never split the nodes matching PATTERN (as --include; wins over it); repeatable")
    g = p.add_argument_group("lossy splitting (drops the weights outside the parts' blocks)")
    g.add_argument("--partitioner", choices=PARTITIONERS, default=None,
                   help=f"components (default without a budget): exact, lossless; {DEFAULT_LOSSY} (default with a "
                        f"budget) or spectral: balanced block-diagonal parts under row/column permutations keeping "
                        f"the most significance; tiles: static b x b tiles, the most significant kept; random: a "
                        f"random balanced partition (a baseline)")
    g.add_argument("--parts", type=int, default=None, metavar="G",
                   help="budget: G balanced parts per site (at most --max-parts and the weight's smaller side)")
    g.add_argument("--keep", type=float, default=None, metavar="F",
                   help="budget: per site, the cheapest plan that keeps at least fraction F of its significance")
    g.add_argument("--flops", type=float, default=None, metavar="F",
                   help="budget: per site, the plan keeping the most significance within fraction F of its dense FLOPs")
    g.add_argument("--tolerance", type=float, default=None, metavar="E",
                   help="budget: the largest saving whose relative output error ||y'-y||/||y|| stays <= E on the "
                        "calibration data, then checked on held-out samples (exit 1 if it does not hold there)")
    g.add_argument("--calibration", default=None, metavar="FILE.npz",
                   help="calibration samples: one array per graph input, first axis = samples (default: seeded "
                        "random inputs, and the report says so)")
    g.add_argument("--score", choices=SCORES, default=D["score"],
                   help="significance: magnitude |w|, activation |w|*||x_i|| over the calibration data; auto "
                        "(default): activation with --calibration, else magnitude")
    g.add_argument("--tile", type=int, default=D["tile"], metavar="B", help=f"tile size of --partitioner tiles ({D['tile']})")
    g.add_argument("--holdout", type=float, default=D["holdout"],
                   help=f"fraction of calibration samples held out of the search to check the result ({D['holdout']:g})")
    g.add_argument("--no-refit", dest="refit", action="store_false",
                   help="drop the weights outside the kept blocks as they are, instead of refitting the kept ones to "
                        "reproduce each layer's original output on the calibration data (the default)")
    g.add_argument("--calibration-batch", type=int, default=D["calibration_batch"], metavar="N",
                   help=f"calibration samples per ORT run, at most; fewer where a run's captured "
                        f"activations would pass {CAPTURE_BYTES // 2**20} MiB; activations are summed batch by batch "
                        f"({D['calibration_batch']})")
    g.add_argument("--search-seconds", type=float, default=None, metavar="S",
                   help="wall-clock limit of the --tolerance search (only with --tolerance): then the best choice "
                        "measured within the tolerance so far is kept (default: none)")
    g.add_argument("--dry-run", action="store_true",
                   help="print each site's retained significance and FLOPs at 2/4/8/16 parts (with --calibration also the "
                        "layer error and the estimated output error of each alone); write nothing")
    g = p.add_argument_group("dynamic block skipping (keeps every weight, skips input blocks per call)")
    g.add_argument("--dynamic-keep", type=float, default=None, metavar="F",
                   help="make eligible sites dynamic, keeping F of their input blocks per call")
    g.add_argument("--dynamic-rule", choices=("topk", "threshold"), default=D["dynamic_rule"],
                   help="topk: the best F of the blocks; threshold: a calibrated per-site score threshold (topk)")
    g.add_argument("--dynamic-block", type=int, default=D["dynamic_block"], metavar="B",
                   help=f"input features per block ({D['dynamic_block']})")
    g.add_argument("--dynamic-score", choices=("xw", "x"), default=D["dynamic_score"],
                   help="block score: ||x_b||*||W_b|| (xw) or ||x_b|| (x)")
    g.add_argument("--dynamic-compensate", action="store_true",
                   help="a skipped block counts as its mean over the calibration calls that skipped it, not as zero "
                        "(adds one precomputed row per skipped block; the means come from the calibration samples)")
    g.add_argument("--dynamic-form", choices=("auto", "kernel", "portable", "fallback"), default=D["dynamic_form"],
                   help="the compiled kernel, standard ONNX (one If per block), the kernel with a standard-ONNX "
                        "function as fallback (IR >= 10), or the faster measured (auto)")
    g = p.add_argument_group("factorization (each weight replaced by factors fitted on calibration data)")
    g.add_argument("--factorize", choices=tuple(FACTORIZATIONS), default=None,
                   help="dsf: W = A*B, both sparse (Double Sparse Factorization); magnitude, wanda, sparsegpt, admm: "
                        "one sparse matrix (these are stored compressed: smaller file, same speed); blocks: "
                        "W = B1*P*B2 with block-diagonal factors, lowrank: W = U*V (these run as two smaller "
                        "MatMuls); fitted per site on calibration data, in order")
    g.add_argument("--density", type=float, default=None, metavar="D",
                   help="--factorize: the fraction of each weight's entries kept as non-zeros (blocks, lowrank: the "
                        "factors' parameters as a fraction of the weight's); or, instead, --tolerance E: a density "
                        "per site, the output error within E")
    g.add_argument("--blocks", type=int, default=None, metavar="G",
                   help="--factorize blocks: the blocks of each factor (4); input and output features must divide by G")
    g.add_argument("--workers", type=int, default=D["workers"], metavar="N",
                   help="--factorize: fit up to N independent sites at once, in N worker processes, each with "
                        "min(--threads, cpus/N) BLAS threads; the factors are the same as with 1 (default: 1, in "
                        "this process)")
    g.add_argument("--fit-seconds", type=float, default=None, metavar="S",
                   help="--factorize: do not start a site whose estimated fit would end more than S s after the "
                        "fitting began; it stays dense, its reason giving the estimate (running fits finish)")
    g = p.add_argument_group("autotuning (--layout auto)")
    g.add_argument("--batch", default=None, metavar="B1,B2,..",
                   help="batch sizes to tune and time at: the first dim of every input whose first dim is dynamic "
                        "(default: the inputs verification uses)")
    g.add_argument("--tune-seconds", type=float, default=D["tune_seconds"],
                   help=f"time budget of all tuning measurements ({D['tune_seconds']:g})")
    g.add_argument("--min-speedup", type=float, default=D["min_speedup"],
                   help=f"write the original unless the rewrite is at least this much faster ({D['min_speedup']:g}) "
                        f"and slower nowhere")
    g = p.add_argument_group("verification and latency")
    g.add_argument("--providers", default=None,
                   help="comma list of cpu,cuda (default: every one that really runs here)")
    g.add_argument("--rtol", type=float, default=None, help="relative tolerance (default by dtype: fp32 1e-4)")
    g.add_argument("--atol", type=float, default=None, help="absolute tolerance (default by dtype: fp32 1e-6)")
    g.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,..",
                   help="shape of a graph input with dynamic dims (default 1); repeatable")
    g.add_argument("--inputs", default=None, metavar="FILE.npz", help="real inputs, one array per graph input")
    g.add_argument("--seed", type=int, default=D["seed"], help=f"seed of the random inputs ({D['seed']})")
    g.add_argument("--no-verify", action="store_true", help="skip verification (the checker still runs)")
    g.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    g.add_argument("--bench-seconds", type=float, default=D["bench_seconds"],
                   help=f"timing budget per provider ({D['bench_seconds']:g})")
    g.add_argument("--threads", default=None, metavar="N1,N2,..",
                   help=f"ORT intra-op threads ({D['threads']}); a list (1,8) tunes and times at each count, "
                        f"verification runs at the first")
    g.add_argument("--force", action="store_true", help="write the output even if verification fails")
    g = p.add_argument_group("output")
    g.add_argument("--report", default=None, metavar="FILE.json", help="write the report as JSON")
    g.add_argument("--html", default=None, metavar="FILE.html",
                   help="write the report as one self-contained HTML page with the site table, verification, "
                        "latency charts and the weights' pictures (also with --dry-run; needs the plots extra)")
    g.add_argument("--plots", default=None, metavar="DIR",
                   help="write the pictures as PNG files into DIR (created if missing): per planned site |W| before "
                        "and after its permutation into parts, latency, error against FLOPs (needs the plots extra)")
    g.add_argument("--external-data", action="store_true",
                   help="write the weights to a file beside the output, OUTPUT.<id>.data (automatic above 2 GB or when "
                        "the input uses external data)")
    g.add_argument("--quiet", action="store_true", help="print only the summary lines")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument("--version", action="version", version=f"onnx_split {__version__}")
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: temporary files are removed on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None, *, finished=None) -> int:
    """The CLI on ``argv``; returns the exit code. ``finished``: called once the run's files are
    published, just before its last line is printed (the console entry ignores late signals from
    there on)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help and --version (0)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    written: list[Path] = []
    done = []

    def finish() -> None:
        done.append(True)
        if finished is not None:
            finished()
    try:
        return _run(args, written, finish)
    except OnnxSplitError as exc:
        if args.debug:
            raise
        also = f" (already written: {', '.join(map(str, written))})" if written else ""
        print(f"onnx_split: error: {exc}{also}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        what = f"after writing {', '.join(map(str, written))}" if written else "nothing written"
        print(f"onnx_split: interrupted{' (SIGTERM)' if isinstance(exc, _Terminated) else ''}; {what}",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)
    except Exception as exc:  # a bug of ours: still one line, unless --debug
        if args.debug:
            raise
        print(f"onnx_split: internal error: {type(exc).__name__}: {first_line(exc)} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if in_main_thread and not (done and finished is not None):  # the entry keeps ignoring them
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def entry() -> None:
    """The console entry point: :func:`main`, then exit with its code. Once the run's files are
    published and its last line is about to be printed, the run is over, so SIGINT and SIGTERM are
    ignored from there on, through the interpreter's shutdown (ONNX Runtime's teardown takes a
    moment): a late signal cannot turn a finished run's exit code into 130/143 with no line."""
    sys.exit(main(finished=_ignore_late_signals))


def _ignore_late_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run(args, written: list[Path], finish=lambda: None) -> int:
    config = SplitConfig(
        threshold=args.threshold, max_parts=args.max_parts, min_elements=args.min_elements, layout=args.layout,
        verify=not args.no_verify, bench=not args.no_bench, bench_seconds=args.bench_seconds,
        threads=_threads(args.threads),
        providers=tuple(p for p in args.providers.split(",") if p.strip()) if args.providers else None,
        rtol=args.rtol, atol=args.atol, input_shapes=dict(parse_input_shape(s) for s in args.input_shape),
        inputs_path=args.inputs, seed=args.seed, chains=not args.no_chains, fold=not args.no_fold, batches=_batches(args.batch),
        tune_seconds=args.tune_seconds, min_speedup=args.min_speedup,
        partitioner=args.partitioner or (DEFAULT_LOSSY if args.dry_run else D["partitioner"]), parts=args.parts,
        keep=args.keep, flops=args.flops, tolerance=args.tolerance, calibration=args.calibration, score=args.score,
        tile=args.tile, holdout=args.holdout, refit=args.refit, calibration_batch=args.calibration_batch,
        search_seconds=args.search_seconds, include=tuple(args.include), exclude=tuple(args.exclude),
        dynamic_keep=args.dynamic_keep, dynamic_rule=args.dynamic_rule, dynamic_block=args.dynamic_block,
        dynamic_score=args.dynamic_score, dynamic_form=args.dynamic_form, dynamic_compensate=args.dynamic_compensate,
        factorize=args.factorize, density=args.density, blocks=args.blocks, workers=args.workers,
        fit_seconds=args.fit_seconds,
    )
    if args.partitioner == "components" and config.budget is not None:
        raise OnnxSplitError(f"--partitioner components is exact and lossless: it takes no budget ({config.budget})")
    if args.html is not None or args.plots is not None:
        plots.require(" and ".join(o for o, v in (("--html", args.html), ("--plots", args.plots)) if v is not None))
    if args.dry_run:
        if args.output is not None or args.report is not None:
            raise OnnxSplitError("--dry-run writes nothing but --html and --plots: give only the input model (no "
                                 "output, no --report; onnx_split.survey_model returns the same figures as data)")
        if config.budget is not None:
            raise OnnxSplitError(f"--dry-run shows every part count; {config.budget} applies to a real run")
        in_path = Path(args.input)
        model, external_files = read_model(in_path)
        pages = _page_destinations(args, (in_path, *external_files, *(Path(f) for f in (args.calibration,) if f)))
        rows = survey_model(model, config)
        partitioner = config.partitioner if config.lossy else DEFAULT_LOSSY
        print(f"dry run of {args.input} ({partitioner} partitioner; nothing written)")
        modules = node_modules(model)
        print(survey_table(rows, partitioner, config.tile, config.layout, modules))
        if pages:
            pictures = plots.pictures(survey_rows=rows)
            levels = [(level, PLANNERS[partitioner].level_name(level)) for level in LEVELS]
            page = survey_html(rows, args.input, partitioner, levels, pictures, modules)
            _write_pages(args, page, pictures, written)
            print(f"wrote {_listed(written)}")
        return EXIT_OK
    if args.output is None:
        raise OnnxSplitError("give the output path (or --dry-run)")
    require_providers(config.providers, force=args.force)  # --providers cuda where CUDA does not run: exit 2
    in_path, out_path = Path(args.input), Path(args.output)
    started = time.perf_counter()
    model, external_files = read_model(in_path)
    load_seconds = time.perf_counter() - started
    protect = (in_path, *external_files)
    npz = tuple(Path(f) for f in (args.inputs, args.calibration) if f is not None)
    dest = plan_destinations(out_path, report=args.report, inputs=protect + npz)
    report_path = dest.report
    pages = _page_destinations(args, protect + npz,
                               {"the output model's path": out_path, "the --report path": report_path})

    bar = _ProgressBar(disabled=args.quiet)
    try:
        held = [model]  # handed over: the CLI keeps no reference to the input during the run
        del model
        result = split_held(held, config, progress=bar, structures=pages)
    finally:
        bar.close()
    report = result.report
    report.input, report.output = str(in_path), str(out_path)
    seconds = report.stage_seconds
    seconds["load"] = seconds.get("load", 0.0) + load_seconds  # reading the file, then the pipeline's copy
    report.stage_seconds = {"load": seconds.pop("load"), **seconds}
    started = time.perf_counter()
    passed = report.verification_passed
    ok = passed is True or (passed is None and not config.verify)  # asked to verify and nothing ran: not ok
    staged, page_files = [], 0
    try:
        if ok or args.force:
            external = args.external_data or bool(external_files) or None
            staged.append(stage_model(result.model, out_path, external_data=external, protect=protect + npz))
            report.written = True
        if report_path is not None:
            report.stage_seconds["write"] = time.perf_counter() - started  # the report is the last file
            staged.append(stage_bytes(report_path, report.to_json().encode()))
        if pages:
            chosen, left_out = plots.chosen_structures(result.structures)
            pictures = plots.pictures(report, chosen)
            page = run_html(report, pictures, left_out) if args.html is not None else None
            page_staged = _stage_pages(args, page, pictures)
            staged += page_staged
            page_files = len(page_staged)
        _publish(staged, written)
    finally:
        for s in staged:
            s.discard()  # what was not published (an error or an interrupt before it)
    report.stage_seconds["write"] = time.perf_counter() - started
    if not args.quiet:
        print(report.to_text())
    finish()
    others = page_files + (report_path is not None)  # the report and the pages, published after the model
    if others:
        print(f"wrote {_listed(written[-others:])}")
    _summary(report, out_path, ok, args.force, others=bool(others))
    return EXIT_OK if ok else EXIT_VERIFY_FAILED


def _page_destinations(args, protect: tuple, written: dict | None = None) -> bool:
    """Check the --html file and the --plots folder before any work (a missing folder is created
    when the pictures are written, if its parent exists); True if either is asked for. ``written``:
    the run's other files by what they are (the --html file must be none of them)."""
    if args.html is not None:
        page = Path(args.html)
        check_destination(page, "--html")
        refuse_overwrite([page], protect)
        for what, path in (written or {}).items():
            if path is not None and same_file(page, Path(path)):
                raise OnnxSplitError(f"--html {page} is also {what}; choose another")
    if args.plots is not None:
        folder = Path(args.plots)
        if folder.exists() and not folder.is_dir():
            raise OnnxSplitError(f"--plots {folder} is not a directory")
        if not folder.exists():
            check_destination(folder, "--plots")
    return args.html is not None or args.plots is not None


def _stage_pages(args, page: str | None, pictures: list) -> list:
    staged = []
    try:
        if page is not None:
            staged.append(stage_bytes(Path(args.html), page.encode("utf-8")))
        if args.plots is not None:
            folder = Path(args.plots)
            try:
                folder.mkdir(exist_ok=True)
            except OSError as exc:
                raise OnnxSplitError(f"--plots: cannot create {folder}: {exc.strerror or first_line(exc)}") from None
            for picture in pictures:
                staged.append(stage_bytes(Path(args.plots) / picture.name, picture.png))
    except BaseException:
        for s in staged:
            s.discard()
        raise
    return staged


def _write_pages(args, page: str, pictures: list, written: list[Path]) -> None:
    staged = _stage_pages(args, page if args.html is not None else None, pictures)
    try:
        _publish(staged, written)
    finally:
        for s in staged:
            s.discard()


def _listed(paths: list[Path], limit: int = 4) -> str:
    shown = ", ".join(map(str, paths[:limit]))
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _publish(staged: list, written: list[Path]) -> None:
    """Rename every staged file into place with SIGINT and SIGTERM held back, so an interrupt comes
    before all of them or after all of them; what was published is appended to ``written``."""
    mask = getattr(signal, "pthread_sigmask", None)  # POSIX only
    previous = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if mask else None
    try:
        for s in staged:
            written.extend(s.publish())
    finally:
        if mask:
            mask(signal.SIG_SETMASK, previous)


def _threads(text: str | None):
    if text is None:
        return D["threads"]
    try:
        counts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        counts = ()
    if not counts:
        raise OnnxSplitError(f"--threads wants whole numbers like 1 or 1,8, got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def _batches(text: str | None) -> tuple[int, ...]:
    if text is None:
        return ()
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        batches = ()
    if not batches:
        raise OnnxSplitError(f"--batch wants whole numbers like 1,32, got {text!r}")
    return batches


def _summary(report, out_path: Path, ok: bool, force: bool, others: bool = False) -> None:
    """The last line; ``others``: the report or pages were written (then a model not written is named)."""
    measured = [e for e in report.latency if e.status == "measured"]
    several = len({e.threads for e in measured}) > 1
    speed, provider = [], None
    for e in measured:  # the provider named once for its points: "CPU 1.93x (batch 1), 3.23x (batch 256)"
        name = e.provider.replace("ExecutionProvider", "")
        point = (f" ({e.inputs}{f', {e.threads} thread' + ('s' if e.threads != 1 else '') if several else ''})"
                 if len(measured) > 1 else "")
        speed.append(f"{name + ' ' if name != provider else ''}{e.speedup:.2f}x{point}")
        provider = name
    error = report.error
    if ok and report.reverted:
        print(f"wrote {out_path}: the original model, unchanged (the rewrite was not measured faster)")
    elif ok:
        # the reference without its explanation (the verification line above has it): the last line stays short
        against = (report.verified_against or "").split(" (", 1)[0]
        what = f"verified against {against}" if report.verification_passed else "not verified"
        print(f"wrote {out_path}: {report.n_split} of {len(report.sites)} sites split, {what}"
              + (f"; {_output_error(error)}" if error is not None else "")
              + (f"; speedup {', '.join(speed)}" if speed else ""))
    else:
        if error is not None and error.met is False:
            what = (f"--tolerance {error.tolerance:g} NOT MET on held-out data (relative output error "
                    f"{error.held_out:.4g} > {error.tolerance:g})")
        elif any(v.status == "failed" for v in report.verification) or report.checker.get("passed") is False:
            what = "VERIFICATION FAILED"
            threshold = report.config.get("threshold") or 0
            if threshold > 0 and report.n_split and report.checker.get("passed") is not False:
                what += (f": dropping |w| <= {threshold:g} (--threshold) changed the outputs beyond --rtol/--atol; "
                         f"a budget (--tolerance E) bounds that error instead")
        elif not any(v.status == "not verified" for v in report.verification):
            what = "NOT VERIFIED (no provider ran the models)"
        else:
            what = "NOT VERIFIED (nothing finite was compared, or a rewritten branch was never taken)"
        if force:
            print(f"{what}; wrote {out_path} anyway (--force)", file=sys.stderr)
        else:
            unwritten = "the model not written" if others else "nothing written"  # (the report's line is above)
            print(f"{what}; {unwritten} (use --force to write it anyway)", file=sys.stderr)


def _output_error(error) -> str:
    """A lossy run's cost at the outputs, for the last line: the held-out error and the tolerance."""
    if error.held_out is None:
        return "relative output error not measured"
    text = f"held-out relative output error {error.held_out:.4g}"  # the sample counts are on the error line
    if error.tolerance is not None:
        return text + f" (--tolerance {error.tolerance:g})"
    return text + " (no --tolerance bounds it)"


class _ProgressBar:
    """A tqdm bar on stderr per stage, shown only when stderr is a terminal."""

    def __init__(self, disabled: bool):
        self.disabled = disabled or not sys.stderr.isatty()
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.disabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, leave=False, file=sys.stderr)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


if __name__ == "__main__":  # pragma: no cover
    entry()
