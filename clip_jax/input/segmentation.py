"""Segmentation masks as batch keys: class ids per pixel, cropped and flipped with their image.

Training: a method declares the batch key

    BatchInput(key="mask", op="mask", reads=("segmentation", "objects/shape", "objects/color"),
               options=(("labels", "shape"),))

and gets ``mask`` uint8 [B, S, S]: 0 = background, k + 1 = the k-th name of
``shapes.class_names(labels)`` for labels "shape", "color" or "combo", 255 = ignore, made from a
shapes or shapes_scenes record's map of object indices (``segmentation``) and its objects. Records
that already hold class ids (VOC / ADE20K converted by clip_jax.input.convert_segmentation, or a tfds
dataset with a ``segmentation_mask`` image) are read with ``reads=("segmentation_mask",)`` and
``labels="record"`` (the ids as they are; option ``num_classes=N`` checks them against N classes).
The mask takes the geometry of the record's image crop (same window, nearest-neighbour resize) and
the same flip (ops.resolve gives it the 'crop' keys' flip option).

Evaluation reads the record features ``mask/shape``, ``mask/color``, ``mask/combo`` or
``mask/record`` (Read(features=("mask/shape",))): uint8 [n, S, S] at the model's input size, cropped
as the evaluation image (shorter side resized, center crop; nearest). Not ``mask``: evaluation
batches use that name for their real rows. The segmentation task reads ``mask_png/LABELS`` instead:
the same class ids at the record's own resolution, uncropped, as an 8-bit PNG per example (records of
several sizes batch as one string each), beside ``image/whole``, the whole image resized to S x S
(no crop, so every pixel of the record has a prediction).

Bad records: a mask-reading key flags a record without a mask (``missing_mask``) and one whose mask is
no PNG, or of another size than its PNG image, or whose objects name a colour or shape that does not
exist (``bad_mask``), in the pipeline's counters. What shows only once decoded (an object index past the
record's objects, a class id past num_classes, a size differing from a JPEG image's) fails the record's
decode: it is dropped and counted ``undecodable``. Evaluation skips such an example with a warning.
"""

from __future__ import annotations

from typing import Optional

from clip_jax.input import features as features_lib
from clip_jax.input import ops, shapes
from clip_jax.input.features import Feature, _skip_decoding, get_path
from clip_jax.input.reader import example_spec
from clip_jax.input.transforms import _image_shape, crop_label_map, finish, png_size

IGNORE = 255
LABEL_SETS = ("shape", "color", "combo")
DEFAULT_TRAIN = "shapes_scenes:train"  # the data a mask needs where none is named (the input benchmark)
RECORD = "record"  # the record's own class ids (segmentation_mask)


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


def class_names(labels: str) -> list:
    """The classes of a label set, background first: ["background", "circle", ...] (index = mask value)."""
    if labels not in LABEL_SETS:
        raise ValueError(f"unknown mask label set {labels!r}: use one of {', '.join(LABEL_SETS)} (or 'record')")
    return ["background"] + shapes.class_names(labels)


def class_prompts(labels: str) -> list:
    """The zero-shot prompts [class][k] of a label set's foreground classes."""
    class_names(labels)  # checks the name
    return shapes.prompts(labels)


def object_classes(shape_ids, color_ids, labels: str):
    """The class (without background) of each object, int64 [n], for a label set."""
    if labels == "shape":
        return shape_ids
    if labels == "color":
        return color_ids
    return color_ids * len(shapes.SHAPE_NAMES) + shape_ids


