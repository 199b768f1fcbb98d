"""Stop glibc's malloc from handing memory back to the kernel after every large update.

Each update the aggregator receives is one large allocation (100 KB for an int8 update of
d = 1e5, more copies of it on the way) that lives for a few milliseconds. With glibc's
defaults, freeing such blocks leaves more than ``M_TRIM_THRESHOLD`` (128 KiB) free at the top of
a heap, so glibc hands the pages back to the kernel -- and the next update page-faults them in
again. Allocations above the adaptive ``M_MMAP_THRESHOLD`` pay the same through
``mmap``/``munmap``. Measured with ``bench/aggregator_throughput.py`` (d = 1e5 int8, 3,000
updates, one process): 126k minor page faults and 431-472 microseconds of CPU per update with
the defaults, 21k and 295-340 with the thresholds below, for 10 MB more peak RSS (93 -> 103 MB;
docs/benchmarks.md).

The cost is memory: up to :data:`TRIM_THRESHOLD` bytes of freed heap per malloc arena stay
mapped for reuse instead of being returned. glibc's own ``MALLOC_*_`` environment variables take
precedence: if any of them is set, nothing is changed here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Final

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD: Final = -1  # <malloc.h>
M_MMAP_THRESHOLD: Final = -3
TRIM_THRESHOLD: Final = 32 << 20
MMAP_THRESHOLD: Final = 32 << 20  # glibc's upper limit for this setting on 64-bit hosts

_ENV_VARS: Final = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc() -> bool:
    """Apply the thresholds to this process (process-wide); True if glibc accepted them."""
    if platform.libc_ver()[0] != "glibc":
        return False
    if any(v in os.environ for v in _ENV_VARS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.debug("glibc refused the malloc thresholds; keeping its defaults")
    return ok
