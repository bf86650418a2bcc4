"""Video clips as a record feature and a batch key (CLIP4Clip's and ActionCLIP's input).

Record feature ``frames``: a clip as a list of encoded frames (PNG or JPEG bytes, in time order), with
``frames/count`` beside it (how many were stored; the readers go by the list). clip_jax.input.shapes_video
and clip_jax.input.convert_video write them (``records.serialize_clip``).

Batch key (training):

    BatchInput(key="frames", op="frames", reads=("frames",),
               options=(("frames", 8), ("sampling", "random"), ("flip", True)))

gives ``frames`` [B, T, S, S, 3] (the image op's dtype and normalization: data.image_dtype) and ``frame_mask``
int32 [B, T] (1 = a real frame; a key named otherwise gets KEY_mask). Options: ``frames`` T (default the data
setting video_frames), ``sampling`` 'uniform' (TSN's test indices: the centre of each of T equal segments;
evaluation's) or 'random' (TSN's training indices: one random frame in each of T segments of n // T frames;
the training default), ``flip`` (one left-right flip decision for the whole clip). Frames are sampled among
those whose bytes start as a PNG or a JPEG; a clip of n < T of them keeps all n in order, then zero frames
masked 0. The crop is the image op's (random resized crop, or crop='random', in training; shorter side resized
and centre crop at evaluation), one box for every frame of the clip, from the first decoded frame's geometry;
a frame of another size is resized to the first's before the crop. Draws come from the record's stateless
seeds: sampling VIDEO_SALT, crop CROP_SALT, flip FLIP_SALT.

Bad records (pipeline.BAD_KINDS), counted and skipped before any decode: no frames at all (missing_frames), no
frame with a PNG or JPEG signature (bad_frames). A sampled frame that does not decode is dropped and the clip's
real frames close up, masked; a clip none of whose sampled frames decodes fails its decode and is dropped,
counted as 'undecodable' like an image that does not decode. No clip is ever all padding.

Evaluation reads ``frames`` (the clip at video_frames, uniform, centre crop) and ``frame_mask`` (its mask) as
record features (eval_data.eval_batches(features=("frames", "frame_mask"))).
"""

from __future__ import annotations

import io

import numpy as np

from clip_jax.input import features as features_lib
from clip_jax.input import ops, records, transforms
from clip_jax.input.features import Feature
from clip_jax.input.settings import data_settings

FRAMES = records.FRAMES  # the record feature: encoded frames (records.serialize_clip writes it)
SAMPLINGS = ("uniform", "random")
_JPEG = b"\xff\xd8"


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


# -- records ------------------------------------------------------------------------------------------
def write_embedded_clips(prefix: str, n: int, image_size: int = 64, shards: int = 4, seed: int = 0) -> list:
    """Shards PREFIX-0000k-of-0000n.tfrecord of the first n train clips of the embedded video dataset (benchmarks
    and tests of records outside its cache); their paths."""
    import os

    from clip_jax.input import shapes_video

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with records.ShardWriter(prefix, shards) as writer:
        for i in range(n):
            writer.write(shapes_video.encoded(seed, "train", i, image_size))
    return list(writer.paths)


