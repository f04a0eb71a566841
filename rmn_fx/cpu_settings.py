"""Process settings a routed model needs on the CPU, which the process (not the model) owns.

- **oneDNN's primitive cache.** A convolution on the CPU runs a oneDNN primitive built for
  its exact input shape (about 0.3 ms to build) and kept in a cache of 1024 by default. A
  routed stage runs each of its N procedures on a sub-batch whose size changes with the
  route mix, so it needs about N times the base's primitives: EfficientNet-B0 at N = 8 and
  batch 64 overflowed the default cache and rebuilt primitives on every forward (1.42x its
  base in eager PyTorch; 1.09-1.13x with 2048-8192 entries). The capacity is read once,
  from ONEDNN_PRIMITIVE_CACHE_CAPACITY, when the process builds its first primitive, so
  `reserve_primitive_cache` must run before the first convolution (the CLI does it first).
- **Freed memory.** glibc's malloc serves each block over its mmap threshold (128 KiB,
  raised by each block freed, up to 32 MiB) with a fresh mapping and unmaps it on free, so
  a forward whose activations are 50-100 MB faults their pages in anew every time:
  EfficientNet-B0 at batch 64 took 1.46 million minor page faults per base forward (2.5 s,
  against 0.8 s with freed memory kept) and 0.55 million per routed forward, and which sizes
  fault depends on the threshold the process's history left, so timings moved by 0.1-0.3
  between runs. Kept, a routed forward faulted no page and a base forward some (ResNet-50:
  60-115 thousand): torch asks for aligned blocks, and a freed block is a few bytes short
  of the same request, so the heap sometimes grows instead. Allocators meant for servers
  (jemalloc, tcmalloc, ONNX Runtime's arena) keep freed memory; `keep_freed_memory` tells
  glibc to.

Nothing here imports torch: the CLI calls these before torch builds anything.
"""

from __future__ import annotations

import ctypes
import os
import platform

PRIMITIVE_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ROUTED_PRIMITIVE_CACHE = 4096  # primitives (about 70 KB each for a small convolution)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>
TRIM_THRESHOLD = 1 << 30  # give memory back to the kernel only beyond 1 GiB free at the heap's top


def reserve_primitive_cache(capacity: int = ROUTED_PRIMITIVE_CACHE) -> int:
    """Set oneDNN's primitive cache to `capacity` entries unless the environment already
    sets it; returns the capacity in effect. Takes effect only if the process has not yet
    run a convolution on the CPU."""
    os.environ.setdefault(PRIMITIVE_CACHE_VARIABLE, str(capacity))
    return int(os.environ[PRIMITIVE_CACHE_VARIABLE])


def runs_on_glibc() -> bool:
    """Whether this process's C library is glibc (the one `keep_freed_memory` can set)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> str:
    """Tell glibc's malloc to serve every block from its heap (no mmap) and to keep what is
    freed; returns the allocator in words ("default" where the C library is not glibc,
    which is left as it is)."""
    if not runs_on_glibc():
        return "default"
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        raise OSError("glibc's mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD; leave the allocator as it is")
    return "glibc, freed memory kept"
