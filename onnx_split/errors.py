"""User-facing errors. The CLI prints ``str(error)`` on one line and exits 2."""


class OnnxSplitError(Exception):
    """Base class of every error onnx_split raises on purpose."""


class InputError(OnnxSplitError):
    """The input model, an option, or an input file cannot be used."""


class ModelLoadError(InputError):
    """The input file is missing, is not ONNX, or is damaged."""


class OutputError(OnnxSplitError):
    """The output cannot be written where asked."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line, for reasons and error messages."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