# -- sampling -----------------------------------------------------------------------------------
def sample_indices(n, frames: int, sampling: str, seed=None):
    """int32 [min(n, frames)] indices into n frames: 'uniform', int((k + 0.5) * n / frames) (TSN's test
    offsets); 'random', k * (n // frames) + U[0, n // frames) (TSN's training offsets, seed int64 [2]); n <
    frames: 0..n-1 (the clip is padded after them)."""
    tf = _tf()
    n = tf.cast(n, tf.int32)
    k = tf.range(frames, dtype=tf.int32)
    if sampling == "uniform":
        tick = tf.cast(n, tf.float64) / frames
        picked = tf.cast(tf.floor(tick * (tf.cast(k, tf.float64) + 0.5)), tf.int32)
    elif sampling == "random":
        segment = tf.maximum(n // frames, 1)
        picked = k * segment + tf.random.stateless_uniform([frames], seed, 0, segment, dtype=tf.int32)
    else:
        raise ValueError(f"sampling={sampling!r}: use one of {', '.join(SAMPLINGS)}")
    return tf.cond(n >= frames, lambda: picked, lambda: tf.range(n, dtype=tf.int32))


def signed(data):
    """bool [N]: which encoded frames start as a PNG or a JPEG (a cheap check: never decodes, never raises)."""
    tf = _tf()
    return (tf.equal(tf.strings.substr(data, 0, 8), transforms._PNG)
            | tf.equal(tf.strings.substr(data, 0, 2), _JPEG))


# -- decoding -----------------------------------------------------------------------------------
def decode_frames(data) -> tuple:
    """(uint8 [k, H, W, 3], bool [k]) of k encoded frames: each decoded to RGB, those of another size than the first
    decoded one resized to it (bilinear); a frame that does not decode is zeros and False. Raises ValueError where
    none decodes."""
    from PIL import Image

    decoded: list = []
    size = None
    for raw in np.asarray(data, object).reshape(-1):
        try:
            with Image.open(io.BytesIO(bytes(raw))) as image:
                image = image.convert("RGB")
        except Exception:  # noqa: BLE001  (any undecodable bytes: the frame is dropped, not the clip)
            decoded.append(None)
            continue
        size = size or image.size
        decoded.append(image if image.size == size else image.resize(size, Image.BILINEAR))
    if size is None:
        raise ValueError(f"bad video clip: none of its {len(decoded)} sampled frames decodes as an image")
    out = np.zeros((len(decoded), size[1], size[0], 3), np.uint8)
    for i, image in enumerate(decoded):
        if image is not None:
            out[i] = np.asarray(image)
    return out, np.array([image is not None for image in decoded])


def _decoded(data):
    """decode_frames inside the graph: (uint8 [k, H, W, 3] of the frames that decode, in order; their count)."""
    tf = _tf()
    pixels, ok = tf.numpy_function(decode_frames, [data], (tf.uint8, tf.bool), stateful=False)
    pixels = tf.ensure_shape(pixels, [None, None, None, 3])
    ok = tf.ensure_shape(ok, [None])
    return tf.boolean_mask(pixels, ok), tf.reduce_sum(tf.cast(ok, tf.int32))


def crop_frames(pixels, image_size: int, train: bool, seed, config):
    """uint8 [k, H, W, 3] -> float32 [k, S, S, 3] pixels in [0, 255]: the image op's crop (transforms.crop_pixels),
    one window for all frames."""
    tf = _tf()
    config = data_settings(config)
    method, antialias = config["resize_method"], bool(config["antialias"])
    shape = tf.shape(pixels)
    if train and config["crop"] == "random_resized":
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape[1:], tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=tuple(config["crop_scale"]), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        window = tf.slice(pixels, [0, begin[0], begin[1], 0], [-1, size[0], size[1], 3])
        out = tf.image.resize(window, [image_size, image_size], method=method, antialias=antialias)
    else:
        new_h, new_w = transforms._resized(shape[1:], image_size)
        out = tf.image.resize(pixels, [new_h, new_w], method=method, antialias=antialias or not train)
        if train:  # crop='random': one random square window of the resized frames
            out = tf.image.stateless_random_crop(out, [shape[0], image_size, image_size, 3], seed=seed)
        else:
            top, left = (new_h - image_size + 1) // 2, (new_w - image_size + 1) // 2
            out = tf.slice(out, [0, top, left, 0], [-1, image_size, image_size, 3])
    return tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 255.0)


def transform(data, frames: int, image_size: int, train: bool, sampling: str, flip: bool = False, seeds=None,
              config=None, dtype=None):
    """(frames [T, S, S, 3] as the image op's output, int32 mask [T]) of one clip's encoded frames (string [N]).
    seeds: {'sample', 'crop', 'flip'} int64 [2] each (training)."""
    tf = _tf()
    config = data_settings(config)
    dtype = dtype or {"float32": tf.float32, "bfloat16": tf.bfloat16, "uint8": tf.uint8}[config["image_dtype"]]
    seeds = seeds or {}
    candidates = tf.boolean_mask(data, signed(data))
    picked = tf.gather(candidates, sample_indices(tf.size(candidates), frames, sampling, seeds.get("sample")))
    pixels, real = _decoded(picked)
    out = crop_frames(pixels, image_size, train, seeds.get("crop"), config)
    if flip:  # one decision for the clip (stateless_random_flip_left_right would draw one per frame)
        flipped = tf.random.stateless_uniform([], seeds["flip"]) < 0.5
        out = tf.cond(flipped, lambda: tf.reverse(out, [2]), lambda: out)
    out = transforms.finish(out, image_size, config, leading=(None,))
    out = tf.cast(out, dtype) if out.dtype != dtype else out
    out = tf.concat([out, tf.zeros(tf.stack([frames - real, image_size, image_size, 3]), dtype)], 0)
    mask = tf.cast(tf.range(frames) < real, tf.int32)
    return tf.ensure_shape(out, [frames, image_size, image_size, 3]), mask


