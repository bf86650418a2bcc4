"""Host memory on the CPU backend: which allocator serves XLA:CPU's step temporaries.

XLA:CPU allocates each step's temporaries (gigabytes for a ViT-B step) through malloc. By
default glibc serves large blocks with fresh mmap()s and hands them back on free, so every
step first-touches its temporaries again (page faults and kernel time each step). tcmalloc
keeps freed spans per size and avoids it; so does glibc told never to mmap, never to trim
and to keep one arena. The launcher chooses (launch/lib.sh: cpu_allocator_env preloads
tcmalloc where installed, else sets glibc's MALLOC_* variables); `keep_freed_memory` is the
same glibc setting from Python, for the benchmark's --keep_freed_memory option. Figures are
in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt() parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Make glibc reuse freed host memory instead of returning it to the kernel.

    Returns True where it took effect (Linux with glibc), False elsewhere (macOS, musl), where
    it does nothing. Call it before the first large allocation: memory that is already mapped
    is not affected.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1: never trim (a step's temporaries exceed any int threshold)
    ok &= mallopt(_M_ARENA_MAX, 1) == 1
    return bool(ok)


def allocator() -> str:
    """'tcmalloc' where this process runs with it (preloaded), else 'glibc' (or what else the platform has)."""
    try:
        with open("/proc/self/maps") as maps:
            if "tcmalloc" in maps.read():
                return "tcmalloc"
    except OSError:
        return "unknown"
    return "glibc"


def cpu_backend_expected() -> bool:
    """Whether JAX will compute on the CPU, told without starting a backend: JAX_PLATFORMS (or
    jax_platforms) names cpu first, or no accelerator plugin (CUDA/ROCm, libtpu) is installed."""
    import importlib.metadata
    import importlib.util

    import jax

    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))


def keep_freed_memory_on_cpu() -> bool:
    """keep_freed_memory() when JAX will compute on the CPU (the host's memory is the devices').

    Call it first thing, before JAX starts its backend: glibc's arena setting only binds threads
    that have not allocated yet. CLIP_JAX_KEEP_FREED_MEMORY=0 turns it off. Under tcmalloc it
    is not needed and returns False (tcmalloc keeps freed memory itself).
    """
    if (os.environ.get("CLIP_JAX_KEEP_FREED_MEMORY", "1") == "0" or allocator() == "tcmalloc"
            or not cpu_backend_expected()):
        return False
    return keep_freed_memory()
