"""ViLD (Gu et al. 2022): its R50 recipe on LVIS (tensorflow/tpu projects/vild, vild_resnet.yaml), as far as it maps
here.

    python -m clip_jax.embed regions --data='tfrecord:/data/lvis-train-*' --teacher=ViT-B-32.pt \
        --workdir=/runs/vild_rpn --out=/data/lvis-regions --max_regions=300
    python -m clip_jax.train --config=configs/vild.py:ViT-B-32 --workdir=DIR \
        --config.data.train='tfrecord:/data/lvis-regions/*' --config.vild.classes_file=lvis_classes.txt \
        --config.vild.novel="$(cat lvis_rare.txt)" --config.init_from=ViT-B-32.pt --config.init_params='text/.*'

The argument after ':' is the CLIP preset whose text tower gives the frozen classifier (and the embedding width,
512 for ViT-B/32, the reference's teacher); the image tower is replaced by the detector's backbone, a ResNet-50
(CLIP's ModifiedResNet layout, layers 3-4-6-3) at 1024 px, to be initialized from ImageNet weights in that layout
or trained from scratch. Recipe: batch 256, 180k steps of momentum SGD (0.9), lr 0.32 with a 1k-step linear
warmup, x0.1 at 162k, 171k and 175.5k, L2 weight decay 4e-5 on every param; horizontal flips and scale jitter
(random resized crops of 10% to 100% of the image: the reference's 0.1-2.0 zooms out too, which a crop cannot);
RPN: 256 anchors per image at half foreground, NMS 0.7, 2,000 proposals before and 1,000 after it (1,000 and
1,000 at test); RoIs: 512 per image, a quarter foreground; a head of 4 convs of 256 and 2 fully connected layers
of 1,024; logits at temperature 100; ViLD-image on 300 precomputed proposals per image at weight 0.5; 300
detections per image (LVIS). Not reproduced: the mask head, and LVIS's repeat-factor sampling.
"""

from clip_jax.config import base_config

BATCH = 256
STEPS = 180_000
R50_1024 = {"image_size": 1024, "layers": (3, 4, 6, 3), "width": 64, "patch_size": None, "head_width": 64}


def get_config(model: str = "ViT-B-32"):
    c = base_config()
    c.method = "vild"
    c.model = model
    c.model_overrides = {"vision_cfg": R50_1024}
    c.batch_size = BATCH
    c.total_steps = STEPS
    c.checkpoint_every_steps = 5_000
    o = c.optim
    o.optimizer, o.momentum = "sgd", 0.9
    o.learning_rate, o.warmup_steps = 0.32, 1_000
    o.schedule, o.decay_boundaries, o.decay_factor = "steps", (162_000, 171_000, 175_500), 0.1
    o.weight_decay, o.weight_decay_on = 4e-5, "all"
    o.grad_clip_norm = 0.0
    v = c.vild
    v.labels, v.novel = "record", ()
    v.max_objects = 100
    v.fpn_width, v.anchor_scale, v.aspect_ratios = 256, 8.0, (0.5, 1.0, 2.0)
    v.rpn_batch, v.rpn_fg_fraction, v.rpn_fg_iou, v.rpn_bg_iou = 256, 0.5, 0.7, 0.3
    v.rpn_pre_nms, v.rpn_nms, v.rpn_post_nms = 2_000, 0.7, 1_000
    v.test_rpn_pre_nms, v.test_rpn_post_nms = 1_000, 1_000
    v.roi_batch, v.roi_fg_fraction, v.roi_fg_iou = 512, 0.25, 0.5
    v.roi_size, v.canonical_size, v.canonical_level = 7, 224.0, 4
    v.head_convs, v.head_conv_dim, v.head_fcs, v.head_fc_dim = 4, 256, 2, 1_024
    v.temperature, v.distill_weight, v.max_regions = 100.0, 0.5, 300
    v.detections, v.nms = 300, 0.5
    c.data.crop_scale = (0.1, 1.0)
    c.data.image_dtype = "uint8"
    return c
