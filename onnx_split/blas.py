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

from contextlib import nullcontext


def limited(threads: int):
    """A context in which BLAS runs on at most ``threads`` threads (nothing where threadpoolctl is missing)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency of the package; a copy run without it keeps the BLAS default
        return nullcontext()
    return threadpool_limits(limits=max(1, int(threads)), user_api="blas")


__all__ = ["limited"]
