"""Embed the image side of a run's training batches once, for training against a locked tower (LiT).

    python -m clip_jax.embed --config=configs/lit.py:ViT-B-16 --config.init_from=W.safetensors \
        --config.data.train='tfrecord:/data/pairs-*' --out=/data/lit_b16_embeds [--steps=N]
    python -m clip_jax.train --config=configs/lit.py:ViT-B-16 --config.init_from=W.safetensors \
        --config.data.train='tfrecord:/data/pairs-*' --config.clip.image_embeddings=/data/lit_b16_embeds --workdir=DIR

The input pipeline runs exactly as the trainer's would (same seed, streams, crops, order), the
image tower in inference mode (as a locked tower runs in training), and each step's global batch
is written as image embeddings and tokens (clip_jax.input.embedding_cache). `--steps` defaults
to config.total_steps. One process.
"""

from __future__ import annotations

import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "the run's config file, e.g. configs/lit.py:ViT-B-16")
flags.DEFINE_string("out", None, "the cache directory")
flags.DEFINE_integer("steps", 0, "steps to embed (0: config.total_steps)")
flags.DEFINE_integer("chunk_steps", 100, "steps per .npz file")
flags.mark_flags_as_required(["config", "out"])


def embed(config, out: str, steps: int = 0, chunk_steps: int = 100, log=print) -> dict:
    """Write the cache of `config`'s first `steps` training batches to `out`; its manifest."""
    import jax
    import numpy as np

    from clip_jax.evaluate.features import Encoder
    from clip_jax.input.embedding_cache import EmbeddingWriter, read_manifest, settings_of
    from clip_jax.parallel import sharding
    from clip_jax.train.build import build
    from clip_jax.train.trainer import training_input

    if jax.process_count() != 1:
        raise ValueError("python -m clip_jax.embed runs as one process (it writes global batches)")
    if not config.data.train:
        raise ValueError("config.data.train is empty: the cache embeds the run's training data")
    config = config.copy_and_resolve_references()
    config.clip.image_embeddings = ""  # building the run that makes the cache, not one that reads it
    steps = steps or config.total_steps
    mesh = sharding.make_mesh({"data": -1})
    run = build(config, mesh, log=log)
    model = run.model
    # the image tower in inference mode, as a locked tower runs in training
    encoder = Encoder(model, run.method.model_variables(run.state.params, run.state.model_state), mesh,
                      predictions=run.method.predictions())
    pipe = training_input(config, model, run.method)
    writer = EmbeddingWriter(out, settings_of(config, model.config.vision.image_size, model.config.text.context_length),
                             chunk_steps)
    start = time.perf_counter()
    for step in range(steps):
        batch = next(pipe)
        writer.add(np.asarray(encoder.images(batch["image"])), batch["tokens"])
        if (step + 1) % 100 == 0 or step + 1 == steps:
            rate = (step + 1) * config.batch_size / (time.perf_counter() - start)
            log(f"embedded {step + 1}/{steps} steps ({rate:.1f} images/s)")
    writer.close(pipe.bad_records())
    return read_manifest(out)


def main(argv):
    del argv
    embed(flags.FLAGS.config, flags.FLAGS.out, flags.FLAGS.steps, flags.FLAGS.chunk_steps)


if __name__ == "__main__":
    app.run(main)
