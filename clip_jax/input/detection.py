"""Boxes as batch keys: each record's object boxes, padded to a fixed count, cropped and flipped with
their image.

Training: a method declares

    BatchInput(key="boxes", op="boxes", reads=("objects/bbox", "objects/shape", "objects/color"),
               options=(("labels", "shape"), ("max_objects", 16)))

and one declaration makes five batch keys (ops.Op.makes), M = max_objects:

- ``boxes`` float32 [B, M, 4]: (x1, y1, x2, y2) in pixels of the model's input (0..S, x to the right,
  y down; a box covering the whole input is (0, 0, S, S)), as clip_jax.models.box_ops and torchvision;
- ``boxes/labels`` int32 [B, M]: the class of each box, 0-based in the label set's class list
  (``shapes.class_names(labels)``; for labels="record", the converter's contiguous indices, its
  classes JSON); -1 on padding;
- ``boxes/valid`` bool [B, M]: a real box (padding is all-zero boxes);
- ``boxes/index`` int32 [B, M]: which of the record's objects each box is (-1 on padding), to match
  per-object features (phrase spans, region embeddings keyed by record);
- ``boxes/counts`` int32 [B, 6]: what the rules below did to the record's boxes, by COUNTS; the
  stream sums them over the records it yields (InputPipeline.tallies(): ``boxes/invalid``, ...).

A method lists the keys it needs in batch_keys (``boxes``, ``boxes/labels``, ``boxes/valid``); the
others stay on the host. Records keep boxes as ``objects/bbox`` [n, 4] = [ymin, xmin, ymax, xmax] in [0, 1]
of the image (shapes, shapes_scenes, convert_detection's records, tfds ``coco``). With labels "shape",
"color" or "combo" the classes come from ``objects/shape`` and ``objects/color``; with labels="record"
from ``objects/label`` (reads ``("objects/bbox", "objects/label")``, option ``num_classes=C`` required).
Adding ``objects/is_crowd`` to the reads drops crowd boxes (COCO's ``iscrowd``).

Geometry: a box takes exactly its image's crop (ops 'crop': the same random resized crop window, whose
area range ``data.crop_scale`` is the scale jitter; or the random square crop of the resized image;
evaluation's resize and center crop) and the same flip (ops.resolve gives the key the 'crop' keys'
flip option). Rules, in order (each counted in ``boxes/counts``):

1. ``invalid``: a box with a NaN or infinite coordinate, inverted (ymin >= ymax or xmin >= xmax), of
   zero area, or wholly outside the image: dropped.
2. ``clipped``: a box partly outside the image: clipped to it and kept.
3. ``crowd``: a crowd box (only where the key reads objects/is_crowd): dropped.
3b. ``excluded``: a box whose class is in the option ``exclude`` (class indices; open-vocabulary training
   holds the novel classes' boxes out of every batch): dropped.
4. ``cropped``: a box whose part inside the crop window is empty or smaller than ``min_visible``
   (option, default 0.0) of its area before the crop: dropped; the others are clipped to the window.
5. ``overflow``: boxes past the first ``max_objects`` (default 100) of those left, in record order:
   dropped.

A record whose objects do not line up (objects/bbox rows, labels and crowd flags of different counts)
or whose labels fall outside the class list (a shape or colour shapes does not have; a record label
outside 0..num_classes-1) is skipped and counted ``bad_boxes`` in the pipeline's bad records. Nothing
here produces a NaN: non-finite coordinates are rule 1.

Evaluation reads ``boxes/shape``, ``boxes/color``, ``boxes/combo`` or ``boxes/record``: per example a
string, tf.io.serialize_tensor of float32 [k, 6] = (x1, y1, x2, y2 in the record's own pixels, uncropped;
class index; crowd 0/1) after rules 1 and 2 (read it with ``read_boxes``), beside ``image/size`` int32
[2] (height, width of the record's image). A record with labels outside the class list fails its
decode there: skipped with a warning, like a bad mask.
"""

from __future__ import annotations

from clip_jax.input import features as features_lib
from clip_jax.input import ops, segmentation, shapes
from clip_jax.input.features import Feature, get_path
from clip_jax.input.reader import example_spec
from clip_jax.input.transforms import _image_shape, _resized, _window

