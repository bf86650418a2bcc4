"""Orbax checkpoints: the train state (any pytree, restored onto any mesh) and the input position.

One CheckpointManager per run, items:
  'state': the train state (params, optimizer state, step, rng), StandardSave/Restore, so a
           checkpoint written on one mesh restores onto another given target shardings;
  'input': the InputState of every process (a few integers each), gathered to one JSON
           list so that resuming with the same process count gives each host its position.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from clip_jax.input_pipeline import InputState


def make_manager(directory: str, keep: int = 3, save_every: int = 1, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _gather_input_states(state: Optional[InputState]) -> list[dict]:
    """Every process's InputState, in process order (all processes must call this)."""
    if jax.process_count() == 1:
        return [state.to_dict()] if state is not None else []
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    raw = json.dumps(state.to_dict() if state is not None else None).encode()
    buf = np.zeros(4096, np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    gathered = multihost_utils.process_allgather(buf)
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in np.asarray(gathered)]


def save(manager: ocp.CheckpointManager, step: int, train_state: Any, input_state: Optional[InputState] = None,
         force: bool = False) -> bool:
    """Save (asynchronously) if the manager's interval says so, or `force`. Returns whether it saved."""
    if not force and not manager.should_save(step):
        return False  # before the gather: on a pod it is a collective, not to run every step
    items = {"state": ocp.args.StandardSave(train_state), "input": ocp.args.JsonSave(_gather_input_states(input_state))}
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None):
    """(train_state, InputState of this process or None, step), onto the shardings of `abstract_state`.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with .sharding (e.g. from jax.eval_shape
    plus the target mesh's shardings): this is what lets an 8-device checkpoint load on 4.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                         input=ocp.args.JsonRestore()))
    inputs = out["input"] or []
    mine = None
    if inputs:
        if len(inputs) != jax.process_count():
            raise ValueError(
                f"checkpoint step {step} holds input positions of {len(inputs)} processes, this job has "
                f"{jax.process_count()}: resume with the same process count (the data order is per process)"
            )
        mine = InputState.from_dict(inputs[jax.process_index()])
    return out["state"], mine, step
