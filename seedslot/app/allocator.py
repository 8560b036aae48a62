"""The process-wide allocator setting of the ``seedslot`` command, chosen here and only here (the
library never changes it; benchmarks measure under it)."""

from __future__ import annotations

import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_large_frees(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold_bytes`` or more with mmap, so freeing a large
    tensor returns its memory to the OS at once; returns whether the setting took effect.

    glibc's default threshold grows each time a large block is freed (up to 32 MiB); after that,
    freed tensors stay in the heap, fragment it and count in the resident set: building a VGG-19
    slot machine at K = 32 then leaves about 0.7 GB of freed heap behind. Setting the threshold
    fixes it for the whole process. No-op (False) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)):
            return False
    except (OSError, AttributeError):
        return False
    return True
