"""Training entry point: python -m clip_jax.train --config=configs/smoke.py --workdir=DIR [--config.x=...]

A second run on the same workdir resumes from its latest checkpoint (params, optimizer
state, step, and every process's input position), so it continues the same stream.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from clip_jax import checkpoint, sharding
from clip_jax.input_pipeline import InputPipeline, to_global_arrays
from clip_jax.losses import make_loss
from clip_jax.models import create_model
from clip_jax.optim import make_optimizer, make_schedule
from clip_jax.train_step import TrainState, create_state, jit_train_step


def _data_config(config) -> dict:
    return {k: v for k, v in config.data.items() if k not in ("train", "eval")}


def validate(config) -> None:
    """Bad configs fail here, before data is read or anything compiles."""
    for key in ("total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps"):
        if int(config[key]) < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
    if config.loss not in ("softmax", "softmax_ring", "sigmoid"):
        raise ValueError(f"config.loss {config.loss!r} not in softmax, softmax_ring, sigmoid")


def evaluate(model, params, config, mesh) -> dict:
    """Zero-shot accuracy on each comma-separated shapes split of config.data.eval."""
    from clip_jax.zero_shot import embed_split, shapes_zero_shot

    out = {}
    variables = jax.device_get(params)
    for spec in [s.strip() for s in config.data.get("eval", "").split(",") if s.strip()]:
        if not spec.startswith("shapes"):
            continue  # other datasets: clip_jax.evaluate (issue 6)
        pipe = InputPipeline(spec, _data_config(config), global_batch_size=100, train=False, num_epochs=1,
                             image_size=model.config.vision.image_size, context_length=model.config.text.context_length)
        embeds, labels = embed_split(model, variables, pipe)
        split = spec.split(":", 1)[1] if ":" in spec else "train"
        out.update({k.replace("zero_shot/", f"zero_shot/{split}/"): v
                    for k, v in shapes_zero_shot(model, variables, embeds, labels).items()})
    return out


def train_and_evaluate(config, workdir: str, stop_at: int | None = None) -> dict:
    """Train to config.total_steps (or stop, checkpointed, at step `stop_at`, as a preemption would)."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(dict(config.mesh))
    sharding.check_batch(config.batch_size, mesh)
    model = create_model(config.model, dtype=config.dtype, remat=config.remat, scan=config.scan)
    variables, _ = sharding.sharded_init(model, mesh, jax.random.key(config.seed))
    optimizer = make_optimizer(config.optim, variables["params"], config.total_steps)
    state = create_state(variables, optimizer)
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints,
                                      config.checkpoint_every_steps)
    input_state = None
    if manager.latest_step() is not None:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, input_state, step = checkpoint.restore(manager, abstract)
        log(f"resumed from step {step} in {workdir}")
    pipe = InputPipeline(config.data.train, _data_config(config), global_batch_size=config.batch_size,
                         image_size=model.config.vision.image_size, train=True, seed=config.seed,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         context_length=model.config.text.context_length, state=input_state)
    step_fn = jit_train_step(model, optimizer, make_loss(config.loss, mesh, sharding.BATCH_AXES), state,
                             sharding.batch_sharding(mesh), config.accum_steps)
    schedule = make_schedule(config.optim, config.total_steps)
    metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if jax.process_index() == 0 else None
    writer = _summary_writer(workdir)
    step = int(state.step)
    last = {}
    window_start, window_images = time.perf_counter(), 0
    end = min(config.total_steps, stop_at or config.total_steps)
    while step < end:
        batch = to_global_arrays(next(pipe), sharding.batch_sharding(mesh))
        state, metrics = step_fn(state, batch)
        step += 1
        window_images += config.batch_size
        if step % config.log_every_steps == 0 or step == config.total_steps:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - window_start
            row = {"step": step, "loss": float(metrics["loss"]), "learning_rate": float(schedule(step - 1)),
                   "logit_scale": float(metrics["logit_scale"]), "grad_norm": float(metrics["grad_norm"]),
                   "images_per_sec": window_images / elapsed, "skipped_records": sum(pipe.state().bad.values())}
            if config.eval_every_steps and (step % config.eval_every_steps == 0 or step == config.total_steps):
                row.update(evaluate(model, {"params": state.params, "batch_stats": state.batch_stats}
                                    if state.batch_stats else {"params": state.params}, config, mesh))
            eta = (config.total_steps - step) / max(window_images / elapsed / config.batch_size, 1e-9)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                + f" eta={eta:.0f}s")
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if writer is not None:
                _write_summaries(writer, step, row)
            last = row
            window_start, window_images = time.perf_counter(), 0
        checkpoint.save(manager, step, state, pipe.state(), force=step == end)
    manager.wait_until_finished()
    return last


def _summary_writer(workdir: str):
    """TensorBoard event files in workdir/tensorboard (process 0; None where TensorFlow is absent)."""
    if jax.process_index() != 0:
        return None
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))


def _write_summaries(writer, step: int, row: dict) -> None:
    # tf.summary.write with TensorBoard's scalar-plugin metadata: the same events
    # tf.summary.scalar writes, without needing the tensorboard package installed.
    import tensorflow as tf
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


def main(argv):
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO

    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "an ml_collections config file, e.g. configs/smoke.py")
    flags.DEFINE_string("workdir", None, "where checkpoints and metrics.jsonl go; a second run resumes there")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
