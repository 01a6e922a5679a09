"""onnx_split: split MatMul/Gemm weights of ONNX models along their near-zero structure.

Library use::

    import onnx_split
    result = onnx_split.split_model("model.onnx", onnx_split.SplitConfig(layout="batched"))
    onnx_split.save_model(result.model, "model.split.onnx")
    print(result.report.to_text())

The library never prints or exits; it logs (logger ``onnx_split``) and returns a report.
"""
from .version import __version__  # noqa: E402,F401
from .bench import benchmark_models  # noqa: E402
from .config import SplitConfig  # noqa: E402
from .errors import InputError, ModelLoadError, OnnxSplitError, OutputError  # noqa: E402
from .inputs import make_feeds  # noqa: E402
from .kernel import kernel_absence, kernel_library  # noqa: E402
from .model_io import load_model, save_model  # noqa: E402
from .pipeline import SplitResult, split_held, split_model, survey_model  # noqa: E402
from .report import SiteReport, SplitReport  # noqa: E402
from .runtime import available_providers  # noqa: E402
from .verify import compare, verify_models  # noqa: E402

__all__ = [
    "InputError", "ModelLoadError", "OnnxSplitError", "OutputError", "SiteReport", "SplitConfig",
    "SplitReport", "SplitResult", "available_providers", "benchmark_models", "compare", "load_model",
    "kernel_absence", "kernel_library", "make_feeds", "save_model", "split_held", "split_model", "survey_model", "verify_models", "__version__",
]
