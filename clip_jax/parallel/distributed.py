"""Start the multi-process runtime where the environment asks for it, before jax is used.

In order of precedence (`plan` decides, from the environment alone):

1. Explicit: CLIP_JAX_COORDINATOR=host:port, CLIP_JAX_NUM_PROCESSES, CLIP_JAX_PROCESS_ID
   (launch/local_multiprocess.sh sets them). On CPU, collectives go through gloo.
2. CLIP_JAX_DISTRIBUTED=0: one process, whatever else is set. =1: jax.distributed.initialize()
   with JAX's own cluster detection (Cloud TPU pods, SLURM, Open MPI, ...); the TPU launch
   script sets it on every worker.
3. A SLURM job step with more than one task (srun inside sbatch): JAX's SLURM detection.
4. A Cloud TPU VM that is one worker of several (TPU_WORKER_HOSTNAMES lists more than one).
Otherwise one process.
"""

from __future__ import annotations

import itertools
import os
from typing import Mapping, Optional

import jax
import numpy as np


def plan(environ: Mapping[str, str]) -> Optional[dict]:
    """The keyword arguments for jax.distributed.initialize, or None for a single process."""
    coordinator = environ.get("CLIP_JAX_COORDINATOR")
    if coordinator:
        try:
            num_processes = int(environ["CLIP_JAX_NUM_PROCESSES"])
            process_id = int(environ["CLIP_JAX_PROCESS_ID"])
        except (KeyError, ValueError) as e:
            raise ValueError(
                "CLIP_JAX_COORDINATOR is set, so CLIP_JAX_NUM_PROCESSES and CLIP_JAX_PROCESS_ID must be integers too"
            ) from e
        if not 0 <= process_id < num_processes:
            raise ValueError(f"CLIP_JAX_PROCESS_ID={process_id} not in [0, {num_processes})")
        return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    switch = environ.get("CLIP_JAX_DISTRIBUTED", "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return None
    if switch in ("1", "true", "yes", "on", "auto"):
        return {}
    if switch:
        raise ValueError(f"CLIP_JAX_DISTRIBUTED={switch!r}: use 1 (detect the cluster) or 0 (one process)")
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return {}
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return {}
    return None


def initialize(environ: Optional[Mapping[str, str]] = None) -> bool:
    """jax.distributed.initialize as `plan` says; True when several processes were started."""
    kwargs = plan(os.environ if environ is None else environ)
    if kwargs is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
    jax.distributed.initialize(**kwargs)
    _orbax_barriers_through_coordinator()
    return True


def _orbax_barriers_through_coordinator() -> None:
    """Orbax's checkpoint barriers wait at the coordination service (as `barrier` does) instead of
    meeting at a collective, which gloo abandons after 30 s when one process is slower under load."""
    from absl import flags
    from orbax.checkpoint._src.multihost import multihost  # noqa: F401  (defines the flag)

    name = "experimental_orbax_use_distributed_barrier"
    if name in flags.FLAGS:  # a later orbax may drop the experiment; its default is then its own
        flags.FLAGS[name].parse("true")


_barriers = itertools.count()  # every process makes the same calls in the same order: names match


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process reaches `name` (the coordination service's barrier, not a collective).

    A collective is no barrier here: on the CPU, gloo gives a process 30 s (fixed) to meet its
    peers at the first collective, and compiles differ by more than that (one process may hit the
    persistent compile cache while another compiles under load).
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost  # the same client jax.distributed.initialize started

    multihost.get_jax_distributed_client().wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def exchange(name: str, payload: bytes, timeout_s: int = 3600) -> list[bytes]:
    """Every process's `payload`, in process order, through the coordination service's key-value
    store (no collective, so no 30 s gloo deadline); every process calls it with the same `name`."""
    if jax.process_count() == 1:
        return [payload]
    from orbax.checkpoint import multihost

    client = multihost.get_jax_distributed_client()
    key = f"clip_jax/exchange/{name}/{next(_barriers)}"
    client.key_value_set_bytes(f"{key}/{jax.process_index()}", payload)
    return [client.blocking_key_value_get_bytes(f"{key}/{i}", timeout_s * 1000) for i in range(jax.process_count())]


def allgather(tree):
    """A numpy copy of a pytree of (possibly multi-process) arrays on every process: the tiled
    multihost_utils.process_allgather, entered once every process has arrived (see `barrier`)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    barrier(f"clip_jax/allgather/{next(_barriers)}")
    return multihost_utils.process_allgather(tree, tiled=True)


def compile_together(jitted, name: str):
    """`jitted` (a jax.jit function) that, with several processes, compiles each new input signature
    ahead of time and waits for every process to have compiled it before the first run, so that no
    process reaches a collective while another still compiles. The compiled programs live as long
    as the returned function."""
    if jax.process_count() == 1:
        return jitted
    compiled = {}

    def call(*args):
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (treedef,) + tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None))
                                 for x in leaves)
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile()
            barrier(f"{name}/compiled/{next(_barriers)}")
        return compiled[key](*args)

    return call
