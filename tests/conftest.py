import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import contextlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def one_blas_thread():
    """One BLAS thread for numpy/scipy (threadpoolctl, where installed): the factorizations' many
    small solves ran 10x slower with threads fighting over two shared cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        limit = contextlib.nullcontext()
    else:
        limit = threadpool_limits(1)
    with limit:
        yield
