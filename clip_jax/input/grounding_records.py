"""Grounding records (a caption, boxes, the caption's phrase of each box) as evaluation features.

Records hold ``caption`` (the English caption, records.CAPTION), ``objects/bbox`` [n, 4] = [ymin, xmin, ymax,
xmax] in [0, 1] and ``objects/phrase_span`` [n, 2], each box's [start, end) characters in that caption ((-1, -1):
a box of no phrase). shapes_scenes writes them, and so does clip_jax.input.convert_grounding for
Flickr30k-Entities-style annotations (one record per sentence, one row per (phrase, box) pair).

- ``phrases/caption``: the record's first ``caption`` as one string (the spans index it, whatever caption
  language a spec reads elsewhere).
- ``phrases/boxes``: tf.io.serialize_tensor of float32 [n, 7] = (x1, y1, x2, y2 in the record's own pixels,
  uncropped and clipped to the image; span start, end; 1 where the box passes op 'boxes' rule 1 (finite, not
  inverted, not empty, not wholly outside), else 0), read with ``read_phrase_boxes``. A record whose span count
  differs from its box count (spans missing or corrupt) gets (-1, -1) spans: boxes of no phrase.
"""

from __future__ import annotations

import numpy as np

from clip_jax.input import features as features_lib
from clip_jax.input import records
from clip_jax.input.detection import transform
from clip_jax.input.features import Feature
from clip_jax.input.reader import example_spec

READS = ("objects/bbox", "objects/phrase_span")


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


def _first_caption(parsed, r):
    tf = _tf()
    captions = tf.sparse.to_dense(parsed[records.CAPTION])
    return tf.cond(tf.size(captions) > 0, lambda: captions[0], lambda: tf.constant(""))


features_lib.FEATURES.register("phrases/caption")(Feature(
    parse=lambda r: {records.CAPTION: _tf().io.VarLenFeature(_tf().string)},
    value=_first_caption,
    empty=lambda r: _tf().constant(""),
))


def _prepare(value, image_bytes, image_size, config):
    tf = _tf()
    bbox = tf.reshape(tf.cast(value["objects/bbox"], tf.float32), [-1, 4])
    n = tf.shape(bbox)[0]
    spans = tf.reshape(tf.cast(value["objects/phrase_span"], tf.float32), [-1, 2])
    spans = tf.cond(tf.equal(tf.shape(spans)[0], n), lambda: spans, lambda: tf.fill([n, 2], -1.0))
    boxes, kept, _ = transform(bbox, tf.zeros([n], tf.bool), image_bytes, None, False, None, config)
    rows = tf.concat([boxes, spans, tf.cast(kept, tf.float32)[:, None]], 1)
    return tf.io.serialize_tensor(rows)


_parts = {name: features_lib.FEATURES.get(name) for name in READS}
features_lib.FEATURES.register("phrases/boxes")(Feature(
    parse=lambda r: example_spec(READS, r),
    value=lambda parsed, r: {name: f.value(parsed, r) for name, f in _parts.items()},
    empty=lambda r: {name: f.empty(r) for name, f in _parts.items()},
    prepare=_prepare,
))


def read_phrase_boxes(serialized: bytes) -> dict:
    """An evaluation example's ``phrases/boxes`` -> {boxes float32 [n, 4] (x1, y1, x2, y2) in the record's pixels,
    spans int64 [n, 2], valid bool [n]}."""
    rows = _tf().io.parse_tensor(serialized, _tf().float32).numpy().reshape(-1, 7)
    return {"boxes": rows[:, :4], "spans": np.rint(rows[:, 4:6]).astype(np.int64), "valid": rows[:, 6] > 0}