RECORD = "record"
LABEL_SETS = segmentation.LABEL_SETS + (RECORD,)
SHAPE_READS = ("objects/bbox", "objects/shape", "objects/color")
RECORD_READS = ("objects/bbox", "objects/label")
CROWD = "objects/is_crowd"
COUNTS = ("invalid", "clipped", "crowd", "excluded", "cropped", "overflow")  # the entries of boxes/counts, by rule
MAX_OBJECTS = 100  # COCO's detections per image


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


# -- geometry -----------------------------------------------------------------------------------
def geometry(image_bytes, image_size, train: bool, seed, config):
    """(scale_y, scale_x, top, left, height, width): a point (y, x) in the record image's pixels lands at
    (y * scale_y - top, x * scale_x - left) in the model's input, as transforms.crop_pixels crops the image
    with this seed (image_size None: the record's own pixels)."""
    tf = _tf()
    shape = _image_shape(image_bytes)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    if image_size is None:
        return 1.0, 1.0, 0.0, 0.0, h, w
    size = float(image_size)
    if train and config["crop"] == "random_resized":
        begin, extent = _window(image_bytes, seed, config)
        sy, sx = size / tf.cast(extent[0], tf.float32), size / tf.cast(extent[1], tf.float32)
        return sy, sx, tf.cast(begin[0], tf.float32) * sy, tf.cast(begin[1], tf.float32) * sx, h, w
    new_h, new_w = _resized(shape, image_size)
    if train:  # the offsets tf.image.stateless_random_crop draws for an [h, w, c] image with this seed
        limit = tf.stack([new_h - image_size + 1, new_w - image_size + 1, 1])
        offset = tf.random.stateless_uniform([3], seed, maxval=tf.int32.max, dtype=tf.int32) % limit
        top, left = offset[0], offset[1]
    else:
        top, left = (new_h - image_size + 1) // 2, (new_w - image_size + 1) // 2
    return (tf.cast(new_h, tf.float32) / h, tf.cast(new_w, tf.float32) / w, tf.cast(top, tf.float32),
            tf.cast(left, tf.float32), h, w)


def transform(bbox, crowd, image_bytes, image_size, train: bool, seed, config, min_visible: float = 0.0,
              excluded=None):
    """Rules 1-4 on one record's boxes: (boxes float32 [n, 4] (x1, y1, x2, y2) in the model's input pixels
    (image_size None: the record's), kept bool [n], counts int32 [5] (invalid, clipped, crowd, excluded, cropped)).
    excluded: bool [n], the boxes of classes held out (rule 3b), or None."""
    tf = _tf()
    bbox = tf.reshape(tf.cast(bbox, tf.float32), [-1, 4])
    finite = tf.reduce_all(tf.math.is_finite(bbox), -1)
    raw = tf.where(finite[:, None], bbox, 0.0)  # no NaN travels on, even in a dropped row
    inside = tf.clip_by_value(raw, 0.0, 1.0)
    ymin, xmin, ymax, xmax = tf.unstack(inside, axis=-1)
    ok = finite & (raw[:, 0] < raw[:, 2]) & (raw[:, 1] < raw[:, 3]) & (ymin < ymax) & (xmin < xmax)
    clipped = ok & tf.reduce_any(tf.not_equal(inside, raw), -1)
    sy, sx, top, left, h, w = geometry(image_bytes, image_size, train, seed, config)
    x1, x2 = xmin * w * sx - left, xmax * w * sx - left
    y1, y2 = ymin * h * sy - top, ymax * h * sy - top
    excluded = tf.zeros_like(ok) if excluded is None else excluded
    live = ok & ~crowd & ~excluded
    if image_size is None:
        boxes, survives = tf.stack([x1, y1, x2, y2], -1), tf.ones_like(ok)
    else:
        size = float(image_size)
        c = [tf.clip_by_value(v, 0.0, size) for v in (x1, y1, x2, y2)]
        visible = (c[2] - c[0]) * (c[3] - c[1])
        survives = (c[2] > c[0]) & (c[3] > c[1]) & (visible >= min_visible * (x2 - x1) * (y2 - y1))
        boxes = tf.stack(c, -1)
    count = lambda m: tf.reduce_sum(tf.cast(m, tf.int32))  # noqa: E731
    counts = tf.stack([count(~ok), count(clipped), count(ok & crowd), count(ok & ~crowd & excluded),
                       count(live & ~survives)])
    return boxes, live & survives, counts


