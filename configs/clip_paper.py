"""The CLIP paper's recipe for each model it trained (Radford et al. 2021, tables 19-21).

    python -m clip_jax.train --config=configs/clip_paper.py:ViT-B-32 --workdir=gs://bucket/vit_b32 \
        --config.data.train='tfrecord:gs://bucket/pairs/train-*.tfrecord'

The argument after ':' is a preset name (clip_jax.list_models(); '-quickgelu' names too), and
optionally ',TOPOLOGY' (v5e:16x16, v4:4x4x8, v5p:4x4x8): the mesh, remat policy and gradient
accumulation chosen for that hardware by compiling the step for it (python -m
clip_jax.compile_check; launch/compile_sweep.py plans; docs/scaling.md): the least
recompute that fits, then the fewest collectives. Without a topology: v5e:16x16's plan
(the least HBM per chip of the three).
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
DEFAULT_TOPOLOGY = "v5e:16x16"
FSDP = {"data": 1, "fsdp": -1, "tensor": 1}  # params and moments split over every chip
DATA = {"data": -1, "fsdp": 1, "tensor": 1}  # params replicated: fewer collectives
# (mesh, remat, accum_steps) per topology and preset at global batch 32,768: each the first
# setting whose compiled total is within what the chip lets a program use, cheapest first
# (launch/compile_sweep.py plans).
SAVE_DOTS = "dots_with_no_batch_dims_saveable"  # keeps the weight matmuls' outputs, recomputes the rest
PLANS = {
    "v5e:16x16": {
        "ViT-B-32": (DATA, "none", 1),
        "ViT-B-16": (DATA, SAVE_DOTS, 1),
        "ViT-L-14": (DATA, "full", 1),
        "ViT-L-14-336": (FSDP, "full", 2),
        "ViT-H-14": (FSDP, "full", 1),
        "RN50": (DATA, "none", 1),
        "RN101": (DATA, "none", 1),
        "RN50x4": (FSDP, "full", 1),
        "RN50x16": (FSDP, "full", 2),  # one microbatch totals 15.77 GiB, over the 15.75 a program may use
        "RN50x64": (FSDP, "full", 4),  # full remat alone plans 34.3 GiB; 2 microbatches 18.4
    },
    "v4:4x4x8": {
        "ViT-B-32": (DATA, "none", 1),
        "ViT-B-16": (DATA, SAVE_DOTS, 1),
        "ViT-L-14": (DATA, "full", 1),
        "ViT-L-14-336": (FSDP, "full", 2),
        "ViT-H-14": (FSDP, "full", 1),
        "RN50": (DATA, "none", 1),
        "RN101": (DATA, "none", 1),
        "RN50x4": (FSDP, "none", 1),
        "RN50x16": (FSDP, "full", 1),
        "RN50x64": (FSDP, "full", 4),  # 2 microbatches plan 34.8 GiB of temporaries
    },
    "v5p:4x4x8": {
        "ViT-B-32": (DATA, "none", 1),
        "ViT-B-16": (DATA, "none", 1),
        "ViT-L-14": (DATA, SAVE_DOTS, 1),
        "ViT-L-14-336": (DATA, "full", 1),
        "ViT-H-14": (DATA, SAVE_DOTS, 1),
        "RN50": (DATA, "none", 1),
        "RN50x4": (DATA, "none", 1),
        "RN50x16": (DATA, "none", 1),
        "RN101": (DATA, "none", 1),
        "RN50x64": (DATA, "full", 1),
    },
}


def get_config(arg: str = "ViT-B-32"):
    model, _, topology = arg.partition(",")
    topology = topology or DEFAULT_TOPOLOGY
    base = model[: -len("-quickgelu")] if model.endswith("-quickgelu") else model
    if base not in LEARNING_RATE:
        raise ValueError(f"no paper recipe for {model!r}: use one of {sorted(LEARNING_RATE)} (or a -quickgelu name)")
    if topology not in PLANS:
        raise ValueError(f"no plans for topology {topology!r}: use one of {sorted(PLANS)}, or set config.mesh, "
                         "config.remat and config.accum_steps yourself (python -m clip_jax.compile_check tells "
                         "what fits)")
    vit = base.startswith("ViT")
    mesh, remat, accum = PLANS[topology][base]
    c = base_config()
    c.model = model
    c.dtype = "bfloat16"  # compute; params and optimizer state stay float32
    c.remat = remat
    c.accum_steps = accum
    c.batch_size = 32_768
    c.total_steps = PAPER_STEPS // 32 if base == "ViT-L-14-336" else PAPER_STEPS
    c.checkpoint_every_steps = 2_000
    c.mesh = ml_collections.ConfigDict(mesh)

    c.optim.learning_rate = LEARNING_RATE[base]
    c.optim.warmup_steps = 2_000 if base != "ViT-L-14-336" else 0
    c.optim.b2 = 0.98 if vit else 0.999
    c.optim.eps = 1e-6 if vit else 1e-8
    c.optim.weight_decay = 0.2
    c.optim.grad_clip_norm = 0.0  # the paper does not clip

    c.data.image_dtype = "uint8"
    c.data.crop = "random"  # resize the shorter side, random square crop (the paper's only augmentation)
    return c
