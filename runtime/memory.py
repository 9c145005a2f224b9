"""Keep freed activation memory in the process instead of handing it back to the OS every step.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its mmap
threshold (dynamic, at most 32 MiB) with fresh ``mmap`` pages and returns them on ``free``, and trims
the top of its heap once more than the trim threshold is free there. A training step allocates and
frees the same large activations every step, so the kernel zero-fills the same pages again and
again: on the paper-size CAV-MAE step (batch 4, eager fp32) that was about 117,000 page faults and
1 s of system time per step, against about 4,600 faults and 0.05 s with the thresholds fixed at their
largest, and the step took 8.4 instead of 6.6 s (`python -m benchmarks allocator cav-mae`). Fixing them (``mallopt``) keeps a freed block for
the next allocation of its size; the process keeps the memory of its peak, which a training step
reaches again anyway (the peak itself does not grow).

This is process-wide allocator tuning, as ``torch.set_num_threads`` is process-wide thread tuning:
`avdsl train` and the benchmarks (for avdsl and the reference code alike) call it once at start.
On a C library other than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # free bytes at the top of the heap before trimming: the largest mallopt takes (an int)


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at their largest (see the module docstring).
    Returns True when both were set, False where the C library is not glibc or refused."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    trimmed = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    return bool(trimmed and mapped)