def flipped(ctx: ops.OpContext, wanted: ops.Wanted):
    """Whether ops.flip flips this record (the decision of stateless_random_flip_left_right, read off a probe)."""
    tf = _tf()
    probe = tf.reshape(tf.constant([0.0, 1.0]), [1, 2, 1])
    return ops.flip(ctx, probe, wanted)[0, 0, 0] > 0.5


# -- the training op ------------------------------------------------------------------------
def _labels(wanted: ops.Wanted) -> str:
    return str(wanted.option("labels", "shape"))


def _max_objects(wanted: ops.Wanted) -> int:
    return int(wanted.option("max_objects", MAX_OBJECTS))


def _keys(wanted: ops.Wanted) -> tuple:
    k = wanted.key
    return (k, f"{k}/labels", f"{k}/valid", f"{k}/index", f"{k}/counts")


def _validate(wanted: ops.Wanted) -> None:
    labels = _labels(wanted)
    if labels not in LABEL_SETS:
        raise ValueError(f"batch key {wanted.key!r}: unknown box label set {labels!r}: use one of "
                         f"{', '.join(LABEL_SETS)}")
    want = RECORD_READS if labels == RECORD else SHAPE_READS
    if set(wanted.reads) - {CROWD} != set(want) or len(set(wanted.reads)) != len(wanted.reads):
        raise ValueError(f"batch key {wanted.key!r}: op 'boxes' with labels={labels!r} reads {want} (and "
                         f"{CROWD!r} to drop crowd boxes), not {wanted.reads!r}")
    m = wanted.option("max_objects", MAX_OBJECTS)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"batch key {wanted.key!r}: max_objects must be an int >= 1 (the padded box count), "
                         f"got {m!r}")
    v = wanted.option("min_visible", 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"batch key {wanted.key!r}: min_visible must be a fraction in [0, 1] (of a box's area "
                         f"left inside the crop), got {v!r}")
    exclude = wanted.option("exclude", ())
    if not isinstance(exclude, (tuple, list)) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0
                                                    for c in exclude):
        raise ValueError(f"batch key {wanted.key!r}: exclude must be a tuple of class indices (0-based in the label "
                         f"set's class list) whose boxes are dropped, got {exclude!r}")
    if labels == RECORD:
        n = wanted.option("num_classes")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"batch key {wanted.key!r}: labels='record' needs num_classes=C (the class count of "
                             f"the records' objects/label, the converter's classes JSON), got {n!r}")


def _classes(ex: dict, labels: str):
    tf = _tf()
    if labels == RECORD:
        return ex["objects/label"]
    return segmentation.object_classes(tf.cast(ex["objects/shape"], tf.int64), tf.cast(ex["objects/color"], tf.int64),
                                       labels)


def _crowd(ex: dict, n):
    """bool [n]: the crowd flags where the record has them (the key reads objects/is_crowd), else none."""
    tf = _tf()
    if CROWD not in ex:
        return tf.zeros([n], tf.bool)
    c = ex[CROWD]
    return tf.cond(tf.equal(tf.size(c), n), lambda: tf.not_equal(c, 0), lambda: tf.zeros([n], tf.bool))


def object_classes(ex: dict, wanted: ops.Wanted):
    """int32 [n]: the record's objects' classes in the declaration's label set."""
    return _tf().cast(_classes(ex, _labels(wanted)), _tf().int32)


def excluded_objects(classes, wanted: ops.Wanted):
    """bool [n]: the objects (of object_classes) whose class is in the option ``exclude`` (rule 3b), or None
    without one."""
    tf = _tf()
    exclude = tuple(wanted.option("exclude", ()))
    if not exclude:
        return None
    return tf.reduce_any(tf.equal(classes[:, None], tf.constant(exclude, tf.int32)[None, :]), -1)


