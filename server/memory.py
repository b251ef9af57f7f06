"""Model-sized buffers straight from the system, so what a round frees goes back to it.

glibc serves an allocation above its mmap threshold with its own mapping and unmaps it
on free, but it raises that threshold to the size of each large block it frees (up to
32 MB): after the first round every update (a DenseNet121 is 28 MB) comes from the
heap, and the heap keeps the pages of freed updates resident. The ServerApp fixes the
threshold at 1 MiB once, at start-up, so a folded update's memory is returned at once
and the server's resident size follows what it actually holds (bench/sim_scale.py).
Other C libraries keep their own behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

LOG = logging.getLogger("fedrad.server")

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
THRESHOLD_BYTES = 1 << 20


def return_large_frees(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes; False where this is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        LOG.warning("mallopt(M_MMAP_THRESHOLD, %d) refused; freed updates may stay "
                    "resident", threshold)
        return False
    return True
