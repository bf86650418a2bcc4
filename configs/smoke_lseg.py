"""LSeg's smoke run: the DPT head on ViT-Shapes-M (64 px) trained on the masks of `shapes_scenes:train`'s base
shapes, against the frozen text tower of the smoke CLIP run (configs/smoke.py, which learns shape names),
evaluated on every shape so the novel ones (config.lseg.novel) are zero-shot.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.export --workdir=/tmp/smoke --out=/tmp/smoke_export/rn
    python -m clip_jax.train --config=configs/smoke_lseg.py --workdir=/tmp/smoke_lseg \
        --config.init_from=/tmp/smoke_export/rn.msgpack

Only the text tower is taken from init_from (init_params='text/.*'; its shape matches the smoke CLIP's through
model_overrides); the image tower and the head start fresh, as no pretrained ViT exists for this data. LSeg's
optimizer (SGD momentum 0.9, weight decay 1e-4, poly 0.9, the head's scratch at 10x) at a learning rate for a
backbone trained from scratch, not LSeg's 0.004 / 16 x batch for a pretrained one; a small head (fusion width
32, stages 16, 32, 64, 64). Without init_from the frozen text tower is random: the base classes still train
(against fixed random class embeddings), the novel ones cannot be recognized.
"""

from clip_jax.config import base_config


def get_config():
    c = base_config()
    c.method = "lseg"
    c.model = "RN-Shapes-XS"  # the smoke CLIP's towers: its image tower is the backbone, its text tower frozen
    c.init_params = "text/.*|visual/.*"
    c.batch_size = 32
    c.total_steps = 800  # within 10 minutes on 2 cores (the step time: docs/methods.md, LSeg)
    c.log_every_steps = 25
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    o = c.optim
    o.optimizer, o.momentum = "sgd", 0.9
    o.learning_rate, o.end_learning_rate = 0.01, 0.0  # a backbone from scratch: 0.05 diverged
    o.schedule, o.warmup_steps = "poly", 0
    o.weight_decay, o.weight_decay_on = 1e-4, "all"
    o.grad_clip_norm = 0.0
    c.lseg.features, c.lseg.stage_features = 32, (16, 32, 64, 64)
    c.lseg.background = "learned"  # the smoke text tower never saw the word "background" (its embedding is diamond's)
    c.lseg.labels = "shape"  # 0 = background, then the six shape names (config.lseg.classes)
    c.data.train = "shapes_scenes:train"
    c.data.eval = "segmentation=shapes_scenes:test|background=model"  # LSeg trains background as a class
    c.data.image_dtype = "uint8"  # normalized on the device
    c.data.crop_scale = (0.5, 1.0)
    c.data.streams = 2
    c.data.shuffle_buffer = 5000
    return c
