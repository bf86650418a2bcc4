"""AudioCLIP's recipes (AndreyGuzhov/AudioCLIP): OpenAI's RN50 image and text towers with the ESResNeXt-fbsp audio
tower (44.1 kHz, 5 s clips), embedding 1024.

- `configs/audioclip.py:partial` (the default): the ESC-50 protocol (protocols/audioclip-esc50.json). Only the
  audio tower and its two logit scales train (the released "Partial" checkpoint's regime); batches carry clips
  and their labels as text, no images; SGD 5e-5 with Nesterov momentum 0.9, weight decay 5e-4 (none on the fbsp
  front end and the scales), the rate times 0.96 after each epoch, 50 epochs of ESC-50's 1,600 training clips (folds
  2 to 5; fold 1 is the test fold). `:us8k` is UrbanSound8K's protocol: 4 s stereo clips, lr 1e-5, folds 2 to 10.
- `configs/audioclip.py:full`: every tower trains (the "Full" checkpoint's regime) on records that carry a clip,
  an image and a caption each (AudioSet's video frames with their labels); the reference releases no script for
  it, so the optimizer is the protocol's.

    python -m clip_jax.input.convert_audio --meta=ESC-50/meta/esc50.csv --audio_dir=ESC-50/audio --out=/data/esc50
    python -m clip_jax.train --config=configs/audioclip.py --workdir=/tmp/audioclip \
        --config.init_from=/data/audioclip_partial.msgpack

init_from: a weights file of the method's params, e.g. the reference's AudioCLIP-Partial-Training.pt converted
with `python -m clip_jax.convert_audioclip` (docs/audio.md).
"""

from clip_jax.config import base_config

PROTOCOLS = {  # (folder, clip samples at 44.1 kHz, channels, lr, training clips)
    "esc50": ("/data/esc50", 220_500, 1, 5e-5, 1600),
    "us8k": ("/data/us8k", 176_400, 2, 1e-5, 7895),
}


def get_config(arg: str = "partial"):
    if arg not in ("partial", "us8k", "full"):
        raise ValueError(f"configs/audioclip.py:{arg}: use partial, us8k or full")
    folder, samples, channels, lr, clips = PROTOCOLS["us8k" if arg == "us8k" else "esc50"]
    c = base_config()
    c.method = "audioclip"
    c.model = "RN50-quickgelu"  # OpenAI's RN50, as AudioCLIP builds it
    c.audioclip.audio_tower = "esresnext-fbsp"
    c.init_params = ".*"
    c.batch_size = 64
    epochs, per_epoch = 50, clips // 64
    c.total_steps = epochs * per_epoch
    c.log_every_steps = 25
    c.eval_every_steps = per_epoch * 5
    c.checkpoint_every_steps = per_epoch * 5
    o = c.optim
    o.optimizer, o.momentum, o.nesterov = "sgd", 0.9, True
    o.learning_rate, o.weight_decay, o.weight_decay_on = lr, 5e-4, "all"
    o.schedule, o.decay_factor, o.schedule_every_steps, o.warmup_steps = "exponential", 0.96, per_epoch, 0
    o.grad_clip_norm = 0.0
    d = c.data
    d.audio_rate, d.audio_samples, d.audio_channels = 44_100, samples, channels
    d.label_keys = ("label",)
    if arg == "full":
        c.audioclip.modalities = ("audio", "image", "text")
        d.train = "tfrecord:/data/audioset/train-*.tfrecord"  # records with 'image', 'audio' and 'caption'
        d.eval = "zero_shot_audio=tfrecord:/data/esc50/fold1-*.tfrecord"
    else:
        c.optim.frozen = "visual/.*|text/.*|logit_scale"
        c.audioclip.modalities = ("audio", "text")  # the labels as text, no images
        last = 10 if arg == "us8k" else 5
        d.train = "tfrecord:" + ",".join(f"{folder}/fold{k}-*.tfrecord" for k in range(2, last + 1))
        d.eval = f"zero_shot_audio={'tfrecord:' + folder}/fold1-*.tfrecord"
    return c
