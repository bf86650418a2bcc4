"""Orbax checkpoints: the train state (any pytree, restored onto any mesh) and the input position.

One CheckpointManager per run, items:
  'state': the train state (params, optimizer state, step, rng), StandardSave/Restore, so a
           checkpoint written on one mesh restores onto another given target shardings;
  'input': the InputState of every data stream of the job (a few integers each), gathered
           from all processes into one JSON list in stream order; a job with the same
           stream count resumes from it on any process count that divides it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

from clip_jax.input.pipeline import InputState
from clip_jax.parallel import distributed

# Replica-parallel saving splits each replicated array over its replicas, so each writes a
# part: worth it for large arrays on many hosts, but for small ones the slicing (a jax op
# per array per device) costs far more than the write. Only arrays above this size are split.
_MIN_BYTES_TO_SPLIT = 64 << 20
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_BYTES_TO_SPLIT), override=True
)


def make_manager(directory: str, keep: int = 3, save_every: int = 1, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save, create=True
    )
    if "://" not in directory:  # local paths absolute; gs:// and the like as they are
        directory = os.path.abspath(directory)
    return ocp.CheckpointManager(directory, options=options)


def _gather_input_states(states: Optional[Sequence[InputState]]) -> list[dict]:
    """The InputStates of every process's streams, concatenated in process order (= stream order).

    All processes must call this: with several it is a collective.
    """
    mine = [s.to_dict() for s in states or []]
    if jax.process_count() == 1:
        return mine
    import json

    gathered = distributed.exchange("input_states", json.dumps(mine).encode())
    return [s for row in gathered for s in json.loads(row.decode())]


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full, read-only or removed workdir): the message
    names the cause, the last complete checkpoint and the fix."""


def save(manager: ocp.CheckpointManager, step: int, train_state: Any,
         input_states: Optional[Sequence[InputState]] = None,
         force: bool = False, log=print) -> bool:
    """Save (asynchronously) if the manager's interval says so, or `force`. Returns whether it saved.
    A filesystem fault (here or in the previous save, still being written) is a CheckpointWriteError."""
    if not force and not manager.should_save(step):
        return False  # before the gather: on a pod it is a collective, not to run every step
    finish(manager)  # the previous save's fault, if any, first (it has had a checkpoint interval to end)
    _check_present(manager, log)
    items = {"state": ocp.args.StandardSave(train_state),
             "input": ocp.args.JsonSave(_gather_input_states(input_states))}
    try:
        return manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise ValueError, OSError, ...)
        _reraise(_write_error(manager, step, e), e)


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the save in flight; a filesystem fault in it is a CheckpointWriteError."""
    in_flight = manager.latest_step()
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        _reraise(_write_error(manager, in_flight, e), e)


def _reraise(error: Exception, original: Exception):
    """`error` raised from `original`, or `original` as it is where they are the same."""
    if error is original:
        raise original
    raise error from original


def _write_error(manager, step: Optional[int], e: Exception) -> Exception:
    """A CheckpointWriteError for a known filesystem fault, else `e` itself."""
    from clip_jax.train.workdir import filesystem_fault

    fault = filesystem_fault(e)
    if fault is None:
        return e
    cause, fix = fault
    manager.reload()  # what is complete on disk now (a failed save leaves only a *-tmp folder)
    done = [s for s in manager.all_steps() if s != step]
    last = (f"The last complete checkpoint, step {max(done)}, is untouched: the same command resumes from it "
            "once the fault is fixed." if done else "No checkpoint was completed.")
    which = f"step {step}'s checkpoint" if step is not None else "a checkpoint"
    return CheckpointWriteError(f"could not write {which} in {manager.directory}: {cause}. {last} To fix: {fix}.")


def _check_present(manager: ocp.CheckpointManager, log) -> None:
    """A checkpoint the manager wrote that has gone from disk (its folder removed under the run):
    said, and the manager re-read, so this save goes on to a complete checkpoint at once."""
    latest = manager.latest_step()
    directory = str(manager.directory)
    # One process only: with several, process 0 finalizes each step's folder after the others have
    # returned from the save, and a re-read on one process alone would break Orbax's barriers.
    if latest is None or "://" in directory or jax.process_count() > 1 or \
            os.path.exists(os.path.join(directory, str(latest))):
        return
    log(f"warning: checkpoint {latest} has gone from {directory} (its folder was removed or changed under the "
        "running job); writing the current step's checkpoint now")
    manager.reload()


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None):
    """(train_state, [InputState of every data stream] or None, step), onto the shardings of `abstract_state`.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with .sharding (e.g. from jax.eval_shape
    plus the target mesh's shardings): this is what lets an 8-device checkpoint load on 4.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    read = lambda target: manager.restore(step, args=ocp.args.Composite(  # noqa: E731
        state=ocp.args.StandardRestore(target), input=ocp.args.JsonRestore()))
    try:
        out = read(abstract_state)
        state = out["state"]
    except ValueError as e:
        # A train state written before the state held a moving average has no 'ema' entry: read it without
        # one where this run keeps none (its 'ema' is {}).
        if getattr(abstract_state, "ema", None) != {} or "tree structures do not match" not in str(e):
            raise
        fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
        out = read({k: v for k, v in fields.items() if k != "ema"})
        state = abstract_state.replace(**out["state"])
    inputs = [InputState.from_dict(s) for s in out["input"] or []]
    return state, inputs or None, step


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: Any, log=print):
    """Restore the newest checkpoint that reads back whole; (state, input states, step), or None if none exist.
    `abstract_state`: the state's shapes and shardings, or a function of the step giving them.

    A checkpoint that fails to read (truncated or corrupt files, missing items) is reported
    by path and renamed to STEP.unreadable (kept for inspection, out of the manager's way, so
    the run can save that step again), and the previous one is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore(manager, abstract_state(step) if callable(abstract_state) else abstract_state, step)
        except Exception as e:  # orbax / tensorstore raise many types for damaged files
            path = str(epath.Path(manager.directory) / str(step))
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full")[0][:300]
            log(f"checkpoint {path} is unreadable ({type(e).__name__}: {reason}); "
                f"moved to {path}.unreadable, trying the previous one")
            if jax.process_index() == 0:
                epath.Path(path).rename(_free_name(path + ".unreadable"))
            distributed.barrier(f"clip_jax/unreadable_checkpoint/{step}")
            manager.reload()
    return None


def _free_name(path: str) -> str:
    candidate, n = path, 1
    while epath.Path(candidate).exists():
        candidate, n = f"{path}.{n}", n + 1
    return candidate
