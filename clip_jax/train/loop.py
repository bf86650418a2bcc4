"""The one training loop: steps a compiled train step over batches to a last step, with the
trainer's guarantees for every caller (the trainer, the few-shot adaptations):

* the non-finite guard: a streak of max_nonfinite_steps steps whose loss or gradient was not
  finite stops the run, checked one step behind (the host never waits on the step it just
  started), and a checkpoint is written only of finite params;
* checkpoints on the manager's cadence, at the last step, and on SIGTERM (PreemptionNotice),
  which then ends the loop; an input that stalls under SIGTERM keeps the steps taken;
* an error lets a save in flight complete: no half-written checkpoint.

Resuming is the caller's (clip_jax.train.checkpoint.restore_latest_good onto its own state): the
loop starts from the state's step and the batches' position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import jax

from clip_jax.input.pipeline import InputInterrupted
from clip_jax.train import checkpoint
from clip_jax.train.step import params_are_finite


class NonFiniteError(RuntimeError):
    pass


class PreemptionNotice:
    """SIGTERM (a preemption notice, scancel, Ctrl-C's polite cousin) -> checkpoint and exit.

    Several processes must stop at the same step, or the rest wait in a collective forever:
    there JAX's preemption sync manager (started by jax.distributed.initialize) catches
    SIGTERM and agrees on the step. A single process keeps a flag set by its own handler.
    """

    def __init__(self):
        import signal
        import threading

        self._flag = False
        self._previous = None
        self._synced = jax.distributed.is_initialized()
        if not self._synced and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._notice)

    def _notice(self, signum, frame):
        self._flag = True

    def noticed(self) -> bool:
        """Whether this process's own handler has seen SIGTERM (a single process; several agree on
        a step through reached)."""
        return self._flag

    def reached(self, step: int) -> bool:
        if self._synced:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def restore(self):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def check_streak(step: int, metrics, max_nonfinite_steps: int, advice: str) -> None:
    """Stop after max_nonfinite_steps steps in a row whose loss or gradient was not finite."""
    in_a_row = int(metrics["skipped_in_a_row"])
    if in_a_row >= max_nonfinite_steps:
        raise NonFiniteError(
            f"stopping at step {step}: {in_a_row} steps in a row had a non-finite loss or gradient "
            f"(config.max_nonfinite_steps={max_nonfinite_steps}); none of them was applied and no "
            f"checkpoint holds them. {advice}"
        )


@dataclasses.dataclass
class Outcome:
    """How the loop ended: `stopped` None (the last step reached), 'preempted' (SIGTERM: checkpointed
    at `step`) or 'input' (SIGTERM while the input stalled: the latest checkpoint kept the steps taken)."""

    state: Any
    step: int
    stopped: Optional[str] = None


@dataclasses.dataclass
class Loop:
    """What stays fixed over a run: where checkpoints go, when to stop, what a checkpoint holds.

    saved: the part of the state a checkpoint holds (the adaptations leave the frozen towers out);
    advice: the fix a non-finite streak's error names (the settings of the caller's config).
    """

    manager: Any  # an orbax CheckpointManager (clip_jax.train.checkpoint.make_manager)
    end: int
    preemption: PreemptionNotice
    max_nonfinite_steps: int
    advice: str = "Lower the learning rate, use dtype=float32, or check the data."
    saved: Callable[[Any], Any] = lambda state: state
    log: Callable[[str], None] = print

    def run(self, state, batches: Iterator, step_fn_at: Callable[[int, Any], tuple[Callable, Any]],
            after_step: Optional[Callable[[int, Any, Any], None]] = None) -> Outcome:
        """Step from state.step to `end`.

        batches: global batches from the state's position, with .state() (their position for a
        checkpoint: a list of InputStates, or None where the step itself is the position);
        step_fn_at(step, state) -> (the compiled step for `step`, the state it takes): a caller's
        phases change the step and the optimizer here;
        after_step(step, metrics, state): the caller's logging, after each step, before its checkpoint.
        """
        manager, step, previous = self.manager, int(state.step), None

        def save(step: int, metrics) -> None:
            check_streak(step, metrics, self.max_nonfinite_steps, self.advice)
            kept = self.saved(state)
            # The step guards loss and gradient; an update that overflows is caught here.
            if not bool(params_are_finite(kept.params)):
                raise NonFiniteError(f"step {step}: parameters are not finite; not writing a checkpoint")
            checkpoint.save(manager, step, kept, batches.state(), force=True, log=self.log)

        try:
            while step < self.end:
                step_fn, state = step_fn_at(step, state)
                try:
                    batch = next(batches)
                except InputInterrupted:  # SIGTERM while the input stalls: the steps taken are kept
                    if previous is not None and step not in manager.all_steps():
                        save(*previous)
                    checkpoint.finish(manager)
                    return Outcome(state, step, "input")
                state, metrics = step_fn(state, batch)
                step += 1
                if previous is not None:  # one step behind, so the host never waits on the step it just started
                    check_streak(*previous, self.max_nonfinite_steps, self.advice)
                previous = (step, metrics)
                if after_step is not None:
                    after_step(step, metrics, state)
                preempted = self.preemption.reached(step)
                if step == self.end or preempted or manager.should_save(step):
                    save(step, metrics)
                if preempted:
                    checkpoint.finish(manager)
                    return Outcome(state, step, "preempted")
            if previous is not None:
                check_streak(*previous, self.max_nonfinite_steps, self.advice)
            checkpoint.finish(manager)
            return Outcome(state, step)
        except BaseException:  # an error, too, lets a save in flight complete: no half-written checkpoint
            try:
                manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001  (the save's own fault; the error in flight says more)
                self.log(f"the checkpoint in flight was not completed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}")
            raise
