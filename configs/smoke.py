"""Smoke run: a small CLIP on the embedded 'shapes' dataset, on a 2-core CPU in about 5 minutes.

RN-Shapes-XS (a ModifiedResNet at 64 px of width 16, chosen by measurement against wider ones and
ViTs: docs/training.md#the-smoke-run) learns colour and shape within the run; the picture of the
run is WORKDIR/summary.png.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke --config.total_steps=50
"""

from clip_jax.config import base_config


def get_config():
    c = base_config()
    c.model = "RN-Shapes-XS"
    c.batch_size = 128
    c.total_steps = 800
    c.log_every_steps = 25
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    c.summary_png = True

    c.optim.learning_rate = 2e-3  # width 16 learns shape in fewer steps at 2e-3 than at 1e-3
    c.optim.end_learning_rate = 1e-5
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1

    c.data.train = "shapes:train"
    # Two data streams (4 shards each): the same global batches on 1 or 2 processes.
    c.data.streams = 2
    # validation: colour-shape combinations seen in training; test: held-out combinations only.
    # Run every eval_every_steps (python -m clip_jax.evaluate runs the same specs, and more).
    c.data.eval = "zero_shot=shapes:validation,zero_shot=shapes:test,retrieval=shapes:test"
    c.data.image_dtype = "uint8"  # normalized on the device
    c.data.crop_scale = (0.9, 1.0)
    c.data.resize_method = "bilinear"
    c.data.shuffle_buffer = 5000
    c.data.label_keys = ("label", "label_color", "label_shape")
    return c
