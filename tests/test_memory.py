import sys

import numpy as np

from onnx_split import memory


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_give_back_returns_freed_heap_pages_on_linux():
    if not sys.platform.startswith("linux"):
        assert memory.give_back() is False
        return
    # many blocks below glibc's mmap threshold sit in the heap; freed, they stay resident until trimmed
    blocks = [np.ones(8000, np.float64) for _ in range(8000)]  # 8000 x 62.5 KiB: below any mmap threshold
    keep = blocks[::100]  # a few live blocks scattered through the heap keep it from shrinking by itself
    del blocks
    before = _resident()
    assert memory.give_back() is True
    after = _resident()
    assert before - after > 200 * 2**20, (before, after)
    assert all(float(b[0]) == 1.0 for b in keep)
