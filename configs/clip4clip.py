"""CLIP4Clip's MSR-VTT recipe (ArrowLuo/CLIP4Clip README, main_task_retrieval.py): OpenAI's ViT-B/32, 12 frames a
clip, 32-word captions, batch 128, 5 epochs, lr 1e-4 for the header and 1e-4 x coef_lr 1e-3 for CLIP's weights,
BertAdam (b1 0.9, b2 0.98, eps 1e-6, weight decay 0.2, gradient norm 1) with warmup over the first 10% and a
cosine. `configs/clip4clip.py:meanP` / `:seqLSTM` / `:seqTransf` (the default) pick the header.

    python -m clip_jax.input.convert_video --layout=msrvtt --meta=MSRVTT_data.json --video_dir=MSRVTT_Videos \
        --out=/data/msrvtt --split_csv=MSRVTT_train.9k.csv --split_name=train
    python -m clip_jax.input.convert_video --layout=msrvtt --meta=MSRVTT_data.json --video_dir=MSRVTT_Videos \
        --out=/data/msrvtt --split_csv=MSRVTT_JSFUSION_test.csv --split_name=test
    python -m clip_jax.train --config=configs/clip4clip.py --workdir=/tmp/clip4clip \
        --config.init_from=/data/ViT-B-32-openai.safetensors

Differences from the reference: it trains on every (caption, clip) pair of the 9k split (180,000 a epoch,
--expand_msrvtt_sentences), here each step draws one caption of each clip, so the run is as many steps as its
5 epochs of pairs (7,030 at 128); its captions are cut at 32 tokens, here at the model's context (77); its
cosine is over the whole run's progress (a jump at the end of warmup), here over the steps after warmup.
Reported (its README, MSR-VTT 1k-A): meanP R@1 43.1, seqTransf 44.5.
"""

from clip_jax.config import base_config

HEADERS = ("meanP", "seqLSTM", "seqTransf")


def get_config(header: str = "seqTransf"):
    if header not in HEADERS:
        raise ValueError(f"configs/clip4clip.py:{header}: use one of {HEADERS}")
    c = base_config()
    c.method = "clip4clip"
    c.model = "ViT-B-32-quickgelu"  # OpenAI's, as CLIP4Clip loads it
    c.init_params = "text/.*|visual/.*|logit_scale"
    c.clip4clip.sim_header = header
    c.clip4clip.layers = 4
    c.clip4clip.clip_lr_scale = 1e-3
    c.batch_size = 128
    c.total_steps = 7030  # 5 epochs of the 9k split's 180,000 caption-clip pairs at 128
    c.log_every_steps = 50
    c.eval_every_steps = 1406  # each epoch
    c.checkpoint_every_steps = 1406
    o = c.optim
    o.learning_rate, o.end_learning_rate, o.warmup_steps = 1e-4, 0.0, 703  # warmup_proportion 0.1
    o.b1, o.b2, o.eps, o.weight_decay = 0.9, 0.98, 1e-6, 0.2
    o.grad_clip_norm = 1.0
    d = c.data
    d.video_frames = 12  # --max_frames
    d.train = "tfrecord:/data/msrvtt/train-*.tfrecord"
    d.eval = "retrieval_video=tfrecord:/data/msrvtt/test-*.tfrecord"
    d.image_dtype = "uint8"
    return c
