"""Record features by name: how each raw feature of a record is read, whatever reads it.

A feature registered here (FEATURES) says where it sits in a tf.train.Example (its parse spec and
how its value comes out of the parse), where it sits in a tfds example, what it holds in a stream's
sentinels and end-of-epoch markers, and, for training, how one example's value is chosen (one
caption of several) and which bad-record kinds it flags. The reader (clip_jax.input.reader) builds
one parse from the features a consumer names; the ops (clip_jax.input.ops) turn the values into
batch keys. A new record feature is one registration here (or in the code that needs it):

    FEATURES.register("objects/shape")(Feature(
        parse=lambda r: {"objects/shape": tf.io.VarLenFeature(tf.int64)},
        value=lambda parsed, r: tf.sparse.to_dense(parsed["objects/shape"]),
        empty=lambda r: tf.zeros([0], tf.int64)))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from clip_jax.input import records
from clip_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Reading:
    """What locates the features of one source: the source (clip_jax.input.pipeline.Source), the data
    settings, the record feature (or tfds path) of its captions and the integer label features."""

    source: Any
    config: dict
    caption_key: Optional[str] = records.CAPTION
    label_keys: tuple = ()


@dataclasses.dataclass(frozen=True)
class Feature:
    """How one raw record feature is read. Every callable takes the Reading last (or alone)."""

    parse: Callable[[Reading], dict]  # {record key: tf.io feature} it adds to the one parse spec
    value: Callable[[dict, Reading], Any]  # the parsed example -> this feature's raw value
    empty: Callable[[Reading], Any]  # its value in a file-end sentinel or an end-of-epoch marker
    tfds: Optional[Callable[[dict, Reading], Any]] = None  # a tfds example -> its raw value (None: not in tfds)
    tfds_decoders: Callable[[Reading], dict] = lambda reading: {}  # {tfds path: decoder} (skip image decoding)
    # 'pixels' (an encoded image) or 'mask' (an encoded label map): a crop of the record applies to it too
    spatial: str = ""
    # training: (raw value, seed of the example, train) -> the example's value (one caption of several)
    pick: Optional[Callable[[Any, Any, bool], Any]] = None
    checks: tuple = ()  # ((bad kind in pipeline.BAD_KINDS, value -> bool tensor 'bad'), ...), on the picked value
    # evaluation: (raw value, the record's encoded image, image size, data settings) -> the value of one example at
    # the model's input size (a label map cropped as the image); None: the raw value as it is
    prepare: Optional[Callable] = None


# The raw features of records, by name (the names methods declare they read).
FEATURES: Registry[Feature] = Registry("record feature")


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


def get_path(ex, path: str):
    """A tfds example's value at 'a/b/c'."""
    for part in path.split("/"):
        ex = ex[part]
    return ex


def nested(flat: dict) -> dict:
    """{'a/b': v} -> {'a': {'b': v}} (tfds decoders are nested as its features)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _skip_decoding():
    import tensorflow_datasets as tfds

    return tfds.decode.SkipDecoding()


def _pick_caption(captions, seed, train: bool):
    """Training draws one of a record's captions per epoch (evaluation: the first), stripped."""
    tf = _tf()
    n = tf.shape(captions, out_type=tf.int64)[0]
    pick = (tf.random.stateless_uniform([], seed, 0, tf.maximum(n, 1), dtype=tf.int64) if train
            else tf.constant(0, tf.int64))
    return tf.strings.strip(
        tf.cond(n > 0, lambda: tf.gather(captions, tf.minimum(pick, n - 1)), lambda: tf.constant(""))
    )


