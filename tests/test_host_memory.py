"""host_memory.keep_freed_memory: a freed large block is reused, not mapped (and faulted in) again.

Run in subprocesses: the setting is process-wide and must not leak into the test session."""

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys, numpy as np
from clip_jax import host_memory
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
    from clip_jax import host_memory

    monkeypatch.setenv("CLIP_JAX_KEEP_FREED_MEMORY", "0")
    assert host_memory.keep_freed_memory_on_cpu() is False
