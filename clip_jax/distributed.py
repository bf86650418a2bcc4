"""Start the multi-process runtime where the environment asks for it, before jax is used.

Explicit: CLIP_JAX_COORDINATOR=host:port, CLIP_JAX_NUM_PROCESSES, CLIP_JAX_PROCESS_ID (what
launch/local_multiprocess.sh sets). On CPU, collectives across processes go through gloo.
Without those variables this is a no-op: one process.
"""

from __future__ import annotations

import os

import jax


def initialize() -> None:
    coordinator = os.environ.get("CLIP_JAX_COORDINATOR")
    if not coordinator:
        return
    try:
        num_processes = int(os.environ["CLIP_JAX_NUM_PROCESSES"])
        process_id = int(os.environ["CLIP_JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise ValueError(
            "CLIP_JAX_COORDINATOR is set, so CLIP_JAX_NUM_PROCESSES and CLIP_JAX_PROCESS_ID must be integers too"
        ) from e
    if not 0 <= process_id < num_processes:
        raise ValueError(f"CLIP_JAX_PROCESS_ID={process_id} not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