def label_map(mask_bytes, image_bytes, objects, labels: str, image_size: Optional[int], train: bool, seed, config,
              num_classes: Optional[int] = None):
    """uint8 [S, S] class ids of one record, cropped as its image (image_size None: [H, W], the record's own
    size, uncropped). objects: (shape ids, colour ids) for a label set of shapes, None for labels='record'.
    Raises (InvalidArgumentError) where the mask does not fit the image or holds an index or id outside the
    label set."""
    tf = _tf()
    mask = tf.io.decode_png(mask_bytes, channels=1)
    fits = tf.reduce_all(tf.equal(tf.shape(mask)[:2], _image_shape(image_bytes)[:2]))
    problems = [(fits, "segmentation mask of another size than its image: write each mask at its image's size")]
    if labels == RECORD:
        if num_classes:
            problems.append((tf.reduce_all((mask < num_classes) | (mask == IGNORE)),
                             f"segmentation_mask holds a class id >= num_classes={num_classes} that is not {IGNORE} "
                             "(ignore): give the op the label set's num_classes, or map the ids"))
    else:
        shape_ids, color_ids = objects
        problems.append((tf.reduce_max(tf.cast(mask, tf.int64)) <= tf.size(shape_ids, out_type=tf.int64),
                         "segmentation holds an object index past the record's objects/shape"))
        problems.append((_known_objects(shape_ids, color_ids), "objects/shape and objects/color differ in length or "
                                                               "name a shape or colour that shapes does not have"))
    cropped = mask[..., 0] if image_size is None else crop_label_map(mask, image_bytes, image_size, train, seed, config)
    out = cropped + _fails_unless(problems)
    if labels == RECORD:
        return out
    table = tf.cast(tf.concat([[0], object_classes(shape_ids, color_ids, labels) + 1], 0), tf.uint8)
    return tf.gather(table, tf.cast(out, tf.int32))


def _fails_unless(problems):
    """uint8 0, or an InvalidArgumentError quoting the first problem whose check is False: a pure op (a stateful
    assertion would keep tf.data from optimizing the pipeline around it)."""
    tf = _tf()
    text = tf.constant("0")
    for ok, message in reversed(problems):
        text = tf.where(ok, text, tf.constant(f"bad mask: {message}"))
    return tf.cast(tf.strings.to_number(text, tf.int32), tf.uint8)


# -- the training op ------------------------------------------------------------------------
def _labels(wanted: ops.Wanted) -> str:
    return str(wanted.option("labels", "shape"))


def _validate(wanted: ops.Wanted) -> None:
    labels = _labels(wanted)
    if labels == RECORD:
        if tuple(wanted.reads) != ("segmentation_mask",):
            raise ValueError(f"batch key {wanted.key!r}: op 'mask' with labels='record' reads ('segmentation_mask',), "
                             f"not {wanted.reads!r}")
        return
    class_names(labels)  # a known label set, or the error naming them
    if set(wanted.reads) != {"segmentation", "objects/shape", "objects/color"}:
        raise ValueError(f"batch key {wanted.key!r}: op 'mask' with labels={labels!r} reads ('segmentation', "
                         f"'objects/shape', 'objects/color'), not {wanted.reads!r} (class-id masks: labels='record' "
                         "with reads=('segmentation_mask',))")


def _mask_feature(wanted: ops.Wanted) -> str:
    return "segmentation_mask" if _labels(wanted) == RECORD else "segmentation"


def _make(ctx: ops.OpContext, ex: dict, wanted: ops.Wanted):
    labels = _labels(wanted)
    objects = None if labels == RECORD else (ex["objects/shape"], ex["objects/color"])
    num_classes = wanted.option("num_classes")
    out = label_map(ex[_mask_feature(wanted)], ex["image"], objects, labels, ctx.image_size, ctx.train,
                    ctx.seed(ops.CROP_SALT), ctx.config, int(num_classes) if num_classes else None)
    return ops.flip(ctx, out, wanted)


def _blank(ctx: ops.OpContext, wanted: ops.Wanted):
    return _tf().zeros([ctx.image_size, ctx.image_size], _tf().uint8)


def _bad_mask(picked: dict, wanted: ops.Wanted):
    """A record's mask is no PNG, or not its PNG image's size, or its objects name unknown classes (header
    and integer checks only: this runs on every record, sentinels too, and must not raise)."""
    tf = _tf()
    mask = picked[_mask_feature(wanted)]
    present = tf.strings.length(mask) > 0
    is_png, h, w = png_size(mask)
    image_png, ih, iw = png_size(picked["image"])
    bad = present & (~is_png | (image_png & (tf.not_equal(h, ih) | tf.not_equal(w, iw))))
    if _labels(wanted) != RECORD:
        bad = bad | (present & ~_known_objects(picked["objects/shape"], picked["objects/color"]))
    return bad


