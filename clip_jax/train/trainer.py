"""The one trainer: any method of clip_jax.methods, from a config, on a mesh of every device.

A second run on the same workdir resumes from its latest checkpoint (params, optimizer
state, step, and every data stream's position), so it continues the same stream.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
from etils import epath

from clip_jax.config import check_ranges
from clip_jax.input.pipeline import DevicePrefetch, stream_count
from clip_jax.input.training import training_batches
from clip_jax.methods import METHODS
from clip_jax.parallel import distributed, sharding
from clip_jax.runs import evaluated_params
from clip_jax.tokenizers import tokenizer_for
from clip_jax.train import checkpoint
from clip_jax.train.build import build, model_from_config, phase_at, phase_of_checkpoint, phases_of
from clip_jax.train.loop import Loop, NonFiniteError, PreemptionNotice

__all__ = ["NonFiniteError", "PreemptionNotice", "train_and_evaluate", "validate", "write_run_config"]
from clip_jax.train.workdir import check_free_space, check_writable, lock


def _data_config(config) -> dict:
    return {k: v for k, v in config.data.items() if k not in ("train", "eval")}


def validate(config) -> None:
    """Bad configs fail here, before data is read or anything compiles."""
    check_ranges(config)
    for key in ("total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps", "accum_steps",
                "max_nonfinite_steps"):
        if int(config[key]) < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
    from clip_jax.evaluate.evaluator import parse_evals

    parse_evals(config.data.eval)  # syntax only; make_evaluator checks the datasets
    METHODS.get(config.method).check_config(config)  # an unknown name lists the known ones
    if config.optim.frozen and config.init_params != ".*" and not config.init_from:
        raise ValueError(f"config.optim.frozen={config.optim.frozen!r} with init_params={config.init_params!r} "
                         "locks weights that are never loaded: set --config.init_from=WEIGHTS")
    if not config.data.train:
        raise ValueError("config.data.train is empty: set a source, e.g. --config.data.train='tfrecord:/data/shards-*'")
    streams = stream_count(config.data, config.batch_size, jax.process_count())
    if config.batch_size % (config.accum_steps * streams):
        raise ValueError(f"config.batch_size={config.batch_size} does not split into accum_steps={config.accum_steps} "
                         f"microbatches: use a multiple of {config.accum_steps * streams}")


def make_evaluator(config):
    """The evaluations of config.data.eval, checked now (datasets, splits, class names), or None."""
    from clip_jax.evaluate.evaluator import Evaluator

    if not config.eval_every_steps or not config.data.eval:
        return None
    model_config = model_from_config(config).config
    return Evaluator(config.data.eval, _data_config(config), image_size=model_config.vision.image_size,
                     context_length=model_config.text.context_length, log=log)


def _evaluate(evaluator, encoder, method, state, config, workdir: str, step: int) -> dict:
    """Run every evaluation on the current params; per-class details go to workdir/eval/step_N.json."""
    from clip_jax.evaluate.evaluator import format_table

    encoder.variables = method.model_variables(evaluated_params(state.params, state.ema), state.model_state)
    start = time.perf_counter()
    metrics, details = evaluator.run(encoder, config.eval_batch_size)
    if jax.process_index() == 0:
        out = epath.Path(workdir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{step}.json").write_text(
            json.dumps({"step": step, "metrics": metrics, "details": details}, indent=1))
    log(format_table(metrics) + f"\n(step {step}, evaluated in {time.perf_counter() - start:.1f}s)")
    return metrics


# what a streak of non-finite steps asks of the config (clip_jax.train.loop.check_streak)
NONFINITE_ADVICE = "Lower optim.learning_rate, use dtype=float32, or check the data."


def _trim_metrics(path: epath.Path, last_step: int) -> None:
    """Drop rows past the step a run resumes from (written by a run that died after its last checkpoint)."""
    if jax.process_index() != 0 or not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if row.get("step", 0) <= last_step:
            keep.append(line + "\n")
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def write_run_config(workdir: str, config) -> None:
    """WORKDIR/config.json: what clip_jax.export / evaluate read to rebuild the model.

    Workdirs are local paths or gs:// (Cloud TPU): epath goes through tf.io.gfile there (and
    Orbax through TensorStore), so every workdir file here is written through epath.
    """
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (epath.Path(workdir) / "config.json").write_text(config.to_json(indent=2))


def training_input(config, model, method, input_states=None):
    """This process's training batches of `config`: the batch keys the method declares (Method.inputs),
    as the input makes them, from `input_states` (a checkpoint's) or the start."""
    return training_batches(method.inputs(), config, image_size=model.config.vision.image_size,
                            context_length=model.config.text.context_length, tokenizer=tokenizer_for(model.config.text),
                            process_index=jax.process_index(), process_count=jax.process_count(), state=input_states)


def train_and_evaluate(config, workdir: str, stop_at: int | None = None, compiler_options: dict | None = None,
                       retain: Callable[[Callable], Any] = lambda step_fn: step_fn) -> dict:
    """Train to config.total_steps (or stop, checkpointed, at step `stop_at`, as a preemption would).

    compiler_options: XLA options for the train step (a CPU entry point's oneDNN choice);
    retain: called with the compiled step, for an entry point that must keep it past the run.
    """
    started = time.perf_counter()
    validate(config)
    check_writable(workdir)
    held = lock(workdir) if jax.process_index() == 0 else None  # one run per workdir
    # SIGTERM is noticed from the start: during a restore or a compile it ends the run once they finish.
    preemption = PreemptionNotice()
    try:
        return _train_and_evaluate(config, workdir, stop_at, compiler_options, retain, preemption, started)
    finally:
        preemption.restore()
        if held is not None:
            held.release()


def _train_and_evaluate(config, workdir: str, stop_at, compiler_options, retain, preemption, started) -> dict:
    write_run_config(workdir, config)
    mesh = sharding.make_mesh(dict(config.mesh))
    sharding.check_batch(config.batch_size // config.accum_steps, mesh)
    evaluator = make_evaluator(config)  # a missing eval dataset fails here, before any compile
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints,
                                      config.checkpoint_every_steps)
    options = dict(compiler_options=compiler_options, gather_by_sum=sharding.slow_all_gather(mesh), log=log)
    saved = manager.all_steps()
    # A run that resumes restores its checkpoint: the init_from weights are read only to start afresh.
    phase = phase_of_checkpoint(phases_of(config), max(saved)) if saved else 0
    run = build(config, mesh, phase=phase, init_weights=not saved, **options)
    state = run.state
    input_states = None
    if saved:
        restored = checkpoint.restore_latest_good(manager, lambda step: _abstract_state(config, mesh, run, step), log)
        if restored is None:
            log(f"no readable checkpoint in {manager.directory}: starting from step 0")
            run = build(config, mesh, **options)
            state = run.state
        else:
            state, input_states, step = restored
            phase = phase_of_checkpoint(run.phases, step)
            if phase not in run.step_fns:  # an unreadable newer checkpoint sent us across a fresh optimizer's start
                run = build(config, mesh, phase=phase, variables=_variables(state), **options)
            log(f"resumed from step {step} in {workdir}")
    if jax.process_index() == 0:
        checkpoint_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
        warning = check_free_space(workdir, checkpoint_bytes, config.keep_checkpoints)
        if warning:
            log(warning)
    model = run.model
    metrics_path = epath.Path(workdir) / "metrics.jsonl"
    _trim_metrics(metrics_path, int(state.step))
    metrics_file = batches = None
    try:
        pipe = training_input(config, model, run.method, input_states)
        step_fns = _compiled(run, retain)
        batches = DevicePrefetch(pipe, run.batch_sharding, config.prefetch_batches, keys=run.method.batch_keys,
                                 interrupted=preemption.noticed)
        encoder = None
        if evaluator:
            from clip_jax.evaluate.features import Encoder

            encoder = Encoder(model, None, mesh, predictions=run.method.predictions())
        metrics_file = metrics_path.open("a") if jax.process_index() == 0 else None
        writer = _summary_writer(workdir)
        current = phase_of_checkpoint(run.phases, int(state.step))  # the phase that took the last step
        last = {}
        window = {"start": time.perf_counter(), "images": 0}

        def step_fn_at(step: int, state):
            nonlocal run, step_fns, current
            phase = phase_at(run.phases, step)
            if phase != current:  # the method's next phase begins here
                current = phase
                log(f"step {step}: phase {run.phases[phase].name!r} begins: {run.phases[phase].note}")
                if phase not in step_fns:  # with a fresh optimizer state
                    run, state = _fresh_optimizer(config, mesh, state, phase, options)
                    step_fns = _compiled(run, retain)
            return step_fns[phase], state

        def after_step(step: int, metrics, state) -> None:
            nonlocal last
            window["images"] += config.batch_size
            evaluates = evaluator and (step % config.eval_every_steps == 0 or step == config.total_steps)
            # an evaluation step logs too, so that eval_every_steps need not be a multiple of log_every_steps
            if step % config.log_every_steps and step != config.total_steps and not evaluates:
                return
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - window["start"]
            row = _log_row(step, metrics, run.learning_rate(step), window["images"] / elapsed,
                           sum(pipe.bad_records().values()))
            # what the input's ops dropped or clipped, by rule, over this process's records (boxes/invalid, ...)
            row.update(getattr(pipe, "tallies", dict)())
            row["elapsed_s"] = time.perf_counter() - started  # of this process, data and compiles included
            eta = (config.total_steps - step) * elapsed / (window["images"] / config.batch_size)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                + f" eta={_duration(eta)}")
            if evaluates:
                row.update(_evaluate(evaluator, encoder, run.method, state, config, workdir, step))
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if writer is not None:
                _write_summaries(writer, step, row)
            last = row
            window.update(start=time.perf_counter(), images=0)

        loop = Loop(manager, min(config.total_steps, stop_at or config.total_steps), preemption,
                    config.max_nonfinite_steps, advice=NONFINITE_ADVICE, log=log)
        outcome = loop.run(state, batches, step_fn_at, after_step)
        state = outcome.state
        if outcome.stopped == "input":
            kept = manager.latest_step()
            log(f"preemption notice (SIGTERM) while waiting for input at step {outcome.step}; exiting. "
                + (f"The latest checkpoint is step {kept} in {workdir}." if kept is not None else
                   "No checkpoint was written yet."))
            return last
        if outcome.stopped == "preempted":
            log(f"preemption notice (SIGTERM): saved a checkpoint at step {outcome.step} in {workdir}; exiting. "
                f"The same command resumes from it.")
            return last
        if config.summary_png and jax.process_index() == 0:
            _write_summary(run, state, config, workdir)
    finally:  # the loop itself lets a save in flight complete on an error
        if batches is not None:
            batches.close()
        if metrics_file:
            metrics_file.close()
    return last


