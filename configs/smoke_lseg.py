"""LSeg's smoke run: the DPT head on the README's smoke CLIP (RN-Shapes-XS: its four ResNet stages are the
backbone, DPT's hybrid form; its text tower frozen), trained on the masks of `shapes_scenes:train`'s base
shapes and evaluated on every shape, so the novel ones (config.lseg.novel) are zero-shot.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.export --workdir=/tmp/smoke --out=/tmp/smoke_export/rn
    python -m clip_jax.train --config=configs/smoke_lseg.py --workdir=/tmp/smoke_lseg \
        --config.init_from=/tmp/smoke_export/rn.msgpack

Both towers come from init_from; the head starts fresh. LSeg's optimizer (SGD momentum 0.9, weight decay
1e-4, poly 0.9, the head's scratch at 10x) at lr 0.01 (LSeg's rule 0.004 / 16 x batch gives 0.008; 0.02
collapsed to background); a small head (fusion width 32, stages 16, 32, 64, 64). Background is learned
(config.lseg.background): the smoke text tower never saw the word and embeds it next to "diamond".
"""

from clip_jax.config import base_config


def get_config():
    c = base_config()
    c.method = "lseg"
    c.model = "RN-Shapes-XS"  # the smoke CLIP's towers: its image tower is the backbone, its text tower frozen
    c.init_params = "text/.*|visual/.*"
    c.batch_size = 32
    c.total_steps = 1600  # within 10 minutes on 2 cores (docs/methods.md, LSeg)
    c.log_every_steps = 25
    c.eval_every_steps = 400
    c.checkpoint_every_steps = 400
    c.keep_checkpoints = 2
    o = c.optim
    o.optimizer, o.momentum = "sgd", 0.9
    o.learning_rate, o.end_learning_rate = 0.01, 0.0
    o.schedule, o.warmup_steps = "poly", 0
    o.weight_decay, o.weight_decay_on = 1e-4, "all"
    o.grad_clip_norm = 0.0
    c.lseg.features, c.lseg.stage_features = 32, (16, 32, 64, 64)
    c.lseg.background = "learned"
    c.lseg.labels = "shape"  # 0 = background, then the six shape names (config.lseg.classes)
    c.data.train = "shapes_scenes:train"
    c.data.eval = "segmentation=shapes_scenes:test|background=model"  # its learned background
    c.data.image_dtype = "uint8"  # normalized on the device
    c.data.crop_scale = (0.5, 1.0)
    c.data.streams = 2
    c.data.shuffle_buffer = 5000
    return c