# -- the op ---------------------------------------------------------------------------------------
def mask_key(key: str) -> str:
    """The batch key of a clip key's frame mask: 'frame_mask' for 'frames', KEY_mask otherwise."""
    return "frame_mask" if key == FRAMES else f"{key}_mask"


def settings(wanted: ops.Wanted, ctx: ops.OpContext) -> tuple:
    """(frames, sampling, flip) of a key: its options, else video_frames and the mode's sampling."""
    frames = int(wanted.option("frames", data_settings(ctx.config)["video_frames"]))
    return frames, wanted.option("sampling", "random" if ctx.train else "uniform"), bool(wanted.option("flip", False))


def check_frames(frames, where: str) -> None:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"{where}: frames={frames!r} must be an integer >= 1 (the frames of a clip)")


def _validate(wanted: ops.Wanted) -> None:
    where = f"batch key {wanted.key!r} (op 'frames')"
    if tuple(wanted.reads) != (FRAMES,):
        raise ValueError(f"{where} reads ('frames',), not {wanted.reads!r}")
    unknown = sorted(set(dict(wanted.options)) - {"frames", "sampling", "flip"})
    if unknown:
        raise ValueError(f"{where} has no options {unknown}: it takes frames, sampling and flip")
    check_frames(wanted.option("frames", 1), where)
    if wanted.option("sampling", "uniform") not in SAMPLINGS:
        raise ValueError(f"{where}: sampling={wanted.option('sampling')!r}: use 'uniform' (evenly spaced) or "
                         "'random' (one random frame per segment)")


def _make(ctx: ops.OpContext, ex: dict, wanted: ops.Wanted):
    frames, sampling, flip = settings(wanted, ctx)
    seeds = ({"sample": ctx.seed(ops.VIDEO_SALT), "crop": ctx.seed(ops.CROP_SALT), "flip": ctx.seed(ops.FLIP_SALT)}
             if ctx.train else {})
    if not ctx.train and sampling == "random":  # no record seed outside training: a fixed one
        seeds = {"sample": _tf().constant([0, 0], _tf().int64), "flip": _tf().constant([0, 1], _tf().int64)}
    clip, mask = transform(ex[FRAMES], frames, ctx.image_size, ctx.train, sampling, flip, seeds, ctx.config,
                           ctx.dtype)
    return {wanted.key: clip, mask_key(wanted.key): mask}


def _blank(ctx: ops.OpContext, wanted: ops.Wanted):
    tf = _tf()
    frames, _, _ = settings(wanted, ctx)
    size = ctx.image_size
    return {wanted.key: tf.zeros([frames, size, size, 3], ctx.dtype), mask_key(wanted.key): tf.zeros([frames],
                                                                                                     tf.int32)}


ops.OPS.register("frames")(ops.Op("record", _make, _blank, validate=_validate,
                                  makes=lambda wanted: (wanted.key, mask_key(wanted.key))))


# -- the record features ----------------------------------------------------------------------------
def _eval_clip(value, config):
    config = data_settings(config)
    frames = config["video_frames"]
    check_frames(frames, "data setting video_frames")
    return frames, config


def _prepare_frames(value, image_bytes, image_size, config):
    """Evaluation's clip: video_frames frames, uniform, centre crop, unflipped."""
    frames, config = _eval_clip(value, config)
    return transform(value, frames, image_size, False, "uniform", config=config)[0]


def _prepare_mask(value, image_bytes, image_size, config):
    frames, config = _eval_clip(value, config)
    return transform(value, frames, image_size, False, "uniform", config=config)[1]


def _feature(prepare) -> Feature:
    tf = _tf
    return Feature(
        parse=lambda r: {FRAMES: tf().io.VarLenFeature(tf().string)},
        value=lambda parsed, r: tf().sparse.to_dense(parsed[FRAMES]),
        empty=lambda r: tf().zeros([0], tf().string),
        checks=(("missing_frames", lambda data: tf().equal(tf().size(data), 0)),
                ("bad_frames", lambda data: (tf().size(data) > 0) & tf().logical_not(tf().reduce_any(signed(data))))),
        prepare=prepare,
    )


features_lib.FEATURES.register(FRAMES)(_feature(_prepare_frames))
# the same record feature, read for evaluation's frame mask (the clip is decoded again: evaluation only)
features_lib.FEATURES.register("frame_mask")(_feature(_prepare_mask))
