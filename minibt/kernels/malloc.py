"""Keep freed activation memory for reuse instead of handing it back to the OS.

glibc serves large blocks with mmap and trims the top of its heap on free, so every forward pass gets fresh pages for
its multi-MB activations, and each fresh page costs a page fault on first write. On this VM a (3944, 1536) bf16
GELU took 6.8 ms into fresh pages and 1.3-2 ms into reused ones; embedding the 4,000-text corpus of
benchmarks/embed_corpus.py took 366k minor faults per run (1.5 GB of first touches). With the two settings below:
under 10 faults per run after the first, bf16 texts/s +5-10% (973-1071 vs 920-932 over repeated runs; fp32 within
noise, the GEMMs dominate there). Placement still varies, so a repeated run sometimes faults thousands of pages in
again (2 of 6 processes embedding 600 texts), against 24k-1.1M per run without the settings.

The setting is process-wide and raises resident memory to the peak of what the process has used, which it keeps.
Only a caller that asks applies it: `minibt.embed(..., keep_memory=True)` and `minibt.serve.app(...,
keep_memory=True)` (both default False), and the `minibt embed` and `minibt serve` commands, whose processes are
theirs. Other C libraries: nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt parameters, glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 << 20                   # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
_applied: bool | None = None


def _glibc():
    """The C library when it is glibc (mallopt / malloc_trim are glibc's), else None."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Blocks below 32 MiB come from the heap, and the heap is never trimmed. Returns whether it is in effect."""
    global _applied
    if _applied is None:
        libc = _glibc()
        _applied = libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                                              and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def release_freed_memory() -> bool:
    """Hand memory that is free inside glibc's heap back to the OS (malloc_trim(0)); the loader calls it after
    quantizing, whose freed float matrices and temporaries would otherwise stay resident. Returns whether it ran."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
