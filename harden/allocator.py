"""Keep freed memory in the process, so that reusing it does not fault every page in again (glibc only).

Why: a campaign's evaluation pass, a PyTorch forward pass and a training
step all allocate and free the same large tensors over and over. glibc's
defaults hand such memory back to the kernel as soon as it is freed: a block
over its mmap threshold (which adapts, up to 32 MiB) is unmapped, and free
memory at the heap's top beyond its trim threshold (up to 64 MiB) is given
back. The next allocation of that size faults each page in again, and the
kernel zeroes it. On this project's cloud VM that cost PyTorch's forward
pass of a 224 px ResNet-18 a fifth of its time; a `harden inject` campaign,
whose node sessions share ONNX Runtime's arena, about a second of kernel
time (tools/allocator_effect.py).

`keep_freed_memory` asks glibc to serve every allocation from its heap, to
give the heap back only beyond 1 GiB of free top, and to keep one arena for
all threads (a worker thread's arena is unmapped whole once it empties). A
process then holds on to its high-water mark, as ONNX Runtime's arena
already does. The `harden` command does this for its own
process; a program that calls the library may call it too. No result
changes: an allocator takes no part in the arithmetic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**30), (M_ARENA_MAX, 1))

# HARDEN_ALLOCATOR=default leaves the C library's allocator as it is.
ENV = "HARDEN_ALLOCATOR"


@functools.cache
def keep_freed_memory() -> bool:
    """Apply SETTINGS to this process's glibc allocator; whether it took them (False off glibc or when opted out).

    Call it early: a thread that has already made its own arena keeps it.
    """
    if os.environ.get(ENV, "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # musl and other C libraries have no mallopt with these parameters
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
