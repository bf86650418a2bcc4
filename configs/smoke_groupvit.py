"""GroupViT's smoke run: GroupViT-Shapes trained from the captions of shapes_scenes:train alone (no mask is
read), then scored on the masks of shapes_scenes:test (shape labels plus background, GroupViT's own
segmentation: config.groupvit.top_k, bg_thresh). On a 2-core CPU within 10 minutes.

    python -m clip_jax.train --config=configs/smoke_groupvit.py --workdir=/tmp/gv_smoke
"""

import ml_collections

from clip_jax.config import base_config


def get_config():
    c = base_config()
    c.method = "groupvit"
    c.model = "GroupViT-Shapes"
    # 8 final segments (the preset's 4 are fewer than a scene's up to 5 objects plus its background).
    c.model_overrides = ml_collections.ConfigDict({"vision_cfg": {"group_tokens": [16, 8, 0],
                                                                  "output_groups": [16, 8, 8]}})
    c.batch_size = 128
    c.total_steps = 800
    c.log_every_steps = 50
    c.eval_every_steps = 400
    c.checkpoint_every_steps = 400
    c.keep_checkpoints = 2

    c.optim.learning_rate = 2e-3
    c.optim.end_learning_rate = 1e-5
    c.optim.warmup_steps = 80
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 5.0
    # The shape names are the nouns of the captions (the colours are adjectives): three prompts per caption.
    c.groupvit.prompts = 3
    c.groupvit.top_k = 3  # a scene names 2 to 5 objects of six shapes
    c.groupvit.bg_thresh = 0.95

    c.data.train = "shapes_scenes:train"
    c.data.streams = 2
    c.data.eval = "segmentation=shapes_scenes:test"
    c.data.image_dtype = "uint8"
    c.data.crop_scale = (0.9, 1.0)
    c.data.resize_method = "bilinear"
    c.data.shuffle_buffer = 5000
    return c
