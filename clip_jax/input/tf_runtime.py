"""TensorFlow for the input pipeline only: kept off the accelerators, quiet on hosts without them.

TensorFlow would otherwise reserve GPU memory that JAX needs, and on a host without an NVIDIA
driver its CUDA probe logs an error line that means nothing there.
"""

from __future__ import annotations

import glob
import os
import sys


def has_nvidia_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def quiet_cuda_probe() -> None:
    """Before TensorFlow is imported: no CUDA error lines where no NVIDIA driver exists (its C++
    log's errors off, unless TF_CPP_MIN_LOG_LEVEL asks for more, at 0 or 1, to debug)."""
    if "tensorflow" not in sys.modules and not has_nvidia_driver():
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "") not in ("0", "1"):
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def import_tensorflow():
    """`tensorflow`, with its GPUs hidden (its ops run on the CPU; JAX owns the accelerators).
    clip_jax's own import has already quieted the CUDA probe (quiet_cuda_probe)."""
    import tensorflow as tf

    global _hidden
    if not _hidden:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow's runtime had started already: it saw the GPUs
            pass
        _hidden = True
    return tf


_hidden = False