def valid_utf8(s):
    tf = _tf()
    # Transcoding replaces each invalid byte sequence with U+FFFD: valid text comes back unchanged.
    replaced = tf.strings.unicode_transcode(s, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
    return tf.equal(replaced, s)


# -- image: the encoded file, decoded by the ops (a crop decodes only its window of a JPEG) ------
FEATURES.register("image")(Feature(
    parse=lambda r: {records.IMAGE: _tf().io.FixedLenFeature([], _tf().string, default_value="")},
    value=lambda parsed, r: parsed[records.IMAGE],
    empty=lambda r: _tf().constant(b""),
    tfds=lambda ex, r: get_path(ex, r.config["image_key"]),
    tfds_decoders=lambda r: {r.config["image_key"]: _skip_decoding()},
    spatial="pixels",
    checks=(("missing_image", lambda image: _tf().equal(_tf().strings.length(image), 0)),),
))

# -- key: the record's id (records.KEY), which names its predictions' files; TFRecords only (a tfds
# example is named by its position)
FEATURES.register("key")(Feature(
    parse=lambda r: {records.KEY: _tf().io.FixedLenFeature([], _tf().string, default_value="")},
    value=lambda parsed, r: parsed[records.KEY],
    empty=lambda r: _tf().constant(b""),
))

# -- caption: one or several per record, in the source's language (Reading.caption_key) ---------
FEATURES.register("caption")(Feature(
    parse=lambda r: {r.caption_key or records.CAPTION: _tf().io.VarLenFeature(_tf().string)},
    value=lambda parsed, r: _tf().sparse.to_dense(parsed[r.caption_key or records.CAPTION]),
    empty=lambda r: _tf().zeros([0], _tf().string),
    tfds=lambda ex, r: (_tf().reshape(get_path(ex, r.caption_key), [-1]) if r.caption_key
                        else _tf().zeros([0], _tf().string)),
    pick=_pick_caption,
    checks=(("empty_caption", lambda caption: _tf().equal(_tf().strings.length(caption), 0)),
            ("invalid_utf8_caption", lambda caption: _tf().logical_not(valid_utf8(caption)))),
))


# -- labels: the integer features Reading.label_keys, as int64 [K] (-1 where a record has none) ----
def _stack(values):
    tf = _tf()
    return tf.stack([tf.cast(v, tf.int64) for v in values]) if values else tf.zeros([0], tf.int64)


FEATURES.register("labels")(Feature(
    parse=lambda r: {k: _tf().io.FixedLenFeature([], _tf().int64, default_value=-1) for k in r.label_keys},
    value=lambda parsed, r: _stack([parsed[k] for k in r.label_keys]),
    empty=lambda r: _tf().zeros([len(r.label_keys)], _tf().int64),
    tfds=lambda ex, r: _stack([_tf().reshape(get_path(ex, k), []) for k in r.label_keys]),
))

# -- dense labels (the shapes records carry them; clip_jax.input.shapes) ---------------------
FEATURES.register("segmentation")(Feature(  # a PNG of each pixel's object index, 0 = background
    parse=lambda r: {"segmentation": _tf().io.FixedLenFeature([], _tf().string, default_value="")},
    value=lambda parsed, r: parsed["segmentation"],
    empty=lambda r: _tf().constant(b""),
    spatial="mask",
    checks=(("missing_mask", lambda mask: _tf().equal(_tf().strings.length(mask), 0)),),
))


def _objects(name: str, dtype: str, width: int = 0, tfds: bool = False) -> Feature:
    """A per-object feature: int64 [n] (or float32 [n, width]), empty where a record has no objects; tfds: also
    read from a tfds dataset's feature of that path (coco's objects/bbox)."""

    def value(parsed, r):
        dense = _tf().sparse.to_dense(parsed[name])
        return _tf().reshape(dense, [-1, width]) if width else dense

    def from_tfds(ex, r):
        return _tf().reshape(_tf().cast(get_path(ex, name), getattr(_tf(), dtype)), [-1, width] if width else [-1])

    return Feature(
        parse=lambda r: {name: _tf().io.VarLenFeature(getattr(_tf(), dtype))},
        value=value,
        empty=lambda r: _tf().zeros([0, width] if width else [0], getattr(_tf(), dtype)),
        tfds=from_tfds if tfds else None,
    )


FEATURES.register("objects/color")(_objects("objects/color", "int64"))
FEATURES.register("objects/shape")(_objects("objects/shape", "int64"))
# [ymin, xmin, ymax, xmax] in [0, 1] of the image (tfds coco's objects/bbox too)
FEATURES.register("objects/bbox")(_objects("objects/bbox", "float32", 4, tfds=True))
FEATURES.register("objects/phrase_span")(_objects("objects/phrase_span", "int64", 2))  # [start, end) in the caption


def resolve(names) -> list[tuple[str, Feature]]:
    """[(name, Feature)] of feature names, in order, each once; an unknown name fails naming the known ones."""
    out, seen = [], set()
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append((name, FEATURES.get(name)))
    return out
