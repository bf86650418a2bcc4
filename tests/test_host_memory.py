"""The CPU launchers' allocator settings keep freed host memory in the process: a freed large block
is reused, not mapped (and faulted in) again. Run in subprocesses: the settings are process-wide."""

import os
import subprocess
import sys

import pytest

from clip_jax.cpu import allocator as host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
print(host_memory.allocator(), faults() - before)
"""


def launcher_env(**env) -> dict:
    """The environment launch/lib.sh's cpu_allocator_env gives a CPU training process."""
    out = subprocess.run(["bash", "-c", "source launch/lib.sh && cpu_allocator_env"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, **env})
    return dict(line.split("=", 1) for line in out.stdout.split())


def run(*args, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "CLIP_JAX_TCMALLOC")) and
               k != "LD_PRELOAD"}
    environ.update(env or {})
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environ)
    assert out.returncode == 0, out.stderr[-2000:]
    allocator, faults = out.stdout.split()[-2:]
    return allocator, int(faults)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_launchers_glibc_settings_and_mallopt_reuse_freed_memory():
    allocator, default = run("-c", PROGRAM, "0")
    assert allocator == "glibc" and default > 1000  # each block is mapped afresh
    assert run("-c", PROGRAM, "1")[1] < 10  # mallopt, the benchmark's --keep_freed_memory
    glibc = launcher_env(CLIP_JAX_TCMALLOC="0")
    assert set(glibc) == {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"}
    assert run("-c", PROGRAM, "0", env=glibc)[1] < 10


def test_off_switch(monkeypatch):
    monkeypatch.setenv("CLIP_JAX_KEEP_FREED_MEMORY", "0")
    assert host_memory.keep_freed_memory_on_cpu() is False


TCMALLOC = launcher_env().get("LD_PRELOAD") if sys.platform.startswith("linux") else None


@pytest.mark.slow
@pytest.mark.skipif(not TCMALLOC, reason="tcmalloc is not installed (apt install libtcmalloc-minimal4)")
def test_the_launcher_preloads_tcmalloc_which_reuses_freed_memory():
    allocator, faults = run("-c", PROGRAM, "0", env={"LD_PRELOAD": TCMALLOC})
    assert allocator == "tcmalloc" and faults < 10
