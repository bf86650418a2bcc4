"""TensorFlow stays off the accelerators and, on a host without an NVIDIA driver, prints no CUDA errors."""

import os
import subprocess
import sys

import pytest

from clip_jax.input.tf_runtime import has_nvidia_driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = """
import clip_jax  # first, as every entry point imports it
from clip_jax.input.tf_runtime import import_tensorflow
tf = import_tensorflow()
tf.data.Dataset.range(3).map(lambda x: x + 1).reduce(tf.constant(0, tf.int64), lambda a, b: a + b).numpy()
print("visible GPUs:", len(tf.config.get_visible_devices("GPU")))
"""


def test_tensorflow_sees_no_gpu_and_a_cpu_host_prints_no_cuda_error():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "visible GPUs: 0" in done.stdout
    if has_nvidia_driver():
        pytest.skip("an NVIDIA driver is present: TensorFlow's CUDA probe may log")
    errors = [line for line in done.stderr.splitlines() if line.startswith("E0000") or "cuInit" in line]
    assert not errors, errors
