"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"): a pretrained
image tower, locked, and a text tower trained against it.

    python -m clip_jax.train --config=configs/lit.py:ViT-B-16 --workdir=DIR \
        --config.init_from=ViT-B-16.safetensors --config.data.train='tfrecord:/data/pairs-*'

The argument after ':' is a preset; `init_from` (required: the image tower's weights, any file
clip_jax.load reads) provides `visual/.*` only (`init_params`), which stays frozen: no gradient
is computed for it, the optimizer holds no state for it, and a ResNet's BatchNorm runs in
inference mode. The text tower starts from scratch; to start it from the same file too, set
--config.init_params='.*'. Defaults from big_vision's LiT demo (configs/proj/image_text/
siglip_lit_coco.py): batch 512, 5,000 steps, AdamW lr 1e-3 with warmup, weight decay 0.01,
gradient clipping at 1.0, temperature initialized at 10, 16-token texts (to start the text tower
from a 77-token checkpoint too, add --config.model_overrides.text_cfg.context_length=77). Not
reproduced: its BERT text tower (CLIP's text tower here) and RandAugment. To train against
image embeddings computed once instead of running the tower every step: python -m
clip_jax.embed, then --config.clip.image_embeddings=DIR (docs/methods.md).
"""

import math

from clip_jax.config import base_config


def get_config(model: str = "ViT-B-16"):
    c = base_config()
    c.model = model
    c.model_overrides = {"init_logit_scale": math.log(10.0), "text_cfg": {"context_length": 16}}
    c.init_params = "visual/.*"
    c.optim.frozen = "visual/.*"
    c.batch_size = 512
    c.total_steps = 5_000
    c.checkpoint_every_steps = 1_000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 1.0
    c.data.image_dtype = "uint8"
    return c
