"""The child side of :mod:`onnx_split.isolate`: open (and run once) ONNX Runtime sessions one after
another, writing one JSON line per step to a results file.

Run as a script, never imported by the package: ``python _probe_child.py JOB RESULTS START SKIP``
(SKIP: a JSON file listing the indices not to try).
JOB is a pickle of a list of dicts (``source``: model bytes or a path, ``provider``,
``optimization``: an ``ort.GraphOptimizationLevel`` name, ``threads``, ``feeds``: None or a dict
of numpy arrays). Every step is flushed before the next one starts, so when ONNX Runtime kills
this process the parent knows which model, and which phase of it ("load" or "run"), did it.
It imports only the standard library, numpy (to unpickle feeds) and onnxruntime.
"""
import json
import pickle
import sys

CPU = "CPUExecutionProvider"


def _message(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _session(ort, job: dict):
    options = ort.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, job["optimization"])
    options.log_severity_level = 4
    if job.get("custom_ops"):  # onnx_split's kernel library (DynamicBlockMatMul)
        options.register_custom_ops_library(job["custom_ops"])
    providers = [job["provider"]] if job["provider"] == CPU else [job["provider"], CPU]
    return ort.InferenceSession(job["source"], options, providers=providers)


def main(argv: list[str]) -> int:
    job_path, results_path, start = argv[0], argv[1], int(argv[2])
    with open(argv[3], encoding="utf-8") as f:
        skip = set(json.load(f))
    with open(results_path, "a", encoding="utf-8") as out:
        def emit(**fields) -> None:
            out.write(json.dumps(fields) + "\n")
            out.flush()

        emit(child="started")
        import onnxruntime as ort

        ort.set_default_logger_severity(4)
        with open(job_path, "rb") as f:
            jobs = pickle.load(f)
        for i in range(start, len(jobs)):
            if i in skip:
                continue
            job = jobs[i]
            emit(i=i, phase="load")
            try:
                session = _session(ort, job)
                used = session.get_providers()
                if job["feeds"] is not None:
                    emit(i=i, phase="run")
                    session.run(None, job["feeds"])
                del session
            except Exception as exc:  # ORT raises its own types; the parent formats the line
                emit(i=i, error=_message(exc), type=type(exc).__name__)
                continue
            emit(i=i, ok=True, providers=used)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