def _make(ctx: ops.OpContext, ex: dict, wanted: ops.Wanted, exclude_now=None):
    """The keys of one record; exclude_now (a bool tensor, None: True) says whether rule 3b applies to it (GLIP's
    grounding records keep every class)."""
    tf = _tf()
    m = _max_objects(wanted)
    bbox = ex["objects/bbox"]
    n = tf.shape(bbox)[0]
    crowd = _crowd({k: v for k, v in ex.items() if k in wanted.reads}, n)
    classes = object_classes(ex, wanted)
    excluded = excluded_objects(classes, wanted)
    if excluded is not None and exclude_now is not None:
        excluded = excluded & exclude_now
    boxes, kept, counts = transform(bbox, crowd, ex["image"], ctx.image_size, ctx.train, ctx.seed(ops.CROP_SALT),
                                    ctx.config, float(wanted.option("min_visible", 0.0)), excluded)
    size = float(ctx.image_size)
    boxes = tf.cond(flipped(ctx, wanted),
                    lambda: tf.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], -1),
                    lambda: boxes)
    index = tf.cast(tf.where(kept)[:, 0], tf.int32)
    overflow = tf.maximum(tf.size(index) - m, 0)
    index = index[:m]
    pad = m - tf.size(index)
    classes = tf.gather(classes, index)
    k = wanted.key
    return {
        k: tf.ensure_shape(tf.concat([tf.gather(boxes, index), tf.zeros([pad, 4])], 0), [m, 4]),
        f"{k}/labels": tf.ensure_shape(tf.concat([classes, tf.fill([pad], -1)], 0), [m]),
        f"{k}/valid": tf.ensure_shape(tf.range(m) < tf.size(index), [m]),
        f"{k}/index": tf.ensure_shape(tf.concat([index, tf.fill([pad], -1)], 0), [m]),
        f"{k}/counts": tf.concat([counts, [overflow]], 0),
    }


def _blank(ctx: ops.OpContext, wanted: ops.Wanted):
    tf = _tf()
    m, k = _max_objects(wanted), wanted.key
    return {k: tf.zeros([m, 4]), f"{k}/labels": tf.fill([m], -1), f"{k}/valid": tf.zeros([m], tf.bool),
            f"{k}/index": tf.fill([m], -1), f"{k}/counts": tf.zeros([len(COUNTS)], tf.int32)}


def known_labels(objects: dict, labels: str, num_classes=None):
    """Whether a record's objects line up (as many labels and crowd flags, if any, as boxes) and every label is in
    the class list: a bool tensor that never raises (it runs on every record, sentinels too)."""
    tf = _tf()
    n = tf.shape(objects["objects/bbox"], out_type=tf.int64)[0]
    if labels == RECORD:
        label = objects["objects/label"]
        ok = tf.equal(tf.size(label, out_type=tf.int64), n) & tf.reduce_all(label >= 0)
        if num_classes:
            ok = ok & tf.reduce_all(label < num_classes)
    else:
        shape_ids = objects["objects/shape"]
        ok = tf.equal(tf.size(shape_ids, out_type=tf.int64), n) & segmentation._known_objects(
            shape_ids, objects["objects/color"])
    if CROWD in objects:
        crowd = tf.size(objects[CROWD], out_type=tf.int64)
        ok = ok & ((crowd == 0) | (crowd == n))
    return ok


def _bad_boxes(picked: dict, wanted: ops.Wanted):
    objects = {name: picked[name] for name in wanted.reads}
    return ~known_labels(objects, _labels(wanted), wanted.option("num_classes"))


ops.OPS.register("boxes")(ops.Op(
    "record", _make, _blank, needs=("image",), checks=(("bad_boxes", _bad_boxes),), joint=True, validate=_validate,
    makes=_keys, tallies=lambda w: {f"{w.key}/counts": tuple(f"{w.key}/{c}" for c in COUNTS)}))


