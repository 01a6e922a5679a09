"""The BLAS threads of the pass's own numeric work (the fits of --factorize, the refits of lossy
budgets, the dry run's, the dynamic calibration).

numpy and scipy call a BLAS that starts one thread per core by default. On a machine whose cores
are shared, those threads wait on each other: fitting the digits MLP with ``--factorize blocks``
took 240 s with the default threads and 16-19 s with one, on two cores under a load of about 4
(docs/FACTORIZE.md), and the dry run of a 2-layer BERT-sized encoder 121 s against 73 s
(docs/SIGNIFICANCE.md). The fits therefore run with ``--threads`` BLAS threads (1 unless told), the
count the ONNX Runtime sessions get; ``--workers`` adds processes, each with its own limit.
threadpoolctl sets the limit on the BLAS libraries already loaded, for the duration of a block.
"""
from __future__ import annotations

import signal
from contextlib import nullcontext


def limited(threads: int):
    """A context in which BLAS runs on at most ``threads`` threads (nothing where threadpoolctl is missing)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency of the package; a copy run without it keeps the BLAS default
        return nullcontext()
    return threadpool_limits(limits=max(1, int(threads)), user_api="blas")


_LIMIT = None


def worker_start(threads: int) -> None:
    """A worker process's initializer: Ctrl-C is the parent's to handle (it ends the pool), and
    BLAS gets ``threads`` threads so that workers do not each start one thread per core.

    threadpoolctl (a runtime dependency) is used rather than OMP_NUM_THREADS and its kin: under
    spawn, numpy and its BLAS are already loaded when this runs (unpickling the initializer
    imports this module), and those variables are read only when the library loads;
    threadpoolctl changes the loaded libraries' limits in place."""
    global _LIMIT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover  (installed with onnx_split)
        return
    _LIMIT = threadpool_limits(limits=threads)


__all__ = ["limited", "worker_start"]
