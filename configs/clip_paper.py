"""The CLIP paper's recipe for each model it trained (Radford et al. 2021, tables 19-21).

    python -m clip_jax.train --config=configs/clip_paper.py:ViT-B-32 --workdir=gs://bucket/vit_b32 \
        --config.data.train='tfrecord:gs://bucket/pairs/train-*.tfrecord'

The argument after ':' is a preset name (clip_jax.list_models(); '-quickgelu' names too).
Common to all: global batch 32,768; 32 epochs of 400M pairs (390,625 steps); AdamW with
decoupled weight decay 0.2 on weight matrices only; 2,000 warmup steps then cosine decay to
zero; temperature initialized to 0.07 and clamped at 100; a random square crop of the resized
image is the only augmentation. Adam beta2 / eps: 0.98 / 1e-6 for ViTs, 0.999 / 1e-8 for ResNets.

ViT-L-14-336 is ViT-L/14 trained one more epoch at 336 px with lr 2e-5: set
config.init_from to the ViT-L-14 weights (an export, an open_clip .safetensors or a workdir).
ViT-H-14 is not in the paper (open_clip trained it on LAION-2B); it gets the ViT-L recipe.
"""

import ml_collections

from clip_jax.config import base_config

PAPER_STEPS = 32 * 400_000_000 // 32_768  # 390,625
# Peak learning rates of tables 20 (ResNets) and 21 (ViTs).
LEARNING_RATE = {
    "RN50": 5e-4, "RN101": 5e-4, "RN50x4": 5e-4, "RN50x16": 4e-4, "RN50x64": 3.6e-4,
    "ViT-B-32": 5e-4, "ViT-B-16": 5e-4, "ViT-L-14": 4e-4, "ViT-L-14-336": 2e-5, "ViT-H-14": 4e-4,
}
# Parameters and Adam moments fit on one accelerator for these; the larger ones use FSDP and remat.
SMALL = {"RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16"}


def get_config(model: str = "ViT-B-32"):
    base = model[: -len("-quickgelu")] if model.endswith("-quickgelu") else model
    if base not in LEARNING_RATE:
        raise ValueError(f"no paper recipe for {model!r}: use one of {sorted(LEARNING_RATE)} (or a -quickgelu name)")
    vit = base.startswith("ViT")
    c = base_config()
    c.model = model
    c.dtype = "bfloat16"  # compute; params and optimizer state stay float32
    c.remat = "none" if base in SMALL else "full"
    c.batch_size = 32_768
    c.total_steps = PAPER_STEPS // 32 if base == "ViT-L-14-336" else PAPER_STEPS
    c.checkpoint_every_steps = 2_000
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1} if base in SMALL
                                       else {"data": 1, "fsdp": -1, "tensor": 1})

    c.optim.learning_rate = LEARNING_RATE[base]
    c.optim.warmup_steps = 2_000 if base != "ViT-L-14-336" else 0
    c.optim.b2 = 0.98 if vit else 0.999
    c.optim.eps = 1e-6 if vit else 1e-8
    c.optim.weight_decay = 0.2
    c.optim.grad_clip_norm = 0.0  # the paper does not clip

    c.data.image_dtype = "uint8"
    c.data.crop = "random"  # resize the shorter side, random square crop (the paper's only augmentation)
    return c
