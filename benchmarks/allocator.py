"""Keep freed memory in the process, so that latency measures the model and not page faults.

glibc's malloc serves every block above its mmap threshold (128 KiB, raised by each block
freed up to 32 MiB) with a fresh mmap and unmaps it on free. A CPU forward at batch 64
allocates activations of 50-100 MB, so each forward faults its pages in anew: measured
here on EfficientNet-B0 at batch 64, 1.46 million minor page faults per base forward
(2.5 s, against 0.8 s with freed memory kept) and 0.55 million per routed forward. Which
sizes fault depends on the threshold the process's history left, so timings at batch 64
moved by 0.1-0.3 between runs of the same code, and the base split into small sub-batches
(under the threshold) looked up to 2.7x faster than the whole batch. Allocators meant for
servers (jemalloc, tcmalloc, ONNX Runtime's arena) keep freed memory; glibc does when told
to, which is what `keep_freed_memory` does for this process.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>
TRIM_THRESHOLD = 1 << 30  # give memory back to the kernel only beyond 1 GiB free at the heap's top


def keep_freed_memory() -> str:
    """Tell glibc's malloc to serve every block from its heap (no mmap) and to keep what is
    freed; returns the allocator in words for the results ("default" where the C library is
    not glibc, which is left as it is)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default"
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        raise OSError("mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD: run with --allocator default")
    return "glibc, freed memory kept"