def _known_objects(shape_ids, color_ids):
    """Whether every object has a shape and a colour of the shapes dataset (a bool tensor; never raises)."""
    tf = _tf()

    def inside(ids, count):
        return tf.reduce_all((ids >= 0) & (ids < count))

    return (tf.equal(tf.size(shape_ids), tf.size(color_ids)) & inside(shape_ids, len(shapes.SHAPE_NAMES))
            & inside(color_ids, len(shapes.COLOR_NAMES)))


ops.OPS.register("mask")(ops.Op("record", _make, _blank, needs=("image",), checks=(("bad_mask", _bad_mask),),
                                 joint=True, validate=_validate))


# -- record features ----------------------------------------------------------------------------
def _bytes_feature(name: str) -> dict:
    tf = _tf()
    return {name: tf.io.FixedLenFeature([], tf.string, default_value="")}


features_lib.FEATURES.register("segmentation_mask")(Feature(  # a PNG of class ids, 255 = ignore (VOC style)
    parse=lambda r: _bytes_feature("segmentation_mask"),
    value=lambda parsed, r: parsed["segmentation_mask"],
    empty=lambda r: _tf().constant(b""),
    tfds=lambda ex, r: get_path(ex, "segmentation_mask"),
    tfds_decoders=lambda r: {"segmentation_mask": _skip_decoding()},
    spatial="mask",
    checks=(("missing_mask", lambda mask: _tf().equal(_tf().strings.length(mask), 0)),),
))


def _eval_mask(labels: str, png: bool = False) -> Feature:
    """Evaluation's mask of a label set: the raw pieces at read, the class-id map at the model's size (png: at
    the record's own size, encoded as an 8-bit PNG)."""
    if labels == RECORD:
        parts = {"segmentation_mask": features_lib.FEATURES.get("segmentation_mask")}
    else:
        parts = {name: features_lib.FEATURES.get(name) for name in ("segmentation", "objects/shape", "objects/color")}

    def prepare(value, image_bytes, image_size, config):
        size = None if png else image_size
        if labels == RECORD:
            out = label_map(value["segmentation_mask"], image_bytes, None, RECORD, size, False, None, config)
        else:
            out = label_map(value["segmentation"], image_bytes, (value["objects/shape"], value["objects/color"]),
                            labels, size, False, None, config)
        return _tf().io.encode_png(out[..., None]) if png else out

    return Feature(
        parse=lambda r: example_spec(tuple(parts), r),
        value=lambda parsed, r: {name: f.value(parsed, r) for name, f in parts.items()},
        empty=lambda r: {name: f.empty(r) for name, f in parts.items()},
        tfds=((lambda ex, r: {"segmentation_mask": get_path(ex, "segmentation_mask")}) if labels == RECORD else None),
        tfds_decoders=(lambda r: {"segmentation_mask": _skip_decoding()}) if labels == RECORD else (lambda r: {}),
        prepare=prepare,
    )


for _labels_name in LABEL_SETS + (RECORD,):
    features_lib.FEATURES.register(f"mask/{_labels_name}")(_eval_mask(_labels_name))
    features_lib.FEATURES.register(f"mask_png/{_labels_name}")(_eval_mask(_labels_name, png=True))


def _whole_image(value, image_bytes, image_size, config):
    """The whole record image resized to S x S (no crop; antialiased as the evaluation image), as the model reads
    it: a prediction for every pixel of the record, whatever its aspect."""
    tf = _tf()
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, [image_size, image_size], method=config["resize_method"], antialias=True)
    return finish(tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0), image_size, config)


_image = features_lib.FEATURES.get("image")
features_lib.FEATURES.register("image/whole")(Feature(parse=_image.parse, value=_image.value, empty=_image.empty,
                                                      tfds=_image.tfds, tfds_decoders=_image.tfds_decoders,
                                                      prepare=_whole_image))
