"""Region embeddings as record features and batch keys: ViLD-image's distillation targets.

``python -m clip_jax.embed regions`` (clip_jax.input.region_embeds) writes new TFRecord shards,
each record the input record's features unchanged plus:

- ``regions/bbox`` float32 [P, 4]: the proposals, [ymin, xmin, ymax, xmax] in [0, 1] of the record's
  image (the convention of ``objects/bbox``), in proposal order (best first), P <= max_regions;
- ``regions/embeds`` float32 [P, E]: per proposal, the teacher's image embeddings of its crops at
  each scale (1x and 1.5x around its centre, clipped to the image), summed, then L2-normalized;
- ``regions/embed_dim`` int64 [1]: E, so a record without regions still says its width;

beside ``regions.json`` (MANIFEST: what made them). Read them with ``data.train='tfrecord:DIR/*'``
(a glob's JSON matches are no shards).

Training: a method declares

    BatchInput(key="regions", op="regions", reads=("regions/bbox", "regions/embeds"),
               options=(("max_regions", 32), ("embed_dim", E)))

and one declaration makes four batch keys, P = max_regions:

- ``regions`` float32 [B, P, 4]: (x1, y1, x2, y2) in pixels of the model's input, cropped and flipped
  exactly as the record's image (the transform of op 'boxes', clip_jax.input.detection);
- ``regions/embeds`` float32 [B, P, E]: the embeddings of those regions (zeros on padding);
- ``regions/valid`` bool [B, P]: a real region; padding and regions the crop leaves no area of are not;
- ``regions/counts`` int32 [B, 4]: regions dropped per record, by COUNTS (the stream sums them:
  InputPipeline.tallies()); ``overflow`` counts those past the first max_regions of a record.

A record whose embeddings do not line up with its boxes (not rows x embed_dim values) is skipped and
counted ``bad_regions``. The pipeline reads the first record of its files before it starts: a source
without these features, or of another embedding width than embed_dim, is an error naming the fix.
"""

from __future__ import annotations

import json
import os

from clip_jax.input import detection, ops
from clip_jax.input import features as features_lib
from clip_jax.input.features import Feature

BBOX, EMBEDS, EMBED_DIM = "regions/bbox", "regions/embeds", "regions/embed_dim"
READS = (BBOX, EMBEDS)
MANIFEST = "regions.json"
COUNTS = ("invalid", "clipped", "cropped", "overflow")
RULES = [detection.COUNTS.index(c) for c in COUNTS[:3]]  # where detection.transform's counts hold these
MAX_REGIONS = 32
COMMAND = ("python -m clip_jax.embed regions --data=SPEC --teacher=EXPORT (--workdir=VILD_RUN | --proposals=boxes) "
           "--out=DIR")


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


# -- record features (TFRecords only: no tfds dataset holds them) -------------------------------------
def _floats(name: str, width: int = 0) -> Feature:
    def value(parsed, r):
        dense = _tf().sparse.to_dense(parsed[name])
        return _tf().reshape(dense, [-1, width]) if width else dense

    return Feature(parse=lambda r: {name: _tf().io.VarLenFeature(_tf().float32)}, value=value,
                   empty=lambda r: _tf().zeros([0, width] if width else [0], _tf().float32))


features_lib.FEATURES.register(BBOX)(_floats(BBOX, 4))
features_lib.FEATURES.register(EMBEDS)(_floats(EMBEDS))  # flat [P * E]: the op knows E


def serialize(example_bytes: bytes, bbox, embeds) -> bytes:
    """A serialized tf.train.Example with the regions features added (replaced where it had them); its other
    features stay as they were."""
    import numpy as np

    tf = _tf()
    bbox = np.asarray(bbox, np.float32).reshape(-1, 4)
    embeds = np.asarray(embeds, np.float32)
    if embeds.ndim != 2 or len(embeds) != len(bbox):
        raise ValueError(f"region embeddings {embeds.shape} for {len(bbox)} boxes: want [{len(bbox)}, E]")
    ex = tf.train.Example.FromString(example_bytes)
    feature = ex.features.feature
    feature[BBOX].CopyFrom(tf.train.Feature(float_list=tf.train.FloatList(value=bbox.reshape(-1))))
    feature[EMBEDS].CopyFrom(tf.train.Feature(float_list=tf.train.FloatList(value=embeds.reshape(-1))))
    feature[EMBED_DIM].CopyFrom(tf.train.Feature(int64_list=tf.train.Int64List(value=[embeds.shape[1]])))
    return ex.SerializeToString(deterministic=True)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} holds no {MANIFEST}: write region embeddings with {COMMAND} (an "
                                "interrupted run writes none)")
    with open(path) as f:
        return json.load(f)


# -- the training op -------------------------------------------------------------------------------
def _keys(wanted: ops.Wanted) -> tuple:
    k = wanted.key
    return (k, f"{k}/embeds", f"{k}/valid", f"{k}/counts")


