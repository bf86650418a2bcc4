import os
import sys

import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
sys.path.insert(0, FIXTURES)  # random_weights.py, shared with make_fixtures.py

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# triton (torch's GPU kernel compiler, which transformers' models reach through torch._dynamo)
# segfaults when loaded into a process that has TensorFlow; the CPU references never need it.
sys.modules.setdefault("triton", None)
# 8 simulated CPU devices for the mesh tests (set before jax is imported).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Programs compiled by one test are reused by the next that builds the same one (the
# trainer tests compile the same step several times: first run, restart, resume).
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "clip_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def config_of(name: str, *args):
    """configs/NAME.py's get_config(*args), read as the trainer's --config=configs/NAME.py reads it."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(root, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def torch_reference(code: str, **arrays):
    """Run `code` in a fresh Python with torch (the reference side of a test): the arrays are
    passed in as `inputs` (an npz's dict) and `outputs` (a dict the code fills) comes back.
    A separate process, as torch and TensorFlow in one process crash on some hosts."""
    import subprocess
    import sys
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/in.npz", **arrays)
        script = ("import numpy as np\ninputs = dict(np.load('in.npz'))\noutputs = {}\n" + code
                  + "\nnp.savez('out.npz', **outputs)\n")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return dict(np.load(f"{tmp}/out.npz"))


def reference(name: str, *, load: bool = True):
    """The module `name` of a test-only reference (torch, open_clip, cn_clip, transformers:
    tests/references.txt), imported where `load` (else only looked up, for a test that runs it in
    a subprocess). Where it is missing the test skips, but under CI=true it fails: CI installs the
    references, and a skipped reference check would pass there unseen."""
    import importlib
    import importlib.util

    import pytest

    if importlib.util.find_spec(name) is None:
        message = (f"{name} is not installed: it is a test-only reference; install the references as the README's "
                   "test command does (pip install -r tests/references.txt, then cn-clip with --no-deps)")
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return importlib.import_module(name) if load else None


# The embedded dataset at the smoke run's sizes (seed 0, 64 px), which the multiprocess, golden and
# full-disk tests all train on.
SMOKE_SIZES = {"train": 2560, "validation": 100, "test": 100}


def _shared_dir(tmp_path_factory, name: str):
    """A folder every xdist worker of this run sees (their own temp dirs share a parent), and a lock
    held while it is filled, so that the first worker writes it and the others wait for it."""
    import contextlib
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base

    @contextlib.contextmanager
    def locked():
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield root / name
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    return locked()



@pytest.fixture(scope="session")
def smoke_shapes(tmp_path_factory) -> str:
    """A cache_dir holding the smoke-sized embedded dataset, written once per test run, not once
    per test or per worker (10-20 s each on 2 cores)."""
    from clip_jax.input import shapes

    with _shared_dir(tmp_path_factory, "smoke_shapes") as path:
        shapes.ensure_shapes_dataset(str(path), seed=0, image_size=64, sizes=SMOKE_SIZES)
    return str(path)
