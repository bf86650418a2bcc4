"""AudioCLIP's smoke run: the README's smoke CLIP (RN-Shapes-XS) with a small ESResNeXt-fbsp audio tower trained
into its embedding space on the embedded `shapes` records' sounds (docs/audio.md says how a scene sounds), as
AudioCLIP's partial training: the image and text towers and their temperature stay as they were.

    python -m clip_jax.train --config=configs/smoke.py --workdir=/tmp/smoke
    python -m clip_jax.export --workdir=/tmp/smoke --out=/tmp/smoke_export/rn
    python -m clip_jax.train --config=configs/smoke_audio.py --workdir=/tmp/smoke_audio \
        --config.init_from=/tmp/smoke_export/rn.msgpack

Every batch carries the three modalities, so the loss is AudioCLIP's over its three pairs (divided by 3! = 6);
the image-text pair is constant here (both towers frozen). Evaluation: zero-shot classification of the clips by
colour and shape with the image prompts, and clip-to-image and clip-to-caption retrieval.
"""

from clip_jax.config import base_config


def get_config(mode: str = "partial"):
    c = base_config()
    c.method = "audioclip"
    c.model = "RN-Shapes-XS"
    c.init_params = "text/.*|visual/.*|logit_scale"
    if mode == "partial":
        c.optim.frozen = "visual/.*|text/.*|logit_scale"
    # The fbsp window exponent m stays at its init (a rectangular window): near m = 0 its max-scaled gradient turns
    # with rounding (docs/audio.md), and trained it took the clips' colours from 99.9% to 95% (docs/performance.md)
    c.optim.frozen = "|".join(p for p in (c.optim.frozen, "audio/fbsp/m") if p)
    c.audioclip.audio_tower = "esresnext-fbsp-small"
    # The new scales start at 30 (about the smoke CLIP's own), inside the clamp so that they train: from AudioCLIP's
    # clamped 100 the clips' colours were 5 points lower after the run (docs/performance.md)
    c.audioclip.init_logit_scale = 3.4
    # The embedded sounds made at 9 kHz: the small tower's 512-point frames then resolve 17.6 Hz, so the notes (fourths
    # from 262 to 1109 Hz) lie 5 bins or more apart, all in the first of its three bands
    c.data.sounds_rate = 9000
    c.data.audio_rate, c.data.audio_samples = 9000, 9000
    c.audioclip.tower = {"sample_rate": 9000, "hop_length": 180}  # 50 frames a second, as at 16 kHz
    c.batch_size = 64
    c.total_steps = 600
    c.log_every_steps = 25
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    c.keep_checkpoints = 2
    c.summary_png = True
    o = c.optim
    o.learning_rate, o.end_learning_rate, o.warmup_steps = 2e-3, 1e-5, 50
    o.weight_decay = 1e-4
    c.data.train = "shapes:train"
    c.data.streams = 2
    c.data.eval = (
        "zero_shot_audio=shapes:validation,retrieval_audio=shapes:test,zero_shot=shapes:validation,retrieval=shapes:test")
    c.data.image_dtype = "uint8"
    c.data.crop_scale = (0.9, 1.0)
    c.data.resize_method = "bilinear"
    c.data.shuffle_buffer = 5000
    c.data.label_keys = ("label", "label_color", "label_shape")
    return c
