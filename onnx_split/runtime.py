"""ONNX Runtime sessions: which providers really run, and sessions at a fixed thread count.

onnxruntime-gpu lists CUDAExecutionProvider as available even where no GPU or CUDA library is
present; a provider counts here only if a session created with it reports it in get_providers().
"""
from __future__ import annotations

import functools
import logging
import re

import onnx
import onnxruntime as ort

from .errors import InputError
from .kernel import register
from .model_io import model_source

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "enabled": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_DEFAULT_SEVERITY = 2  # warnings, ORT's own default


@functools.lru_cache(maxsize=None)
def provider_status(provider: str) -> str | None:
    """None if ``provider`` really runs here, else why not (one line)."""
    if provider == CPU:
        return None
    if provider not in ort.get_available_providers():
        return f"{provider} is not in this onnxruntime build"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=7)
    ort.set_default_logger_severity(4)  # a missing CUDA library is logged as an error otherwise
    try:
        session = ort.InferenceSession(probe.SerializeToString(), _options(1, "disabled"),
                                       providers=[provider, CPU])
        used = session.get_providers()
    except Exception as exc:  # ORT raises its own types
        return f"{provider} failed to start: {ort_error(exc)}"
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
    if not used or used[0] != provider:
        return f"{provider} is listed by onnxruntime but did not start (no usable GPU or CUDA libraries)"
    return None


def require_providers(requested, force: bool = False) -> None:
    """A one-line InputError for the first provider of ``requested`` (asked for by name, e.g. with
    ``--providers``) that does not really run here, unless ``force`` (then it is reported
    ``unavailable``, as a provider found missing by default is)."""
    if force:
        return
    for provider in requested or ():
        why = provider_status(provider)
        if why is not None:
            short = provider.replace("ExecutionProvider", "").lower()
            raise InputError(f"--providers {short} was asked for, but {why}; leave it out (the default uses every "
                             f"provider that really runs) or pass --force to go on without it")


def ort_error(exc: BaseException) -> str:
    """ORT's message without its source path and C++ signature, on one line.

    "[ONNXRuntimeError] : 1 : FAIL : /src/model.cc:256 onnxruntime::Model::Model(...) Unsupported model
    IR version: 14, ..." -> "FAIL: Unsupported model IR version: 14, ..."
    """
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    match = re.match(r"\[ONNXRuntimeError\] : \d+ : (\w+) : (.*)", text)
    if match:
        text = "{}: {}".format(*match.groups())
    # "/onnxruntime_src/x.cc:12 onnxruntime::F(const A&, B) " locates ORT's source, not the problem
    text = re.sub(r"/onnxruntime_src/\S+:\d+ \S*?\(.*?\) ", "", text)
    return text[:300]


def available_providers() -> list[str]:
    return [p for p in (CPU, CUDA) if provider_status(p) is None]


def _options(threads: int, optimization: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 4  # fatal only: failures come back as exceptions, ORT prints nothing
    register(options)  # onnx_split's DynamicBlockMatMul kernel, where it is built
    return options


def make_session(source, provider: str, optimization: str = "enabled", threads: int = 1) -> ort.InferenceSession:
    """A session that runs on ``provider`` (CPU as fallback for nodes it lacks)."""
    providers = [provider] if provider == CPU else [provider, CPU]
    return ort.InferenceSession(source, _options(threads, optimization), providers=providers)


def capture(model: onnx.ModelProto, names: list[str], feeds_list: list[dict], threads: int = 1) -> list[dict]:
    """The values of tensors ``names`` (intermediate or graph inputs) of the main graph, from one CPU
    run of ``model`` per set of feeds, with those tensors made graph outputs (of the source given
    to ORT: ``model`` is neither changed nor copied)."""
    found = []
    with model_source(model, outputs=tuple(names)) as source:
        session = make_session(source, CPU, "disabled", threads)
        produced = [o.name for o in session.get_outputs()]
        for feeds in feeds_list:
            values = dict(zip(produced, session.run(None, feeds)))
            values.update(feeds)
            found.append({name: values[name] for name in names})
    return found
