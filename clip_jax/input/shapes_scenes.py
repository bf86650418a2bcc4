"""Shapes scenes: the embedded dataset's variant with 2 to 5 objects per image, for dense work.

Objects are drawn back to front with the shapes dataset's colours, shapes, sizes and polygons
(clip_jax.input.shapes), so later ones may hide parts of earlier ones. An object stays only if
at least MIN_VISIBLE of its own area (and MIN_PIXELS pixels) remains visible once every object
is drawn; otherwise it is placed again (then dropped after a few tries). Every record holds:

- ``image`` (PNG), ``key``, ``caption`` and ``caption_zh`` (the same scene in Chinese);
- ``objects/color``, ``objects/shape``: each object, in caption order (largest visible area first);
- ``objects/bbox``: the box of each object's visible pixels, [ymin, xmin, ymax, xmax] in [0, 1];
- ``objects/phrase_span``: [n, 2] (start, end) character offsets in the English caption of each
  object's name, its size word included, its article not ("large red circle");
- ``segmentation``: a PNG of the visible object's index at each pixel (0 = background, k = the
  k-th object in caption order), the same polygons as the image's;
- ``label``, ``label_color``, ``label_shape``: the first (largest) object's combo, colour and
  shape, as in shapes records (zero-shot on scenes is then "name the biggest object").

Captions: "a red circle, a small blue square and a green star on the left", "there is ...".
Every combo appears in every split; the base/novel split of shapes for open-vocabulary work is
``clip_jax.input.shapes.NOVEL_SHAPES``. Examples are drawn from their own
``np.random.default_rng([seed, SALT, split, index])``: byte-identical records for a seed
whatever the sharding.

    paths = ensure_scenes_dataset("~/.cache/clip_jax")  # {"train": [...], ...}

CLI: ``python -m clip_jax.input.shapes --out=DIR --variant=scenes``. Data spec:
``shapes_scenes:SPLIT[|lang=zh]``; the sizes come from ``data.scenes_sizes``.
"""

from __future__ import annotations

import io
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from clip_jax.input import records, shapes
from clip_jax.input.shapes import (
    _BACKGROUND,
    _BACKGROUND_ZH,
    _FRAMES,
    _FRAMES_ZH,
    _RADIUS,
    _SIZE_WORDS,
    _WHERE,
    _WHERE_ZH,
    _a,
    _draw,
    _jitter,
    _phrase_zh,
    _size_variant,
)

VERSION = 1
SPLITS = shapes.SPLITS
DEFAULT_SIZES = {"train": 10000, "validation": 500, "test": 500}
MIN_OBJECTS, MAX_OBJECTS = 2, 5
MIN_VISIBLE = 0.4  # share of an object's own area left visible, so every named object can be seen
MIN_PIXELS = 16  # and at least this many pixels (a 64 px image's smallest shapes cover ~50)
SALT = 1  # in the example's rng seed: scenes never share a random stream with shapes
_TRIES = 25  # placements tried per object before it is dropped
LABEL_TASKS = {k: v for k, v in shapes.LABEL_TASKS.items() if k != "label_count"}  # counts 2..5 have no names


def parse_source(rest: str):
    """(split, lang) of the part after 'shapes_scenes:' (as shapes.parse_source)."""
    return shapes.parse_source(rest)


# ------------------------------------------------------------------------- one example


def _where(box: np.ndarray) -> str:
    """The third of the image the centre of a visible box [ymin, xmin, ymax, xmax] (in [0, 1]) is in."""
    y, x = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    dx, dy = abs(x - 0.5), abs(y - 0.5)
    if max(dx, dy) < 1 / 6:
        return "center"
    if dx >= dy:
        return "left" if x < 0.5 else "right"
    return "top" if y < 0.5 else "bottom"


