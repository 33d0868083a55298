"""glibc allocator settings for a process that churns through megabytes per second.

By default glibc hands freed memory back to the kernel as soon as 128 KiB sit
free at the top of the heap, and serves every allocation over a (dynamic)
threshold with its own mmap. The connector allocates and frees a few MB per
block of records, so memory went back and forth to the kernel thousands of
times a second, and each round trip costs page faults, which are expensive in
sandboxed kernels (gVisor) and VMs. Measured on the CI machine class:
translating a block cost 68 µs/event with the defaults and 32 µs/event with
these settings. The price is that up to TRIM_THRESHOLD of freed memory stays
with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 64 * 1024**2
MMAP_THRESHOLD = 32 * 1024**2  # glibc's upper bound for this setting on 64-bit
MAIN_MMAP_THRESHOLD = 1024**2


def tune(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Apply the settings; False (and nothing changed) where the C library is not glibc.

    The main process passes a small `mmap_threshold`: its big buffers (blocks of
    records, archive reads) then come from mmap and go back to the kernel when
    freed, so its memory does not creep up over a long hour; the workers, which
    do most of the small allocations, keep the large threshold.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