def _variables(state) -> dict:
    return {"params": state.params, **(state.model_state or {})}


def _abstract_state(config, mesh, run, step: int):
    """The shapes and shardings of a checkpoint after `step` steps: this run's, or those of the phase
    with the optimizer state it holds."""
    phase = phase_of_checkpoint(run.phases, step)
    if phase in run.step_fns:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      run.state)
    return build(config, mesh, phase=phase, abstract=True).state


def _compiled(run, retain) -> dict:
    """{phase: its step}, each compiled on every process before it first runs."""
    return {i: retain(distributed.compile_together(fn, f"train_step_{i}_{run.phases[i].name}"))
            for i, fn in run.step_fns.items()}


def _fresh_optimizer(config, mesh, state, phase: int, options: dict):
    """(the run of phase `phase`, its state): a fresh optimizer state and schedule from the current
    params; the step and the skipped-step counts carry on. The same from a checkpoint as straight through."""
    run = build(config, mesh, phase=phase, variables=_variables(state), **options)
    return run, run.state.replace(step=state.step, skipped=state.skipped, skipped_in_a_row=state.skipped_in_a_row)


def _write_summary(run, state, config, workdir: str) -> None:
    """WORKDIR/summary.png: the run's curves, and where the training source offers examples to show
    (clip_jax.input.catalog), a grid of zero-shot predictions."""
    from clip_jax.evaluate import summary

    path = os.path.join(workdir, "summary.png")
    try:
        examples = None
        preview = summary.preview_of(config.data.train, _data_config(config)) if jax.process_count() == 1 else None
        if preview:
            variables = jax.device_get(run.method.model_variables(evaluated_params(state.params, state.ema),
                                                                  state.model_state))
            predictions = run.method.predictions()
            if "audio_embeds" in predictions and preview.clips:  # a model that hears: its clips' predictions
                examples = summary.audio_zero_shot_predictions(run.model, variables, preview, predictions,
                                                               int(config.data.audio_samples))
                preview = dataclasses.replace(preview, title="test clips (spectrograms, 0-4 kHz)")
            else:
                examples = summary.zero_shot_predictions(run.model, variables, preview, predictions)
        rows = summary.read_rows(os.path.join(workdir, "metrics.jsonl"))
        title = f"{config.model} on {config.data.train}, step {rows[-1]['step']}"
        summary.write_summary(path, rows, examples, title=title, grid_title=preview.title if preview else "")
    except Exception as e:  # the run's results are saved; a picture that fails must not fail it
        log(f"{path} not written: {type(e).__name__}: {e}")
        return
    log(f"wrote {path}")


def _log_row(step: int, metrics: dict, learning_rate: float, images_per_sec: float, skipped_records: int) -> dict:
    """A metrics.jsonl row: the step, the loss, every metric the method returned, then the trainer's."""
    row = {"step": step, "loss": float(metrics["loss"]), "learning_rate": learning_rate}
    for key, value in metrics.items():
        if key not in ("loss", "skipped_steps", "skipped_in_a_row"):
            row[key] = float(value)
    row.update(images_per_sec=images_per_sec, skipped_steps=int(metrics["skipped_steps"]),
               skipped_records=skipped_records)
    return row


def _summary_writer(workdir: str):
    """TensorBoard event files in workdir/tensorboard (process 0; None where TensorFlow is absent)."""
    if jax.process_index() != 0:
        return None
    try:
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
    except ImportError:
        return None
    return tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))


def _write_summaries(writer, step: int, row: dict) -> None:
    # tf.summary.write with TensorBoard's scalar-plugin metadata: the same events
    # tf.summary.scalar writes, without needing the tensorboard package installed.
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default(step=step):
        for key, value in row.items():
            if key != "step":
                tf.summary.write(key, tf.constant(float(value), tf.float32), metadata=metadata)
    writer.flush()


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
