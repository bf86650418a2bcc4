"""CLIP4Clip's smoke run: the README's smoke CLIP (RN-Shapes-XS) with a similarity header, trained on the embedded
`shapes_video` clips and their captions ("a small red circle at the top moves to the left"), 4 frames a clip.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.export --workdir=/tmp/smoke --out=/tmp/smoke_export/rn
    python -m clip_jax.train --config=configs/smoke_clip4clip.py --workdir=/tmp/smoke_clip4clip \
        --config.init_from=/tmp/smoke_export/rn.msgpack
    python -m clip_jax.train --config=configs/smoke_clip4clip.py:meanP ...

The smoke CLIP knows still images only: its frames' embeddings must learn where the shape is and the motion words
are new to it, so its weights train at the header's lr here (the reference's 1e-3 scale is for a CLIP that already
reads its frames). The batch is 96 clips: in a batch of 32 almost every clip is told apart by its colour and shape
alone, and the loss teaches little about the motion. seqTransf starts from the smoke CLIP's text tower (its width
equals the embedding's, 64). Evaluation: text->video retrieval on the test clips and
zero-shot classification of their action, colour and shape.
"""

from clip_jax.config import base_config


def get_config(header: str = "seqTransf"):
    c = base_config()
    c.method = "clip4clip"
    c.model = "RN-Shapes-XS"
    c.init_params = "text/.*|visual/.*|logit_scale"
    c.clip4clip.sim_header = header
    c.clip4clip.clip_lr_scale = 1.0
    c.clip4clip.flip = False  # a flip turns "moves to the left" into a move to the right
    c.batch_size = 96
    c.total_steps = 330
    c.log_every_steps = 25
    c.eval_every_steps = 165
    c.checkpoint_every_steps = 165
    c.keep_checkpoints = 2
    o = c.optim
    o.learning_rate, o.end_learning_rate, o.warmup_steps = 1e-3, 1e-5, 40
    o.weight_decay = 0.1
    d = c.data
    d.video_frames = 4
    d.train = "shapes_video:train"
    d.streams = 2
    d.eval = "retrieval_video=shapes_video:test,zero_shot_video=shapes_video:test"
    d.image_dtype = "uint8"
    d.crop_scale = (0.9, 1.0)
    d.resize_method = "bilinear"
    d.shuffle_buffer = 2000
    return c
