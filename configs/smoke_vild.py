"""ViLD's smoke run: a small Faster R-CNN on the README's smoke CLIP (RN-Shapes-XS: its four ResNet stages are the
backbone, its text tower gives the frozen classifier and is the teacher of the crop embeddings), trained on the
boxes of `shapes_scenes:train`'s base shapes and evaluated on every shape, so the novel ones (config.vild.novel)
are detected zero-shot.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.export --workdir=/tmp/smoke --out=/tmp/smoke_export/rn
    python -m clip_jax.train --config=configs/smoke_vild.py --workdir=/tmp/smoke_vild \
        --config.init_from=/tmp/smoke_export/rn.msgpack

Both towers come from init_from; the detector starts fresh. Scaled to 64 px scenes of 2 to 5 objects 10 to 27 px
wide: anchors of 8 px on P2 to 128 px on P6, regions pooled on P2 below 16 px and P3 to 32 px, 50 proposals per
image, a one-conv one-fc region head per branch (ViLD-ensemble). The class texts are the shape names with each
colour of the data ("a red {}."), averaged: the smoke CLIP was trained on captions that always name a colour.
"""

from clip_jax.config import base_config

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")  # clip_jax.input.shapes.COLOR_NAMES


def get_config():
    c = base_config()
    c.method = "vild"
    c.model = "RN-Shapes-XS"
    c.init_params = "text/.*|visual/.*"
    c.batch_size = 16
    c.total_steps = 1200
    c.log_every_steps = 25
    c.eval_every_steps = 400
    c.checkpoint_every_steps = 400
    c.keep_checkpoints = 2
    o = c.optim
    o.optimizer, o.momentum = "sgd", 0.9
    o.learning_rate, o.warmup_steps = 0.02, 100
    o.schedule, o.decay_boundaries, o.decay_factor = "steps", (900, 1100), 0.1
    o.weight_decay, o.weight_decay_on = 4e-5, "all"
    o.grad_clip_norm = 10.0
    v = c.vild
    v.templates = tuple(f"a {colour} {{}}." for colour in COLOURS)
    v.max_objects = 8
    v.fpn_width = 32
    v.anchor_scale = 2.0
    v.rpn_batch, v.rpn_pre_nms, v.rpn_post_nms = 64, 300, 50
    v.test_rpn_pre_nms, v.test_rpn_post_nms = 300, 50
    v.roi_batch, v.canonical_size = 64, 32.0
    v.head_convs, v.head_conv_dim, v.head_fcs, v.head_fc_dim = 1, 32, 1, 128
    v.max_regions = 8
    v.distill_weight = 0.5
    v.ensemble = True  # ViLD-ensemble: one head per loss, their scores combined (the reference's best R50 row)
    v.detections = 20
    c.data.train = "shapes_scenes:train"
    c.data.eval = "detection=shapes_scenes:test"
    c.data.image_dtype = "uint8"  # normalized on the device
    c.data.crop_scale = (0.5, 1.0)
    c.data.streams = 2
    c.data.shuffle_buffer = 5000
    return c
