"""Let freed tensor buffers go back to the operating system during streaming conversion.

glibc raises its mmap threshold each time a large mmap'd block is freed, so after the first few tensors
same-sized buffers come from the heap, and freed heap memory mostly stays resident: a converter that
holds one tensor at a time would still see its RSS creep up with the number of tensors it passed
(measured: +80 MB over 300 shards of a 300 MB model). Pinning the threshold keeps every buffer of
1 MiB or more in its own mapping, released on free. No effect off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20


def pin_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
