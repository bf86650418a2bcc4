"""ActionCLIP's Kinetics-400 recipe (sallymmx/ActionCLIP configs/k400/k400_train.yaml, train.py): OpenAI's ViT-B/32,
8 frames a clip (one random frame in each of 8 segments; the middle ones at evaluation), the Transf fusion
(`configs/actionclip.py:FUSION` another of meanP, LSTM, Conv_1D, Transf_cls), batch
128, 50 epochs, AdamW (b1 0.9, b2 0.98, eps 1e-8, weight decay 0.2) at lr 5e-6 for CLIP's weights and 10 x for the
fusion, 5 warmup epochs then a cosine; seed 1024.

    python -m clip_jax.input.convert_video --layout=kinetics --meta=kinetics400/train.csv --video_dir=train \
        --out=/data/k400
    python -m clip_jax.input.convert_video --layout=kinetics --meta=kinetics400/validate.csv --video_dir=val \
        --out=/data/k400 --classes=/data/k400/classes.json
    python -m clip_jax.train --config=configs/actionclip.py --workdir=/tmp/actionclip \
        --config.init_from=/data/ViT-B-32-openai.safetensors \
        --config.actionclip.classes_file=/data/k400/classes.txt

classes_file: the 400 class names one a line, in the converter's label order (sorted). Differences from the
reference: its augmentation is RandAugment (N 2, M 9), multi-scale crops and random grayscale, here the image
op's random resized crop and a flip per clip; its evaluation averages the softmax of each template's logits,
here zero_shot_video averages the templates' text embeddings. Reported (its README, single view, 8 frames):
top-1 78.36, top-5 94.25.
"""

from clip_jax.config import base_config

TRAIN_CLIPS = 240_000  # Kinetics-400's training clips, about (downloads are never complete)


def get_config(fusion: str = "Transf"):
    c = base_config()
    c.method = "actionclip"
    c.model = "ViT-B-32-quickgelu"
    c.init_params = "text/.*|visual/.*|logit_scale"
    c.seed = 1024
    a = c.actionclip
    a.fusion, a.fusion_layers, a.fusion_lr_scale = fusion, 6, 10.0
    a.label_key = "label"
    c.batch_size = 128
    per_epoch = TRAIN_CLIPS // 128
    c.total_steps = 50 * per_epoch
    c.log_every_steps = 50
    c.eval_every_steps = 5 * per_epoch
    c.checkpoint_every_steps = per_epoch
    o = c.optim
    o.learning_rate, o.end_learning_rate, o.warmup_steps = 5e-6, 0.0, 5 * per_epoch
    o.b1, o.b2, o.eps, o.weight_decay = 0.9, 0.98, 1e-8, 0.2
    o.grad_clip_norm = 0.0  # clip_gradient is in the yaml but train.py never clips
    d = c.data
    d.video_frames = 8  # num_segments
    d.label_keys = ("label",)
    d.train = "tfrecord:/data/k400/train-*.tfrecord"
    d.eval = "zero_shot_video=tfrecord:/data/k400/validate-*.tfrecord|label_key=label"
    d.image_dtype = "uint8"
    return c
