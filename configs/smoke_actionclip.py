"""ActionCLIP's smoke run: the README's smoke CLIP (RN-Shapes-XS) with the Transf fusion, trained on the embedded
`shapes_video` clips' action labels (shapes_video.ACTIONS: "moves to the left", ..., "changes color") read as
text in ActionCLIP's 16 templates, 4 frames a clip; the KL loss, since a batch of 32 holds each of the 8 actions
several times.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.export --workdir=/tmp/smoke --out=/tmp/smoke_export/rn
    python -m clip_jax.train --config=configs/smoke_actionclip.py --workdir=/tmp/smoke_actionclip \
        --config.init_from=/tmp/smoke_export/rn.msgpack

The smoke CLIP has never seen motion: its frames' embeddings must learn where the shape is, so the CLIP weights
train at 1e-3 here (the recipe's 5e-6 is for a CLIP that already reads its frames) and the fusion at 10 x that.
Evaluation: zero-shot classification of the test clips' action (zero_shot/shapes_video.test/action/top1), the
class names in the 16 templates.
"""

from clip_jax.config import base_config
from clip_jax.input.shapes_video import ACTIONS


def get_config():
    c = base_config()
    c.method = "actionclip"
    c.model = "RN-Shapes-XS"
    c.init_params = "text/.*|visual/.*|logit_scale"
    a = c.actionclip
    a.fusion, a.fusion_layers, a.fusion_lr_scale = "Transf", 2, 10.0
    a.label_key = "label_action"
    a.classes = ACTIONS
    a.flip = False  # a flip turns a move to the left into one to the right, against its label
    c.batch_size = 32
    c.total_steps = 800
    c.log_every_steps = 25
    c.eval_every_steps = 400
    c.checkpoint_every_steps = 400
    c.keep_checkpoints = 2
    o = c.optim
    o.learning_rate, o.end_learning_rate, o.warmup_steps = 1e-3, 1e-6, 40
    o.weight_decay = 0.1
    d = c.data
    d.video_frames = 4
    d.label_keys = ("label_action",)
    d.train = "shapes_video:train"
    d.streams = 2
    d.eval = "zero_shot_video=shapes_video:test|label_key=label_action"
    d.image_dtype = "uint8"
    d.crop_scale = (0.9, 1.0)
    d.resize_method = "bilinear"
    d.shuffle_buffer = 2000
    return c
