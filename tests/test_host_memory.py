"""host_memory.keep_freed_memory: a freed large block is reused, not mapped (and faulted in) again.

Run in subprocesses: the setting is process-wide and must not leak into the test session."""

import subprocess
import sys

import pytest

from clip_jax.cpu import allocator as host_memory

PROGRAM = """
import resource, sys, numpy as np
from clip_jax.cpu import allocator as host_memory
if sys.argv[1] == "1":
    assert host_memory.keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # what a training step does with its temporaries: 2.4 GB, beyond any int-sized threshold
    a = np.empty(300_000_000)
    a[::512] = 1.0  # one write per 4 KiB page
    del a
step()
before = faults()
for _ in range(3):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    def faults(keep):
        out = subprocess.run([sys.executable, "-c", PROGRAM, keep], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, kept = faults("0"), faults("1")
    assert default > 1000  # each block is mapped afresh (even with 2 MiB huge pages: 1100 faults)
    assert kept < 10


def test_off_switch_and_other_backends(monkeypatch):
    monkeypatch.setenv("CLIP_JAX_KEEP_FREED_MEMORY", "0")
    assert host_memory.keep_freed_memory_on_cpu() is False


def _run(*args, env=None):
    import os

    environ = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_JAX_TCMALLOC") and k != "LD_PRELOAD"}
    environ.update(env or {})
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environ)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


needs_tcmalloc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or host_memory.find_tcmalloc() is None,
    reason="tcmalloc is not installed (apt install libtcmalloc-minimal4)")


@needs_tcmalloc
def test_entry_points_restart_once_with_tcmalloc_unless_told_not_to():
    env = {"JAX_PLATFORMS": "cpu"}
    assert _run("-m", "clip_jax.cpu.allocator", env=env).split() == ["allocator:", "tcmalloc"]
    assert _run("-m", "clip_jax.cpu.allocator", env={**env, "CLIP_JAX_TCMALLOC": "0"}).split() == ["allocator:", "glibc"]
    # Not on an accelerator backend: there the host's allocator is not the devices'.
    assert _run("-m", "clip_jax.cpu.allocator", env={"JAX_PLATFORMS": "tpu"}).split() == ["allocator:", "glibc"]
    # The benchmark reports what it ran with, and the arguments survive the restart.
    out = _run("-m", "clip_jax.benchmark", "matmul", "--n=64", env=env)
    assert "matmul: 64^3 float32" in out


def test_a_bad_tcmalloc_path_is_named(monkeypatch):
    monkeypatch.setenv("CLIP_JAX_TCMALLOC", "/nonexistent/libtcmalloc.so")
    with pytest.raises(FileNotFoundError, match="CLIP_JAX_TCMALLOC='/nonexistent/libtcmalloc.so' is not a file"):
        host_memory.find_tcmalloc()


@needs_tcmalloc
def test_tcmalloc_reuses_freed_memory_without_page_faults():
    faults = int(_run("-c", PROGRAM, "0", env={"LD_PRELOAD": host_memory.find_tcmalloc()}).split()[-1])
    assert faults < 10
