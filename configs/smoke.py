"""Smoke run: a tiny CLIP on the embedded 'shapes' dataset, on a laptop CPU in a few minutes.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke --config.total_steps=50
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "ViT-Tiny-test"
    c.init_from = ""  # or weights to start from: .safetensors / .pt / .msgpack
    c.dtype = "float32"
    c.remat = "none"
    c.scan = True
    c.attn_impl = "auto"  # cuDNN fused attention on NVIDIA GPUs in bf16 (lengths padded to x8), else XLA
    # oneDNN matmuls pay for B-sized towers on Intel CPUs; this tiny model's step was 0.97 x with them.
    c.cpu_onednn_dots = "off"
    c.loss = "softmax"
    c.seed = 0
    c.batch_size = 128  # global, over every process
    c.total_steps = 600
    c.accum_steps = 1
    c.prefetch_batches = 2  # global batches put on the devices ahead of the step
    c.log_every_steps = 25
    c.eval_every_steps = 150
    c.eval_batch_size = 256  # global
    c.checkpoint_every_steps = 150
    c.keep_checkpoints = 2
    c.compilation_cache_dir = ""  # "" = ~/.cache/clip_jax/xla; "none" = off
    c.max_nonfinite_steps = 10  # stop after this many steps in a row with a NaN/inf loss or gradient
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.end_learning_rate = 1e-5
    c.optim.warmup_steps = 50
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.train = "shapes:train"
    # Two data streams (4 shards each): the same global batches on 1 or 2 processes.
    c.data.streams = 2
    # validation: colour-shape combinations seen in training; test: held-out combinations only.
    # Run every eval_every_steps (python -m clip_jax.evaluate runs the same specs, and more).
    c.data.eval = "zero_shot=shapes:validation,zero_shot=shapes:test,retrieval=shapes:test"
    c.data.image_dtype = "uint8"  # normalized on the device
    c.data.crop = "random_resized"
    c.data.crop_scale = (0.9, 1.0)
    c.data.resize_method = "bilinear"
    c.data.shuffle_buffer = 5000
    c.data.cache_dir = ""  # default ~/.cache/clip_jax
    c.data.shapes_seed = 0
    c.data.shapes_image_size = 64
    c.data.shapes_sizes = {"train": 20000, "validation": 1000, "test": 1000}
    c.data.label_keys = ("label", "label_color", "label_shape")
    return c
