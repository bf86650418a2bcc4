"""Host memory reuse for the CPU backend: freed buffers stay in the process for the next step.

XLA:CPU allocates each step's temporaries (gigabytes for a ViT-B step) through malloc. By
default glibc serves large blocks with fresh mmap()s and hands them back on free, so every
step first-touches its temporaries again: 1.07 million page faults and 3.6-4.8 s of kernel
time per ViT-B/32 training step (batch 32) on a 2-core machine. Telling glibc never to mmap, never to
trim the heap, and to keep one arena (XLA allocates from many threads; other arenas' heaps
are mmap()ed too) makes a step reuse the memory of the step before: no page faults after
the first steps. The price is that the process keeps its peak heap until it exits, which is
what a training or evaluation process wants anyway.

That is not always enough. glibc's heap fragments: a small block carved out of a freed
multi-gigabyte temporary leaves it too small for the next step's, so the heap grows by the
temporaries' size (2.9 GiB for ViT-B/32 batch 32) every step or two and first-touches it
again. In 3 of 5 ViT-B/32 runs on a 2-core Zen 5 host (2 of 5 on another machine) it came
back: 128,000-385,000 page faults, 1.1-4.6 s of kernel time and up to 60% more time per step.
tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4; what TPU VMs preload for JAX) keeps freed
spans per size and showed 47-364 faults a step in every run. So the entry points restart
themselves once with tcmalloc preloaded where it is installed (`prefer_tcmalloc`), and
fall back to the glibc settings where it is not.

Called by the command-line entry points (train, evaluate, benchmark), never on import: a
program that embeds clip_jax keeps its own allocator settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
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


# Where Debian/Ubuntu (libtcmalloc-minimal4, google-perftools) and Fedora (gperftools-libs) put it.
TCMALLOC_GLOBS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*-linux-gnu/libtcmalloc.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc.so.4")
_REEXEC_MARK = "CLIP_JAX_TCMALLOC_REEXEC"  # set in the restarted process: never restart twice


def find_tcmalloc() -> str | None:
    """tcmalloc's shared library: CLIP_JAX_TCMALLOC if it names a file, else the first installed one."""
    chosen = os.environ.get("CLIP_JAX_TCMALLOC", "")
    if chosen and chosen != "0":
        if not os.path.isfile(chosen):
            raise FileNotFoundError(f"CLIP_JAX_TCMALLOC={chosen!r} is not a file: point it at libtcmalloc*.so, "
                                    "or set it to 0 to keep glibc's malloc")
        return chosen
    for pattern in TCMALLOC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def allocator() -> str:
    """'tcmalloc' where this process runs with it (preloaded), else 'glibc' (or what else the platform has)."""
    try:
        with open("/proc/self/maps") as maps:
            if "tcmalloc" in maps.read():
                return "tcmalloc"
    except OSError:
        return "unknown"
    return "glibc"


def prefer_tcmalloc(module: str) -> None:
    """Restart `python -m module ...` (same pid, arguments and environment) with tcmalloc preloaded.

    Only when JAX will compute on the CPU, tcmalloc is installed and not already loaded, and
    CLIP_JAX_TCMALLOC is not 0. Call it first thing in the module's `__main__` block, before
    any work: the process is replaced.
    """
    if (not sys.platform.startswith("linux") or os.environ.get("CLIP_JAX_TCMALLOC") == "0"
            or os.environ.get(_REEXEC_MARK) or allocator() == "tcmalloc" or not cpu_backend_expected()):
        return
    path = find_tcmalloc()
    if path is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    env = dict(os.environ, LD_PRELOAD=f"{path}:{preload}" if preload else path, **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


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


if __name__ == "__main__":  # python -m clip_jax.cpu.allocator: the allocator the entry points end up with
    prefer_tcmalloc("clip_jax.cpu.allocator")
    print(f"allocator: {allocator()}")
