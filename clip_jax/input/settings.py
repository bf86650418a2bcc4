"""Every data setting and its default, in one place: the base config's `data` section is built
from these, and the readers take a run's settings through `data_settings`."""

from __future__ import annotations

from typing import Any, Mapping, Optional

SHAPES_SIZES = {"train": 20000, "validation": 1000, "test": 1000}
SCENES_SIZES = {"train": 10000, "validation": 500, "test": 500}  # shapes_scenes (clip_jax.input.shapes_scenes)
VIDEO_SIZES = {"train": 5000, "validation": 500, "test": 500}  # shapes_video (clip_jax.input.shapes_video)

DEFAULTS: dict[str, Any] = {
    "train": "",  # 'shapes[:SPLIT]', 'tfds:NAME[/CONFIG][:SPLIT]' or 'tfrecord:GLOB[,GLOB...]'
    "eval": "",  # TASK=DATA[|key=value...], comma-separated (clip_jax/evaluate/evaluator.py)
    "streams": 0,  # data streams of the job; 0 = one per process
    "image_key": "image",
    "caption_key": "",  # '' = 'caption' for training, auto-detected for evaluation
    "label_keys": (),  # integer features carried into the batches
    "image_dtype": "float32",  # 'uint8' normalizes on the device
    "crop": "random_resized",  # or 'random' (resize the shorter side, random square crop)
    "crop_scale": (0.9, 1.0),
    "resize_method": "bicubic",
    "antialias": False,
    "shuffle_buffer": 10_000,
    "threads": 0,  # tf.data's private thread pool; 0 = shared
    "prefetch": 2,  # host batches tf.data prepares ahead
    # A training stream stops with an error after this many bad records in a row (0: never), as it
    # does after a whole pass over its files without one usable example.
    "max_bad_in_a_row": 100_000,
    "data_dir": "",  # tfds data_dir
    "cache_dir": "",  # the shapes dataset's cache; '' = ~/.cache/clip_jax
    "shapes_seed": 0,
    "shapes_image_size": 64,
    "shapes_sizes": dict(SHAPES_SIZES),
    "shapes_shards": {},
    "scenes_sizes": dict(SCENES_SIZES),
    "video_sizes": dict(VIDEO_SIZES),
    # audio clips (clip_jax.input.audio): the op's defaults and evaluation's clip (ESC-50's 5 s at 44.1 kHz, mono)
    "audio_rate": 44_100,
    "audio_samples": 220_500,
    "audio_channels": 1,
    # the embedded datasets' synthesized sounds (clip_jax.input.sounds): their rate and length
    "sounds_rate": 16_000,
    "sounds_seconds": 1.0,
    # video clips (clip_jax.input.video): the frames op's default T and evaluation's clip
    "video_frames": 8,
}


# Settings that are free-form {name: value} mappings: a saved config's value replaces the default whole.
MAPPINGS = ("shapes_sizes", "shapes_shards", "scenes_sizes", "video_sizes")

# The numeric data settings' ranges (clip_jax.config.check_ranges' form), for every config with a data section.
RANGES = {"streams": (">=", 0), "shuffle_buffer": (">=", 1), "threads": (">=", 0), "prefetch": (">=", 1),
          "max_bad_in_a_row": (">=", 0), "shapes_seed": (">=", 0), "shapes_image_size": (">=", 8),
          "audio_rate": (">=", 1), "audio_samples": (">=", 1), "audio_channels": (">=", 1),
          "sounds_rate": (">=", 8500),  # the star's 9th partial of the highest note stays below Nyquist
          "sounds_seconds": (">", 0), "video_frames": (">=", 1)}


def check_mappings(data: Mapping, where: str = "config.data") -> None:
    """Each split's size of the embedded dataset a positive int: an error naming the key otherwise."""
    for key in ("shapes_sizes", "scenes_sizes", "video_sizes"):
        for split, n in dict(data.get(key) or {}).items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{where}.{key}.{split}={n!r} is out of range: it must be >= 1")


def data_settings(config: Optional[Mapping] = None) -> dict:
    """The defaults overlaid with `config` (a dict or ConfigDict); an unknown key is an error."""
    given = {} if config is None else dict(config.items())
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown data settings {unknown}: known are {', '.join(DEFAULTS)}")
    out = dict(DEFAULTS)
    out.update(given)
    for key in MAPPINGS:
        out[key] = dict(out[key].items()) if out[key] else {}
    return out
