"""SLIP (Mu et al. 2022, "SLIP: Self-supervision meets Language-Image Pre-training"): CLIP's loss plus
SimCLR's on two more augmented views of each image, through one image tower.

    python -m clip_jax.train --config=configs/slip.py:ViT-B-16 --workdir=DIR \
        --config.data.train='tfrecord:/data/yfcc15m-*'

The argument after ':' is a preset (SLIP trained ViTs; on a ModifiedResNet the SimCLR head reads
the attention pool's output before its projection). Defaults are SLIP's ViT-B/16 recipe
on YFCC15M (its main.py and README): batch 4,096, 25 epochs of 15M images, one epoch of warmup,
cosine to 1e-5, AdamW lr 3e-3, betas (0.9, 0.98), eps 1e-8, weight decay 0.1 (not on gains and
biases); the CLIP view a random resized crop of area 0.5-1; the SimCLR views as
clip_jax.input.pipeline.SIMCLR; the head 4096-4096-256 with BatchNorm over the global batch;
NT-Xent at temperature 0.1; ssl_scale 1. config.slip.detach_clip_gather=True reproduces the
reference's CLIP loss on more than one GPU (gathered features carry no gradient); the default is
the full-gradient loss over the global batch (docs/methods.md). Not reproduced: timm's ViT
(no LayerNorm before the blocks; CLIP's ViT here, so weights stay in open_clip's layout).
"""

from clip_jax.config import base_config

BATCH = 4_096
EPOCH = 15_000_000 // BATCH  # YFCC15M steps per epoch


def get_config(model: str = "ViT-B-16"):
    c = base_config()
    c.method = "slip"
    c.model = model
    c.batch_size = BATCH
    c.total_steps = 25 * EPOCH
    c.checkpoint_every_steps = 2_000
    c.optim.learning_rate = 3e-3
    c.optim.end_learning_rate = 1e-5
    c.optim.warmup_steps = EPOCH
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.grad_clip_norm = 0.0
    c.data.image_dtype = "uint8"
    c.data.crop = "random_resized"
    c.data.crop_scale = (0.5, 1.0)
    return c
