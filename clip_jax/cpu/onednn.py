"""XLA:CPU compile options for the training step, chosen per host.

XLA:CPU hands each matmul to a library. By default that is YNNPACK, which runs the dense
projections near the host's matmul peak but the attention cores (hundreds of tiny batched
matmuls) well below it: their fixed cost per matrix dominates. oneDNN's matmul
(`xla_cpu_use_onednn` with the "individual dot" fusion) runs those about twice as fast and the
dense shapes about as fast, so `onednn_dots="auto"` turns it on for float32 steps on one CPU
device where the CPU is Intel's, and off elsewhere (AMD hosts measured no gain beyond the noise;
bf16 and multi-device CPU steps were never measured). "on" forces it. Options are per compiled
program (jax.jit's `compiler_options`), never process-wide XLA_FLAGS, so evaluation and embedding
programs keep XLA's defaults. Figures and commands: docs/performance.md.

XLA cannot serialize a oneDNN call into the persistent compilation cache, so such a step is
compiled afresh on a restart. And XLA:CPU (jax 0.10.2) aborts the whole process when a program
with oneDNN calls is destroyed soon after its last run on a loaded machine ("object_pool.h:117
Check failed: available_.size() == num_created_" in ~OneDnnFusionThunk), so every program
compiled with these options is kept alive until the process exits (`keep_alive`; the train CLI
passes it as the trainer's `retain` hook).
"""

from __future__ import annotations

import functools
import platform
import warnings

ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
CHOICES = ("auto", "on", "off")


_KEPT = []  # programs compiled with oneDNN options: never destroyed (see the module docstring)


def is_onednn(compiler_options) -> bool:
    """Whether `compiler_options` (a dict or None) turn on XLA:CPU's oneDNN."""
    return bool(compiler_options) and bool(compiler_options.get("xla_cpu_use_onednn"))


def keep_alive(program, compiler_options):
    """`program` (a jax.jit function or a compiled executable), kept referenced until the process
    exits when `compiler_options` are oneDNN's, so that XLA never destroys it (see above)."""
    if is_onednn(compiler_options):
        _KEPT.append(program)
    return program


def has_onednn() -> bool:
    """Whether XLA:CPU has oneDNN on this machine (x86 builds only)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def matmul_libraries() -> dict:
    """The matmul libraries a CPU step may run on, by name, as compile options: XLA's default
    (YNNPACK), and oneDNN where XLA:CPU has it (x86). The CPU's MFU peak is the faster one."""
    libraries = {"default": {}}
    if has_onednn():
        libraries["onednn"] = dict(ONEDNN_DOTS)
    return libraries


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id ('GenuineIntel', 'AuthenticAMD', ...) on Linux; '' where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def check_choice(onednn_dots, where: str = "onednn_dots") -> str:
    """'auto' | 'on' | 'off' (also True/False/None), or a ValueError that names the fix."""
    if onednn_dots is None:
        return "auto"
    if isinstance(onednn_dots, bool):
        return "on" if onednn_dots else "off"
    if onednn_dots not in CHOICES:
        raise ValueError(f"{where}={onednn_dots!r}: use one of {', '.join(CHOICES)} "
                         "(auto: oneDNN matmuls on Intel CPUs only)")
    return onednn_dots


def use_onednn_dots(onednn_dots, platform_name: str, dtype: str = "float32", n_devices: int = 1) -> bool:
    """Whether a step compiled for `platform_name` ('cpu', 'gpu', 'tpu') over `n_devices` that
    computes in `dtype` takes oneDNN's matmuls."""
    choice = check_choice(onednn_dots)
    if platform_name != "cpu" or choice == "off":
        return False
    if choice == "on":
        return True
    import ml_dtypes  # noqa: F401  (jax's; it makes numpy read "bfloat16")
    import numpy as np

    # a name ('float32') or a dtype (jnp.float32), as create_model takes either
    return (cpu_vendor() == "GenuineIntel" and has_onednn() and np.dtype(dtype) == np.float32
            and n_devices == 1)


def step_compiler_options(onednn_dots, devices, dtype: str = "float32") -> dict:
    """The compile options for a training step on `devices` ({} off the CPU or where not wanted).
    Where they are oneDNN's, JAX's warning that the step cannot go in the persistent
    compilation cache is silenced: it is expected (see above) and would repeat every compile."""
    platform_name = devices[0].platform if devices else "cpu"
    if not use_onednn_dots(onednn_dots, platform_name, dtype, len(devices)):
        return {}
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry.*onednn")
    return dict(ONEDNN_DOTS)
