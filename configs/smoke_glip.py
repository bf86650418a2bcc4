"""GLIP's smoke run: a small one-stage grounding detector on the README's smoke CLIP (RN-Shapes-XS: its four ResNet
stages are the backbone, its text tower reads the prompts), trained on `shapes_scenes:train` as detection data
(prompts of the base shapes' names, the novel shapes' boxes dropped) mixed with grounding data (each scene's
caption, every object's box on its phrase), and evaluated by detecting every shape by name and by grounding the
test captions' phrases.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.export --workdir=/tmp/smoke --out=/tmp/smoke_export/rn
    python -m clip_jax.train --config=configs/smoke_glip.py --workdir=/tmp/smoke_glip \
        --config.init_from=/tmp/smoke_export/rn.msgpack

Both towers come from init_from; the pyramid and head start fresh. Scaled to 64 px scenes of 2 to 5 objects 10 to
27 px wide: pyramid levels P2 to P5 (strides 4 to 32) with anchors of 4 x stride, two fused head layers of 32
channels, prompts within the text tower's 77 tokens.
"""

from clip_jax.config import base_config


def get_config(fusion: str = "on"):
    c = base_config()
    c.method = "glip"
    c.model = "RN-Shapes-XS"
    c.init_params = "text/.*|visual/.*"
    c.batch_size = 16
    c.total_steps = 3000
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 2
    o = c.optim
    o.learning_rate, o.warmup_steps = 1e-3, 100
    o.schedule, o.decay_boundaries, o.decay_factor = "steps", (2000, 2670), 0.1  # GLIP's steps at 0.67 and 0.89
    o.weight_decay, o.weight_decay_on = 1e-4, "all"
    o.grad_clip_norm = 1.0
    g = c.glip
    g.prompts, g.grounding_fraction = "mix", 0.5
    g.negatives = 4  # every other base shape
    g.query_length = 77
    g.max_objects = 8
    g.levels = (2, 3, 4, 5)
    g.fpn_width, g.gn_groups = 32, 8
    g.anchor_scale = 4.0
    g.num_convs = 2
    g.fusion = fusion == "on"
    g.fusion_dim, g.fusion_heads, g.text_heads = 64, 4, 4
    g.detections = 20
    c.data.train = "shapes_scenes:train"
    c.data.eval = "detection=shapes_scenes:test,grounding=shapes_scenes:test"
    c.data.image_dtype = "uint8"  # normalized on the device
    c.data.crop_scale = (0.5, 1.0)
    c.data.streams = 2
    c.data.shuffle_buffer = 5000
    return c
