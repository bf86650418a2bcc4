"""Which environments start the multi-process runtime, and with what (clip_jax.parallel.distributed.plan)."""

import pytest

from clip_jax.parallel.distributed import plan


def test_explicit_coordinator():
    env = {"CLIP_JAX_COORDINATOR": "10.0.0.1:1234", "CLIP_JAX_NUM_PROCESSES": "4", "CLIP_JAX_PROCESS_ID": "3",
           "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # explicit wins over SLURM
    assert plan(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    with pytest.raises(ValueError, match="must be integers"):
        plan({"CLIP_JAX_COORDINATOR": "h:1", "CLIP_JAX_NUM_PROCESSES": "4"})
    with pytest.raises(ValueError, match=r"CLIP_JAX_PROCESS_ID=4 not in \[0, 4\)"):
        plan({"CLIP_JAX_COORDINATOR": "h:1", "CLIP_JAX_NUM_PROCESSES": "4", "CLIP_JAX_PROCESS_ID": "4"})


def test_cluster_detection():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "16"}
    assert plan(slurm) == {}  # JAX reads the SLURM variables itself
    assert plan({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) is None  # sbatch's own shell, not an srun task
    assert plan({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1,t1k-2,t1k-3"}) == {}  # a pod worker
    assert plan({"TPU_WORKER_HOSTNAMES": "t1k-0"}) is None  # a single-host TPU VM
    assert plan({"CLIP_JAX_DISTRIBUTED": "1"}) == {}
    assert plan({**slurm, "CLIP_JAX_DISTRIBUTED": "0"}) is None
    assert plan({}) is None
    with pytest.raises(ValueError, match="CLIP_JAX_DISTRIBUTED='maybe'"):
        plan({"CLIP_JAX_DISTRIBUTED": "maybe"})
