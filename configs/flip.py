"""FLIP (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"): CLIP training with half
of each image's patch tokens dropped, then a short unmasked tuning phase.

    python -m clip_jax.train --config=configs/flip.py:ViT-B-16 --workdir=DIR \
        --config.data.train='tfrecord:gs://bucket/pairs/train-*.tfrecord'

The argument after ':' is a ViT preset (default ViT-B-16; FLIP's headline models are ViT-L/16 and
ViT-H/14).
From FLIP's configs/default.py: global batch 65,536; AdamW lr 4e-6 per 256 examples (1.024e-3),
beta2 0.95, weight decay 0.2 on weight matrices; 12.8B samples seen after 40 "virtual epochs"
(1.28M samples each) of warmup; temperature initialized at 0.01; the image embedding is the mean
of the output tokens; random resized crops of area (0.5, 1); a text context of 32 tokens. Then
100 virtual epochs unmasked (here the last steps of the same run, `clip.unmasked_from_step`; FLIP's
own tuning also lowers the learning rate to 4e-8 per 256, which this one-run form does not).
Not reproduced: FLIP's horizontal flip, its BERT tokenizer (CLIP's BPE here), and its
no-decay list (ours decays weight matrices only, which covers its bias/norm/embedding exclusions).
"""

import math

from clip_jax.config import base_config

BATCH = 65_536
VIRTUAL_EPOCH = 1_281_167  # ImageNet-1k's train size, FLIP's unit of schedule
MASKED_STEPS = 12_800_000_000 // BATCH  # 195,312
UNMASKED_STEPS = 100 * VIRTUAL_EPOCH // BATCH  # 1,954


def get_config(model: str = "ViT-B-16"):
    if not model.startswith("ViT"):
        raise ValueError(f"FLIP masks a ViT's patch tokens: {model!r} is not a ViT preset")
    c = base_config()
    c.model = model
    c.model_overrides = {"vision_cfg": {"pool_type": "avg"}, "text_cfg": {"context_length": 32},
                         "init_logit_scale": math.log(1 / 0.01)}
    c.clip.patch_dropout = 0.5
    c.clip.unmasked_from_step = MASKED_STEPS
    c.dtype = "bfloat16"
    c.remat = "full"
    c.batch_size = BATCH
    c.total_steps = MASKED_STEPS + UNMASKED_STEPS
    c.checkpoint_every_steps = 2_000
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    c.optim.learning_rate = 4e-6 * BATCH / 256
    c.optim.warmup_steps = 40 * VIRTUAL_EPOCH // BATCH
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.2
    c.optim.grad_clip_norm = 0.0
    c.data.image_dtype = "uint8"
    c.data.crop = "random_resized"
    c.data.crop_scale = (0.5, 1.0)
    return c