def _layout(rng: np.random.Generator, size: int):
    """Objects in drawing order (back to front) and the label map of drawing indices (0 = none)."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    edge = shapes._EDGE * size
    objs: List[dict] = []
    owns: List[int] = []  # each object's own area (px)
    labels = Image.new("L", (size, size), 0)
    for i in range(n):
        used = {(o["color"], o["shape"]) for o in objs}
        while True:  # distinct combos: a caption names each object unambiguously
            color, shape = divmod(int(rng.integers(len(shapes.COLOR_NAMES) * len(shapes.SHAPE_NAMES))),
                                  len(shapes.SHAPE_NAMES))
            if (color, shape) not in used:
                break
        kind = "small" if rng.random() < 0.5 else "large"
        for _ in range(_TRIES if i >= MIN_OBJECTS else 1000):  # the first MIN_OBJECTS always find a place
            r = rng.uniform(*_RADIUS[kind]) * size
            obj = dict(color=color, shape=shape, size=kind, r=r, x=rng.uniform(r + edge, size - r - edge),
                       y=rng.uniform(r + edge, size - r - edge))
            trial = labels.copy()
            _draw(ImageDraw.Draw(trial), shapes.SHAPE_NAMES[shape], obj["x"], obj["y"], r, len(objs) + 1)
            visible = np.bincount(np.asarray(trial).ravel(), minlength=len(objs) + 2)[1:]
            areas = owns + [visible[-1]]  # drawn on top, the new object shows all of its own area
            if all(v >= max(MIN_PIXELS, MIN_VISIBLE * a) for v, a in zip(visible, areas)):
                objs.append(obj)
                owns.append(areas[-1])
                labels = trial
                break
    return objs, np.asarray(labels)


def _example(seed: int, split: str, index: int, image_size: int):
    """(PIL image, {lang: caption}, objects in caption order, uint8 segmentation, spans [n, 2])."""
    rng = np.random.default_rng([seed, SALT, SPLITS.index(split), index])
    size = image_size
    dark = rng.random() < 0.5
    grey = rng.uniform(20, 60) if dark else rng.uniform(195, 245)
    background = _jitter(rng, (grey, grey, grey), 8)
    drawn, by_drawing = _layout(rng, size)
    rgbs = [_jitter(rng, shapes.COLORS[shapes.COLOR_NAMES[o["color"]]], 12) for o in drawn]

    # Caption order: largest visible area first (ties: drawing order), so the first named is the main one.
    areas = np.bincount(by_drawing.ravel(), minlength=len(drawn) + 1)[1:]
    order = sorted(range(len(drawn)), key=lambda k: (-areas[k], k))
    to_caption = np.zeros(len(drawn) + 1, np.uint8)
    to_caption[[k + 1 for k in order]] = np.arange(1, len(drawn) + 1)
    seg = to_caption[by_drawing]
    objs = []
    for rank, k in enumerate(order):
        here = seg == rank + 1
        ys, xs = np.flatnonzero(here.any(1)), np.flatnonzero(here.any(0))
        box = np.array([ys[0], xs[0], ys[-1] + 1, xs[-1] + 1], np.float32) / size
        objs.append(dict(drawn[k], bbox=box))

    # Wording: per object a size word half the time and a position a quarter of the time.
    sizes = [_size_variant(rng) for _ in objs]
    wheres = [(_where(o["bbox"]), None) for o in objs]
    wheres = [(w, int(rng.integers(len(_WHERE[w]))) if rng.random() < 0.25 else None) for w, _ in wheres]
    frame = int(rng.integers(len(_FRAMES)))
    tint = ("dark" if dark else "light") if rng.random() < 0.15 else None
    en, spans = _caption(objs, sizes, wheres, frame, tint)
    captions = {"en": en, "zh": _caption_zh(objs, sizes, wheres, frame, tint)}

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj, rgb in zip(drawn, rgbs):
        _draw(draw, shapes.SHAPE_NAMES[obj["shape"]], obj["x"], obj["y"], obj["r"], rgb)
    return image, captions, objs, seg, spans


def _caption(objs, sizes, wheres, frame: int, tint: Optional[str]):
    """(English caption, spans [n, 2] of each object's name in it)."""
    prefix, suffix = _FRAMES[frame].split("{}")
    text, spans = prefix, []
    for i, (obj, size_variant, (where, variant)) in enumerate(zip(objs, sizes, wheres)):
        if i:
            text += " and " if i == len(objs) - 1 else ", "
        words = [shapes.COLOR_NAMES[obj["color"]], shapes.SHAPE_NAMES[obj["shape"]]]
        if size_variant is not None:
            words.insert(0, _SIZE_WORDS[obj["size"]][size_variant])
        name = " ".join(words)
        start = len(text) + len(_a(name)) - len(name)
        text += _a(name)
        spans.append((start, start + len(name)))
        if variant is not None:
            text += " " + _WHERE[where][variant]
    text += suffix + (_BACKGROUND[tint] if tint else "")
    return text, np.array(spans, np.int64)


def _caption_zh(objs, sizes, wheres, frame: int, tint: Optional[str]) -> str:
    """The same choices in Chinese: "一个红色圆形、一个小的蓝色正方形和一个绿色星形在左边"."""
    template, numeral = _FRAMES_ZH[frame]
    parts = [_phrase_zh(o, s, numeral) + ("" if v is None else _WHERE_ZH[w][v])
             for o, s, (w, v) in zip(objs, sizes, wheres)]
    text = "、".join(parts[:-1]) + "和" + parts[-1]
    return template.format(text) + (_BACKGROUND_ZH[tint] if tint else "")


def make_example(seed: int, split: str, index: int, image_size: int = 64, lang: str = "en"):
    """(RGB uint8 [S, S, 3], caption in ``lang``, objects in caption order, segmentation uint8 [S, S],
    phrase spans [n, 2] in the English caption)."""
    shapes.check_lang(lang)
    image, captions, objs, seg, spans = _example(seed, split, index, image_size)
    return np.asarray(image), captions[lang], objs, seg, spans


# -------------------------------------------------------------------------- records


def serialize(png: bytes, captions: dict, key: str, objs: Sequence[dict], mask_png: bytes, spans) -> bytes:
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in np.ravel(v)]))

    def strs(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    main = objs[0]
    feature = {
        records.IMAGE: strs(png),
        records.CAPTION: strs(captions["en"].encode("utf-8")),
        shapes.CAPTION_FEATURES["zh"]: strs(captions["zh"].encode("utf-8")),
        records.KEY: strs(key.encode("utf-8")),
        records.LABEL: ints(shapes.combo_index(main["color"], main["shape"])),
        "label_color": ints(main["color"]),
        "label_shape": ints(main["shape"]),
        "objects/color": ints([o["color"] for o in objs]),
        "objects/shape": ints([o["shape"] for o in objs]),
        "objects/bbox": tf.train.Feature(float_list=tf.train.FloatList(
            value=np.stack([o["bbox"] for o in objs]).reshape(-1))),
        "objects/phrase_span": ints(spans),
        "segmentation": strs(mask_png),
    }
    # deterministic: byte-identical records in every process (see shapes.serialize)
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # flat images: level 6 is 2x slower, 10% smaller
    return buf.getvalue()


def encoded(seed: int, split: str, index: int, image_size: int) -> bytes:
    """The serialized record of one example."""
    image, captions, objs, seg, spans = _example(seed, split, index, image_size)
    return serialize(_png(np.asarray(image)), captions, f"{split}-{index:07d}", objs, _png(seg), spans)


def parse(serialized: bytes) -> dict:
    """A record back as shapes.parse gives it (image, caption, caption_zh, key, label, label_color,
    label_shape, objects=[dict(color, shape, bbox, phrase_span)], segmentation)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    f = tf.train.Example.FromString(serialized).features.feature
    text = lambda k: f[k].bytes_list.value[0].decode("utf-8")  # noqa: E731
    out = dict(image=np.asarray(Image.open(io.BytesIO(f[records.IMAGE].bytes_list.value[0])).convert("RGB")),
               caption=text(records.CAPTION), caption_zh=text(shapes.CAPTION_FEATURES["zh"]), key=text(records.KEY))
    for name in LABEL_TASKS:
        out[name] = int(f[name].int64_list.value[0])
    boxes = np.asarray(f["objects/bbox"].float_list.value, np.float32).reshape(-1, 4)
    spans = np.asarray(f["objects/phrase_span"].int64_list.value, np.int64).reshape(-1, 2)
    out["objects"] = [dict(color=int(c), shape=int(s), bbox=b, phrase_span=tuple(int(x) for x in p))
                      for c, s, b, p in zip(f["objects/color"].int64_list.value, f["objects/shape"].int64_list.value,
                                            boxes, spans)]
    out["segmentation"] = np.asarray(Image.open(io.BytesIO(f["segmentation"].bytes_list.value[0])))
    return out


def read_split(paths: Sequence[str]) -> List[dict]:
    """All records of some shards, parsed (small splits: tests and previews)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    return [parse(r.numpy()) for p in paths for r in tf.data.TFRecordDataset(p)]


# --------------------------------------------------------------------------- caching


def ensure_scenes_dataset(cache_dir: str, seed: int = 0, image_size: int = 64, sizes: Optional[Dict[str, int]] = None,
                          num_shards: Optional[Dict[str, int]] = None) -> Dict[str, List[str]]:
    """The scenes TFRecords under ``cache_dir``, written on first use: split -> shard paths (made as
    shapes.ensure_shapes_dataset's: shapes.cached_splits)."""
    sizes = dict(DEFAULT_SIZES, **(sizes or {}))
    return shapes.cached_splits(cache_dir, "shapes_scenes", VERSION, seed, image_size, sizes, num_shards,
                                lambda tmp, shards: _write(tmp, seed, image_size, sizes, shards))


def _write(tmp: str, seed: int, image_size: int, sizes: Dict[str, int], shards: Dict[str, int]) -> None:
    info = dict(
        name="shapes_scenes", version=VERSION, seed=seed, image_size=image_size, image_format="png", sizes=sizes,
        num_shards=shards, objects=[MIN_OBJECTS, MAX_OBJECTS], min_visible=MIN_VISIBLE,
        features=dict(LABEL_TASKS), captions={f: lang for lang, f in shapes.CAPTION_FEATURES.items()},
        dense_features={"objects/color": "color of each object", "objects/shape": "shape of each object",
                        "objects/bbox": "[ymin, xmin, ymax, xmax] in [0, 1] of each object's visible pixels",
                        "objects/phrase_span": "[start, end) of each object's name in the English caption",
                        "segmentation": "PNG, 0 = background, k = the k-th object (caption order), visible"},
        class_names={t: shapes.class_names(t) for t in LABEL_TASKS.values()},
        novel_shapes=list(shapes.NOVEL_SHAPES),
    )
    shapes.write_splits(tmp, {split: sizes[split] for split in SPLITS}, shards,
                        lambda split, i: encoded(seed, split, i, image_size), info)


def scenes_files(split: str, config) -> List[str]:
    """A split's shards as the data settings make them (cache_dir, shapes_seed, shapes_image_size, scenes_sizes)."""
    from clip_jax.input.settings import data_settings

    config = data_settings(config)
    return list(ensure_scenes_dataset(
        config["cache_dir"] or os.path.join(os.path.expanduser("~"), ".cache", "clip_jax"),
        seed=config["shapes_seed"], image_size=config["shapes_image_size"], sizes=dict(config["scenes_sizes"]),
    )[split])