# -- record features --------------------------------------------------------------------------
def _per_object(name: str, tfds_path: str) -> Feature:
    """An int64 [n] per-object feature, read from TFRecords or a tfds dataset's `tfds_path` (empty: none)."""
    return Feature(
        parse=lambda r: {name: _tf().io.VarLenFeature(_tf().int64)},
        value=lambda parsed, r: _tf().sparse.to_dense(parsed[name]),
        empty=lambda r: _tf().zeros([0], _tf().int64),
        tfds=((lambda ex, r: _tf().cast(_tf().reshape(get_path(ex, tfds_path), [-1]), _tf().int64)) if tfds_path
              else None),
    )


features_lib.FEATURES.register("objects/label")(_per_object("objects/label", "objects/label"))  # class index
features_lib.FEATURES.register(CROWD)(_per_object(CROWD, CROWD))  # 1 = a crowd region (COCO's iscrowd)
# LVIS: the classes not exhaustively annotated in the image, and those verified absent (contiguous indices)
features_lib.FEATURES.register("lvis/not_exhaustive")(_per_object("lvis/not_exhaustive", ""))
features_lib.FEATURES.register("lvis/neg")(_per_object("lvis/neg", ""))


# -- evaluation features ----------------------------------------------------------------------------
def _eval_boxes(labels: str) -> Feature:
    names = (RECORD_READS + (CROWD,)) if labels == RECORD else SHAPE_READS
    parts = {name: features_lib.FEATURES.get(name) for name in names}

    def prepare(value, image_bytes, image_size, config):
        tf = _tf()
        n = tf.shape(value["objects/bbox"])[0]
        crowd = _crowd(value, n)
        boxes, kept, _ = transform(value["objects/bbox"], tf.zeros([n], tf.bool), image_bytes, None, False, None,
                                   config)
        ok = known_labels(value, labels)
        # A pure failure (as segmentation's masks): the example is skipped with a warning, not a wrong label.
        fail = tf.strings.to_number(tf.where(ok, tf.constant("0"), tf.constant(
            f"bad boxes: the record's objects do not line up or name a class outside the label set {labels!r}")),
            tf.float32)
        classes = tf.cast(_classes(value, labels), tf.float32) + fail
        rows = tf.concat([boxes, classes[:, None], tf.cast(crowd, tf.float32)[:, None]], 1)
        return tf.io.serialize_tensor(tf.boolean_mask(rows, kept))

    return Feature(
        parse=lambda r: example_spec(tuple(parts), r),
        value=lambda parsed, r: {name: f.value(parsed, r) for name, f in parts.items()},
        empty=lambda r: {name: f.empty(r) for name, f in parts.items()},
        tfds=(lambda ex, r: {name: f.tfds(ex, r) for name, f in parts.items()}) if labels == RECORD else None,
        prepare=prepare,
    )


for _labels_name in LABEL_SETS:
    features_lib.FEATURES.register(f"boxes/{_labels_name}")(_eval_boxes(_labels_name))

_image = features_lib.FEATURES.get("image")
features_lib.FEATURES.register("image/size")(Feature(  # int32 [2]: (height, width) of the record's image
    parse=_image.parse, value=_image.value, empty=_image.empty, tfds=_image.tfds, tfds_decoders=_image.tfds_decoders,
    prepare=lambda value, image_bytes, image_size, config: _image_shape(image_bytes)[:2]))


def novel_classes(labels: str) -> list:
    """The novel classes of a built-in label set's open-vocabulary protocol (no box of theirs reaches training):
    the shapes of shapes.NOVEL_SHAPES, for labels="combo" every colour of them, none for labels="color"."""
    names = segmentation.class_names(labels)[1:]  # checks the label set
    if labels == "color":
        return []
    return [n for n in names if n.split()[-1] in shapes.NOVEL_SHAPES]


def read_boxes(serialized: bytes) -> dict:
    """An evaluation example's ``boxes/LABELS`` -> {boxes float32 [k, 4] (x1, y1, x2, y2) in the record's pixels,
    labels int32 [k], crowd bool [k]}."""
    rows = _tf().io.parse_tensor(serialized, _tf().float32).numpy().reshape(-1, 6)
    return {"boxes": rows[:, :4], "labels": rows[:, 4].astype("int32"), "crowd": rows[:, 5] > 0}
