"""Model-sized buffers straight from the system, so what a round frees goes back to it.

glibc serves an allocation above its mmap threshold with its own mapping and unmaps it
on free, but it raises that threshold to the size of each large block it frees (up to
32 MB): after the first round every update (a DenseNet121 is 28 MB) comes from the
heap, and the heap keeps the pages of freed updates resident. The ServerApp fixes the
threshold (and the trim threshold) at 1 MiB at start-up, before any model-sized buffer,
so the server's resident size follows what it actually holds (bench/sim_scale.py).
Other C libraries keep their own behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

LOG = logging.getLogger("fedrad.server")

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    wanted = ("gnu_get_libc_version", "mallopt")
    return libc if all(hasattr(libc, symbol) for symbol in wanted) else None


def return_large_frees(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds at `threshold` bytes; False where this is
    not glibc or glibc refused."""
    libc = _glibc()
    if libc is None:
        return False
    for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        if libc.mallopt(option, threshold) != 1:
            LOG.warning("mallopt(%d, %d) refused; freed updates may stay resident",
                        option, threshold)
            return False
    return True