def _int_option(wanted: ops.Wanted, name: str, what: str, default=None) -> int:
    v = wanted.option(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"batch key {wanted.key!r}: op 'regions' needs {name} an int >= 1 ({what}), got {v!r}")
    return v


def _validate(wanted: ops.Wanted) -> None:
    if tuple(wanted.reads) != READS:
        raise ValueError(f"batch key {wanted.key!r}: op 'regions' reads {READS}, not {wanted.reads!r}")
    _int_option(wanted, "max_regions", "the padded region count", MAX_REGIONS)
    _int_option(wanted, "embed_dim", "the width of the records' region embeddings, the teacher's")
    v = wanted.option("min_visible", 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"batch key {wanted.key!r}: min_visible must be a fraction in [0, 1], got {v!r}")


def _lined_up(embeds, bbox, e: int):
    tf = _tf()
    return tf.equal(tf.size(embeds, out_type=tf.int64), tf.cast(tf.shape(bbox)[0], tf.int64) * e)


def _make(ctx: ops.OpContext, ex: dict, wanted: ops.Wanted):
    tf = _tf()
    p, e = int(wanted.option("max_regions", MAX_REGIONS)), int(wanted.option("embed_dim"))
    bbox = ex[BBOX]
    n = tf.shape(bbox)[0]
    embeds = tf.reshape(ex[EMBEDS], [n, e])
    boxes, kept, counts = detection.transform(bbox, tf.zeros([n], tf.bool), ex["image"], ctx.image_size, ctx.train,
                                              ctx.seed(ops.CROP_SALT), ctx.config,
                                              float(wanted.option("min_visible", 0.0)))
    size = float(ctx.image_size)
    boxes = tf.cond(detection.flipped(ctx, wanted),
                    lambda: tf.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], -1),
                    lambda: boxes)
    index = tf.cast(tf.where(kept)[:, 0], tf.int32)
    overflow = tf.maximum(tf.size(index) - p, 0)
    index = index[:p]
    pad = p - tf.size(index)
    k = wanted.key
    return {
        k: tf.ensure_shape(tf.concat([tf.gather(boxes, index), tf.zeros([pad, 4])], 0), [p, 4]),
        f"{k}/embeds": tf.ensure_shape(tf.concat([tf.gather(embeds, index), tf.zeros([pad, e])], 0), [p, e]),
        f"{k}/valid": tf.ensure_shape(tf.range(p) < tf.size(index), [p]),
        f"{k}/counts": tf.concat([tf.gather(counts, RULES), [overflow]], 0),  # no crowd or excluded rule here
    }


def _blank(ctx: ops.OpContext, wanted: ops.Wanted):
    tf = _tf()
    p, e, k = int(wanted.option("max_regions", MAX_REGIONS)), int(wanted.option("embed_dim")), wanted.key
    return {k: tf.zeros([p, 4]), f"{k}/embeds": tf.zeros([p, e]), f"{k}/valid": tf.zeros([p], tf.bool),
            f"{k}/counts": tf.zeros([len(COUNTS)], tf.int32)}


def _bad_regions(picked: dict, wanted: ops.Wanted):
    return ~_lined_up(picked[EMBEDS], picked[BBOX], int(wanted.option("embed_dim")))


def probe(files, wanted: ops.Wanted) -> None:
    """Before a stream starts: its first record holds region embeddings of the key's width, else an error naming
    the command that writes them. files None: a tfds source, which cannot hold them."""
    if files is None:
        raise ValueError(f"batch key {wanted.key!r} reads region embeddings, which are TFRecord features: write them "
                         f"with {COMMAND} and train on data.train='tfrecord:DIR/*'")
    tf = _tf()
    first = None
    for path in files:
        ds = tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
        first = next(iter(ds.take(1)), None)
        if first is not None:
            break
    if first is None:
        return  # no record at all: the stream's own error says so
    feature = tf.train.Example.FromString(first.numpy()).features.feature
    missing = [name for name in (BBOX, EMBEDS, EMBED_DIM) if name not in feature]
    if missing:
        raise ValueError(f"batch key {wanted.key!r} reads region embeddings, but the records of {files[0]!r} hold no "
                         f"{', '.join(missing)}: write them with {COMMAND} and train on data.train='tfrecord:DIR/*'")
    width, want = int(feature[EMBED_DIM].int64_list.value[0]), int(wanted.option("embed_dim"))
    if width != want:
        raise ValueError(f"batch key {wanted.key!r} wants region embeddings of width embed_dim={want}, but "
                         f"{files[0]!r} holds width {width} (its teacher's): embed again with a teacher of width "
                         f"{want}, or train a model of embedding width {width}")


ops.OPS.register("regions")(ops.Op(
    "record", _make, _blank, needs=("image",), checks=(("bad_regions", _bad_regions),), joint=True,
    validate=_validate, makes=_keys, probe=probe,
    tallies=lambda w: {f"{w.key}/counts": tuple(f"{w.key}/{c}" for c in COUNTS)}))
