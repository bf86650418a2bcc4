"""LSeg (Li et al. 2022, "Language-driven Semantic Segmentation"): a DPT head on a ViT-L/16 at 480 px against
the frozen text tower of CLIP ViT-B/32, per-pixel cross-entropy; its ADE20K recipe as far as it maps here.

    python -m clip_jax.train --config=configs/lseg.py:ViT-B-32 --workdir=DIR \
        --config.data.train='tfrecord:/data/ade20k-train-*' --config.lseg.classes_file=ade20k_classes.txt \
        --config.init_from='ViT-B-32.pt;vit_l16_384_imagenet.safetensors' --config.init_params='text/.*;visual/.*'

The argument after ':' is the preset whose text tower (and embedding width, 512) LSeg uses; the image tower
is replaced by LSeg's backbone, a ViT-L/16 (24 blocks of width 1024) at 480 px, the DPT head reading blocks
6, 12, 18 and 24 (its hooks [5, 11, 17, 23]) with the project readout, stages of 256, 512, 1024 and 1024
channels fused at 256 with BatchNorm, per-pixel embeddings of 512. Recipe (LSeg's lsegmentation_module.py
and train.sh): SGD momentum 0.9, weight decay 1e-4 on every trained param, lr 0.004 / 16 x batch, poly
decay (power 0.9) stepped per epoch, no warmup, no clipping; the DPT `scratch` at 10x; the text tower frozen;
logits at the fixed scale 1/0.07 against the raw class names; 240 epochs of ADE20K's 20,210 training images.
The masks come from the records' `segmentation_mask` (labels='record': ids in the order of classes_file,
255 ignored). Not reproduced: LSeg's backbone is timm's ImageNet-pretrained ViT-L/16 (no LayerNorm before the
blocks, its own mean/std of 0.5), here a CLIP-layout ViT to be initialized from such weights; train.sh's batch
of 1 (2 accumulated) per GPU is a global batch of 16 here, under the same rule lr = 0.004 / 16 x batch; its
random scale (0.5-2 of 520 px) and 480 crop are the `mask` input's joint random resized crop and flip here.
"""

from clip_jax.config import base_config

BATCH = 16
EPOCH = 20_210 // BATCH  # ADE20K's training images per step
LSEG_VIT_L16 = {"image_size": 480, "layers": 24, "width": 1024, "head_width": 64, "patch_size": 16}


def get_config(model: str = "ViT-B-32"):
    c = base_config()
    c.method = "lseg"
    c.model = model
    c.model_overrides = {"vision_cfg": LSEG_VIT_L16}
    c.batch_size = BATCH
    c.total_steps = 240 * EPOCH
    c.checkpoint_every_steps = 2_000
    o = c.optim
    o.optimizer, o.momentum = "sgd", 0.9
    o.learning_rate = 0.004 / 16 * BATCH
    o.end_learning_rate = 0.0
    o.schedule, o.schedule_every_steps, o.warmup_steps = "poly", EPOCH, 0
    o.weight_decay, o.weight_decay_on = 1e-4, "all"
    o.grad_clip_norm = 0.0
    c.lseg.layers = ()  # ceil(k * 24 / 4): 6, 12, 18, 24
    c.lseg.features, c.lseg.stage_features, c.lseg.readout = 256, (256, 512, 1024, 1024), "project"
    c.lseg.labels, c.lseg.novel = "record", ()
    return c
