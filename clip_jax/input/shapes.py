"""Shapes: clip_jax's embedded default dataset, captioned images of coloured shapes.

Procedurally generated, so it needs no download: each image (RGB uint8, ``image_size``
square, 64x64 px by default) shows one or two flat shapes on a plain light or dark grey
background, with a caption naming colour, shape and (often) size and position of each:

    "a large red circle", "there is a small blue square on the left",
    "a green triangle above a big yellow star", "an orange cross and a purple diamond"

and beside it a Chinese caption of the same scene, worded from the same choices (for Chinese
text towers): "一个大的红色圆形", "图中有一个小的蓝色正方形在左边", "一个绿色三角形在一个较大的黄色星形的上方",
"一个橙色十字形和一个紫色菱形". ``class_names(task, lang)`` and ``prompts(task, lang=...)`` give
the zero-shot names and prompts in either language; a data spec picks the language with
``shapes:SPLIT|lang=zh`` (see ``parse_source``; English is the default).

The first object a caption mentions is the *main* one; ``label`` is its index in
``class_names("combo")`` ("red circle", ...), ``label_color`` / ``label_shape`` its colour
and shape indices. Training images hold one or two objects; "validation" and "test" images
hold exactly one, so their labels are what the image shows and a perfect model scores 100%
on every zero-shot task. One (colour, shape) combo per colour is held out (``HELD_OUT``): it
appears nowhere in "train" or "validation", and is the object of every "test" image, so
zero-shot accuracy on "test" measures composition of colour and shape, not recall.

Records hold the English caption as ``caption`` and the Chinese one as ``caption_zh``
(``caption_feature(lang)``).

Dense labels, for detection and segmentation: every record also holds each object's colour,
shape and box (``objects/color``, ``objects/shape``, ``objects/bbox`` as [ymin, xmin, ymax,
xmax] in [0, 1], tfds' convention) and ``segmentation``, a PNG of the object index of each
pixel (0 = background, k = the k-th object, in caption order).

Every example is drawn from its own ``np.random.default_rng([seed, split, index])``, so the
records are byte-identical for a seed whatever the sharding or the number of processes.

    paths = ensure_shapes_dataset("~/.cache/clip_jax")   # {"train": [...], ...}
    prompts("combo")  # 36 lists of texts: [["a red circle.", "a red circle shape.", ...], ...]
    prompts("combo", lang="zh")  # [["红色圆形。", "一个红色圆形。", ...], ...]

CLI: ``python -m clip_jax.input.shapes --out=DIR [--seed=0] [--preview=preview.png]``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from clip_jax.input import records

# 2: single-object evaluation splits, dense labels; 3: Chinese captions; 4: label_count (older caches are rebuilt)
VERSION = 4
SPLITS = ("train", "validation", "test")
VARIANT_MODULES = {"scenes": "clip_jax.input.shapes_scenes"}  # the CLI's other variants, by module
DEFAULT_SIZES = {"train": 20000, "validation": 1000, "test": 1000}

# Saturated colours far apart in RGB (and from every grey background), so that a small
# model can tell them apart from a few pixels.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 20),
    "purple": (150, 50, 200),
    "orange": (250, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
SHAPE_NAMES = ("circle", "square", "triangle", "star", "cross", "diamond")
# Held out: colour c with shape (5c + 1) mod 6. 5 is coprime with 6, so this is one combo
# per colour and one per shape (a permutation), and every colour and every shape still
# appears in training in 5 combos: red square, green circle, blue diamond, yellow cross,
# purple star, orange triangle.
HELD_OUT = tuple((c, (5 * c + 1) % len(SHAPE_NAMES)) for c in range(len(COLOR_NAMES)))
# Open-vocabulary protocols (base/novel classes): these shapes are never seen as masks in training.
NOVEL_SHAPES = ("star", "cross")

# Zero-shot prompt templates; fill them with prompt() or prompts(), which fix "a"/"an".
TEMPLATES = ["a {}.", "a {} shape.", "a photo of a {}.", "a drawing of a {}.", "there is a {}.", "an image of a {}."]

# Chinese: the words of the captions, class names and prompts ("zh"). A combo's name is colour + shape,
# no space ("红色圆形"), and captions always write the two together, so a prompt's name is a caption's.
LANGUAGES = ("en", "zh")
COLOR_NAMES_ZH = ("红色", "绿色", "蓝色", "黄色", "紫色", "橙色")  # in COLOR_NAMES' order
SHAPE_NAMES_ZH = ("圆形", "正方形", "三角形", "星形", "十字形", "菱形")  # in SHAPE_NAMES' order
TEMPLATES_ZH = ["{}。", "一个{}。", "一张{}的照片。", "一幅{}的画。", "图中有一个{}。", "{}的图片。"]
CAPTION_FEATURES = {"en": "caption", "zh": "caption_zh"}  # the record feature of each language's caption
# The label features of every record and the zero-shot task (class_names) each one labels.
LABEL_TASKS = {"label": "combo", "label_color": "color", "label_shape": "shape", "label_count": "count"}
# How many objects an image holds: the captions never say it in words ("a red circle and a blue square"),
# so zero-shot prompts cannot, while the image features do (the few-shot benchmark's label).
COUNT_NAMES = ("one shape", "two shapes")
COUNT_NAMES_ZH = ("一个形状", "两个形状")
COUNT_TEMPLATES = ["{}.", "an image of {}.", "a picture of {}.", "a drawing of {}."]
COUNT_TEMPLATES_ZH = ["{}。", "图中有{}。", "一张{}的图片。"]

# Caption wording. Colour and shape words are never varied: zero-shot prompts use them.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_WHERE = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_RELATIONS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_FRAMES = ("{}", "{}", "there is {}", "an image of {}", "a picture of {}", "a drawing of {}")  # bare: 1/3
_BACKGROUND = {"dark": " on a dark background", "light": " on a light background"}

# The Chinese of each English wording, variant for variant (the same index): a Chinese caption
# translates the English one of its example, and draws no random numbers of its own.
_SIZE_WORDS_ZH = {"small": ("小的", "较小的"), "large": ("大的", "较大的")}
_WHERE_ZH = {
    "left": ("在左边", "在左侧", "靠左"),
    "right": ("在右边", "在右侧", "靠右"),
    "top": ("在上方", "靠近顶部"),
    "bottom": ("在下方", "靠近底部"),
    "center": ("在中间", "在正中间"),
}
_RELATIONS_ZH = {  # {} = the other object
    "left": ("在{}的左边", "在{}左边"),
    "right": ("在{}的右边", "在{}右边"),
    "above": ("在{}的上方", "在{}上面"),
    "below": ("在{}的下方", "在{}下面", "在{}的下面"),
}
# (frame, objects counted): frames 3..5 take the scene as an attribute, their objects without "一个"
# ("一张红色圆形在左边的图片", not "一张一个红色圆形…").
_FRAMES_ZH = (("{}", True), ("{}", True), ("图中有{}", True), ("一张{}的图片", False), ("一幅{}的图画", False),
              ("一幅{}的画", False))
_BACKGROUND_ZH = {"dark": "，深色背景", "light": "，浅色背景"}

# Geometry, as fractions of image_size: the bounding "radius" of a shape (half its box),
# small and large ranges apart so the size words stay true, and the margins kept free.
_RADIUS = {"small": (0.08, 0.11), "large": (0.16, 0.21)}
_EDGE = 0.03  # free border
_GAP = 0.04  # min free space between the boxes of two shapes (they never overlap)


def check_lang(lang: str) -> str:
    """``lang`` if the dataset has captions and class names in it, else a ValueError naming those it has."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown shapes language {lang!r}: choose one of {', '.join(map(repr, LANGUAGES))}")
    return lang


def caption_feature(lang: str = "en") -> str:
    """The record feature holding the caption in ``lang``: "caption" (English) or "caption_zh"."""
    return CAPTION_FEATURES[check_lang(lang)]


def parse_source(rest: str) -> Tuple[str, str]:
    """(split, lang) of a data spec's part after 'shapes:': 'SPLIT[|lang=LANG]', e.g. 'train|lang=zh'.

    SPLIT defaults to train, LANG to en; LANG picks the caption a pipeline feeds (training,
    retrieval) and the class names and prompts of zero-shot evaluation."""
    split, *pairs = (rest or "").split("|")
    split = split.strip() or "train"
    if split not in SPLITS:
        raise ValueError(f"shapes split {split!r} not in {', '.join(SPLITS)}")
    lang = "en"
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if key.strip() != "lang" or not sep:
            raise ValueError(f"unknown shapes option {pair!r} in 'shapes:{rest}': the one option is lang=LANG "
                             f"(one of {', '.join(LANGUAGES)}), as in 'shapes:train|lang=zh'")
        lang = check_lang(value.strip())
    return split, lang


def class_names(task: str, lang: str = "en") -> List[str]:
    """Zero-shot class names: "color" (6), "shape" (6), "combo" (36, index = label) or "count" (2: one or
    two objects), in ``lang`` ("en": "red", "circle", "red circle", "one shape"; "zh": "红色", "圆形", "红色圆形",
    "一个形状")."""
    en = check_lang(lang) == "en"
    colors, kinds = (COLOR_NAMES, SHAPE_NAMES) if en else (COLOR_NAMES_ZH, SHAPE_NAMES_ZH)
    if task == "color":
        return list(colors)
    if task == "shape":
        return list(kinds)
    if task == "combo":
        return [f"{c} {s}" if en else c + s for c in colors for s in kinds]
    if task == "count":
        return list(COUNT_NAMES if en else COUNT_NAMES_ZH)
    raise ValueError(f"unknown task {task!r}; expected 'color', 'shape', 'combo' or 'count'")


def combo_index(color: int, shape: int) -> int:
    return color * len(SHAPE_NAMES) + shape


def held_out_names(lang: str = "en") -> List[str]:
    names = class_names("combo", lang)
    return [names[combo_index(c, s)] for c, s in HELD_OUT]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def prompt(template: str, name: str) -> str:
    """``template.format(name)`` with "a" before a vowel made "an" ("an orange star")."""
    return re.sub(r"\ba \{\}", lambda _: _a(name), template).replace("{}", name)


def prompts(task: str, templates: Optional[Sequence[str]] = None, lang: str = "en") -> List[List[str]]:
    """Prompt texts [class][k] for ``class_names(task, lang)``, to embed and average per class.

    templates: default TEMPLATES ("en") or TEMPLATES_ZH ("zh"); COUNT_TEMPLATES(_ZH) for "count".
    "combo": every template with "red circle", .... "color" and "shape": every template
    with every combo of that colour (shape), e.g. "a red circle.", "a red square.", ...:
    the captions never name a colour without a shape, so prompts that do would be
    off-distribution for a model trained on them; this marginalizes the other attribute.
    "count": every template with "one shape" / "two shapes", the words a user would type.
    """
    if task == "count":
        names = class_names(task, lang)
        if templates is None:
            templates = COUNT_TEMPLATES if lang == "en" else COUNT_TEMPLATES_ZH
        return [[t.format(n) for t in templates] for n in names]
    combos = class_names("combo", lang)
    if templates is None:
        templates = TEMPLATES if lang == "en" else TEMPLATES_ZH
    fill = prompt if lang == "en" else str.format  # Chinese has no "a"/"an"
    out = []
    for k in range(len(class_names(task, lang))):
        if task == "combo":
            names = [combos[k]]
        elif task == "color":
            names = [combos[combo_index(k, s)] for s in range(len(SHAPE_NAMES))]
        else:
            names = [combos[combo_index(c, k)] for c in range(len(COLOR_NAMES))]
        out.append([fill(t, n) for n in names for t in templates])
    return out


# ----------------------------------------------------------------------------- drawing


def _polygon(shape: str, x: float, y: float, r: float) -> List[Tuple[float, float]]:
    """Vertices (px) of a shape centred at (x, y) filling about the box of half-side r."""
    if shape == "square":
        h = 0.85 * r  # a full-box square looks much bigger than a circle of radius r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "diamond":
        pts = [(0, -r), (0.7 * r, 0), (0, r), (-0.7 * r, 0)]
    elif shape == "triangle":  # pointing up, base on the box's bottom edge
        pts = [(0, -r), (r, 0.8 * r), (-r, 0.8 * r)]
    elif shape == "star":  # five points, inner radius 0.45 of the outer
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        pts = [(q * math.sin(k * math.pi / 5), -q * math.cos(k * math.pi / 5)) for k, q in enumerate(radii)]
    elif shape == "cross":  # a plus sign, arms 0.36 r wide on each side
        w = 0.36 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w)]
        pts += [(-x, -y) for x, y in pts]  # the other half, rotated 180 degrees
    else:
        raise ValueError(shape)
    return [(x + dx, y + dy) for dx, dy in pts]


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, rgb: Tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
    else:
        draw.polygon(_polygon(shape, x, y, r), fill=rgb)


def _place_single(rng: np.random.Generator, where: str, r: float, size: int) -> Tuple[float, float]:
    """A centre (px) in the third of the image that ``where`` names, the shape inside it."""
    lo, hi = r + _EDGE * size, size - r - _EDGE * size
    third = {"left": (0.0, 1 / 3), "right": (2 / 3, 1.0), "center": (0.4, 0.6)}
    side = {"top": (0.0, 1 / 3), "bottom": (2 / 3, 1.0), "center": (0.4, 0.6)}
    xs = third.get(where, (0.4, 0.6))  # top/bottom: near the middle column
    ys = side.get(where, (0.4, 0.6))  # left/right: near the middle row

    def pick(a: float, b: float) -> float:
        a, b = max(lo, a * size), min(hi, b * size)
        return rng.uniform(a, b) if b > a else float(np.clip((a + b) / 2, lo, hi))

    return pick(*xs), pick(*ys)


def _place_pair(rng: np.random.Generator, relation: str, r0: float, r1: float, size: int):
    """Centres (px) of the main shape (radius r0) and the other (r1) so that the main one
    is ``relation`` ("left"/"right"/"above"/"below") of the other, their boxes apart."""
    edge, gap = _EDGE * size, _GAP * size
    first_main = relation in ("left", "above")  # the main shape comes first along the axis
    ra, rb = (r0, r1) if first_main else (r1, r0)
    # Along the axis: a then b, with room for both and the gap.
    pa = rng.uniform(ra + edge, max(ra + edge, size - edge - 2 * rb - gap - ra))
    pb = rng.uniform(pa + ra + gap + rb, max(pa + ra + gap + rb, size - edge - rb))
    # Across: b near a's line (within half their distance), so the relation reads clearly.
    half = (pb - pa) / 2
    qa = rng.uniform(ra + edge, size - edge - ra)
    lo, hi = max(rb + edge, qa - half), min(size - edge - rb, qa + half)
    qb = rng.uniform(lo, hi) if hi > lo else float(np.clip(qa, rb + edge, size - edge - rb))
    a, b = ((pa, qa), (pb, qb)) if relation in ("left", "right") else ((qa, pa), (qb, pb))
    return (a, b) if first_main else (b, a)


def _pick_combo(rng: np.random.Generator, allowed: np.ndarray) -> Tuple[int, int]:
    k = int(allowed[rng.integers(len(allowed))])
    return divmod(k, len(SHAPE_NAMES))


def _size_variant(rng: np.random.Generator) -> Optional[int]:
    """The size word of an object's phrase (an index into _SIZE_WORDS[size]), or None for none.

    Size half the time: often enough that "small"/"large" get learnt, rarely enough that colour,
    size and position alone do not tell a batch's captions apart (shape must be seen too)."""
    return int(rng.integers(2)) if rng.random() < 0.5 else None


def _index(rng: np.random.Generator, options: Sequence) -> int:
    return int(rng.integers(len(options)))


def _phrase(obj: dict, size_variant: Optional[int]) -> str:
    words = [COLOR_NAMES[obj["color"]], SHAPE_NAMES[obj["shape"]]]
    if size_variant is not None:
        words.insert(0, _SIZE_WORDS[obj["size"]][size_variant])
    return _a(" ".join(words))


def _phrase_zh(obj: dict, size_variant: Optional[int], numeral: bool) -> str:
    size = "" if size_variant is None else _SIZE_WORDS_ZH[obj["size"]][size_variant]
    return ("一个" if numeral else "") + size + COLOR_NAMES_ZH[obj["color"]] + SHAPE_NAMES_ZH[obj["shape"]]


def _caption(objs: Sequence[dict], words: dict) -> str:
    """The English caption of objects described by ``words`` (the choices `_example` drew)."""
    first = _phrase(objs[0], words["sizes"][0])
    if len(objs) == 1:
        text = first
        if words["where_variant"] is not None:  # the position, sometimes (see _size_variant)
            text += " " + _WHERE[words["where"]][words["where_variant"]]
    else:
        link = "and" if words["link"] is None else _RELATIONS[words["relation"]][words["link"]]
        text = f"{first} {link} {_phrase(objs[1], words['sizes'][1])}"
    caption = _FRAMES[words["frame"]].format(text)
    return caption + (_BACKGROUND[words["background"]] if words["background"] else "")


def _caption_zh(objs: Sequence[dict], words: dict) -> str:
    """The Chinese caption of the same choices: "一个大的红色圆形在左边", "图中有一个红色圆形在一个蓝色正方形的上方",
    "一张红色圆形和蓝色正方形的图片，深色背景". The main object comes first, as in English."""
    frame, numeral = _FRAMES_ZH[words["frame"]]
    first = _phrase_zh(objs[0], words["sizes"][0], numeral)
    if len(objs) == 1:
        text = first
        if words["where_variant"] is not None:
            text += _WHERE_ZH[words["where"]][words["where_variant"]]
    else:
        second = _phrase_zh(objs[1], words["sizes"][1], numeral)
        link = "和{}" if words["link"] is None else _RELATIONS_ZH[words["relation"]][words["link"]]
        if not numeral:  # inside an attribute: "在蓝色正方形左边的图片", not "…的左边的图片"
            link = link.replace("的", "")
        text = first + link.format(second)
    return frame.format(text) + (_BACKGROUND_ZH[words["background"]] if words["background"] else "")


_HELD = np.array([combo_index(c, s) for c, s in HELD_OUT])
_SEEN = np.setdiff1d(np.arange(len(COLOR_NAMES) * len(SHAPE_NAMES)), _HELD)
_ALL = np.arange(len(COLOR_NAMES) * len(SHAPE_NAMES))


def make_example(seed: int, split: str, index: int, image_size: int = 64, lang: str = "en"):
    """One example: (RGB uint8 array [image_size, image_size, 3], caption in ``lang``, objects),
    where objects is a list of dicts (color, shape, size "small"/"large", centre x, y and box
    half-side r in px), the main one first. Both languages' captions describe the one scene."""
    check_lang(lang)
    image, captions, objs = _example(seed, split, index, image_size)
    return np.asarray(image), captions[lang], objs


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: int) -> Tuple[int, int, int]:
    return tuple(min(255, max(0, int(v) + int(d))) for v, d in zip(rgb, rng.integers(-amount, amount + 1, 3)))


def _example(seed: int, split: str, index: int, image_size: int):
    """(PIL image, {lang: caption}, objects). Every caption is worded from the same drawn choices
    (``words``); the Chinese one draws nothing, so adding it changed no image or English caption."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    size = image_size
    dark = rng.random() < 0.5
    grey = rng.uniform(20, 60) if dark else rng.uniform(195, 245)
    background = _jitter(rng, (grey, grey, grey), 8)  # a faint tint

    # Test: the object is a held-out combo. Else seen combos only. Evaluation images hold one
    # object, so what they show is their label; training images one or two.
    main_pool, other_pool = (_HELD, _ALL) if split == "test" else (_SEEN, _SEEN)
    n = 1 if rng.random() < 0.5 or split != "train" else 2
    objs = []
    for i in range(n):
        while True:  # two objects of one combo would make an odd caption
            color, shape = _pick_combo(rng, main_pool if i == 0 else other_pool)
            if i == 0 or (color, shape) != (objs[0]["color"], objs[0]["shape"]):
                break
        kind = "small" if rng.random() < 0.5 else "large"
        r = rng.uniform(*_RADIUS[kind]) * size
        objs.append(dict(color=color, shape=shape, size=kind, r=r))

    # The caption's choices, drawn in the order the English caption was always built in.
    words = dict(where=None, where_variant=None, relation=None, link=None)
    if n == 1:
        where = tuple(_WHERE)[_index(rng, _WHERE)]
        objs[0]["x"], objs[0]["y"] = _place_single(rng, where, objs[0]["r"], size)
        words["sizes"] = [_size_variant(rng)]
        words["where"] = where
        if rng.random() < 0.3:  # the position, sometimes (see _size_variant)
            words["where_variant"] = _index(rng, _WHERE[where])
    else:
        relation = tuple(_RELATIONS)[_index(rng, _RELATIONS)]
        for obj, (x, y) in zip(objs, _place_pair(rng, relation, objs[0]["r"], objs[1]["r"], size)):
            obj["x"], obj["y"] = x, y
        words["sizes"] = [_size_variant(rng), _size_variant(rng)]
        words["relation"] = relation
        words["link"] = None if rng.random() < 0.2 else _index(rng, _RELATIONS[relation])  # None: "and"
    words["frame"] = _index(rng, _FRAMES)
    words["background"] = ("dark" if dark else "light") if rng.random() < 0.15 else None
    captions = {"en": _caption(objs, words), "zh": _caption_zh(objs, words)}

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in objs:
        # A little colour jitter (max 12 per channel): the names stay unambiguous.
        rgb = _jitter(rng, COLORS[COLOR_NAMES[obj["color"]]], 12)
        _draw(draw, SHAPE_NAMES[obj["shape"]], obj["x"], obj["y"], obj["r"], rgb)
    return image, captions, objs


def segmentation(objs: Sequence[dict], size: int) -> np.ndarray:
    """uint8 [size, size]: 0 for background, k + 1 where object k was drawn (the same polygons)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for k, obj in enumerate(objs):
        _draw(draw, SHAPE_NAMES[obj["shape"]], obj["x"], obj["y"], obj["r"], k + 1)
    return np.asarray(mask)


def boxes(objs: Sequence[dict], size: int) -> np.ndarray:
    """float32 [n, 4]: each object's box as [ymin, xmin, ymax, xmax] in [0, 1]."""
    return np.array([[(o["y"] - o["r"]) / size, (o["x"] - o["r"]) / size, (o["y"] + o["r"]) / size,
                      (o["x"] + o["r"]) / size] for o in objs], np.float32).clip(0.0, 1.0)


def serialize(png: bytes, caption: str, key: str, objs: Sequence[dict], mask_png: bytes, size: int,
              caption_zh: Optional[str] = None) -> bytes:
    """records' schema plus int64 ``label_color`` and ``label_shape`` (``label`` = combo) of the
    main object, ``label_count`` (the number of objects less one: 0 or 1), the dense labels of every
    object (see the module docstring) and, if given, the
    Chinese caption as ``caption_zh``."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    color, shape = objs[0]["color"], objs[0]["shape"]

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in np.atleast_1d(v)]))

    def strs(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {
        records.IMAGE: strs(png),
        records.CAPTION: strs(caption.encode("utf-8")),
        records.KEY: strs(key.encode("utf-8")),
        records.LABEL: ints(combo_index(color, shape)),
        "label_color": ints(color),
        "label_shape": ints(shape),
        "label_count": ints(len(objs) - 1),
        "objects/color": ints([o["color"] for o in objs]),
        "objects/shape": ints([o["shape"] for o in objs]),
        "objects/bbox": tf.train.Feature(float_list=tf.train.FloatList(value=boxes(objs, size).reshape(-1))),
        "segmentation": strs(mask_png),
    }
    if caption_zh is not None:
        feature[CAPTION_FEATURES["zh"]] = strs(caption_zh.encode("utf-8"))
    # deterministic: sorts the feature map; without it the byte order of map entries can
    # change from one process to the next (seen here), breaking byte-identical records.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _png(image: Image.Image) -> bytes:
    # PNG: lossless (colours exact, as named), small for flat shapes, and as fast to decode as
    # JPEG at this size.
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _encoded_range(args) -> List[tuple]:
    """Worker: the arguments of `serialize` for indices [start, stop) of a split."""
    seed, split, start, stop, image_size = args
    out = []
    for i in range(start, stop):
        image, captions, objs = _example(seed, split, i, image_size)
        mask = _png(Image.fromarray(segmentation(objs, image_size)))
        out.append((_png(image), captions["en"], f"{split}-{i:07d}", objs, mask, image_size, captions["zh"]))
    return out


# ------------------------------------------------------------------------------ caching


def ensure_shapes_dataset(
    cache_dir: str,
    seed: int = 0,
    image_size: int = 64,
    sizes: Optional[Dict[str, int]] = None,
    num_shards: Optional[Dict[str, int]] = None,
    workers: int = 1,
) -> Dict[str, List[str]]:
    """The Shapes TFRecords under ``cache_dir``, written on first use: split -> shard paths.

    sizes: examples per split (default 20000 / 1000 / 1000). num_shards: shards per split
    (default one per 2500 examples). Both, with the version, seed and image size, name the
    directory, so different settings never collide. It is written as a temporary sibling
    then renamed, so a crash or a concurrent writer never leaves a partial dataset under
    the final name; the loser of a race just uses the winner's (identical) files.
    workers: processes to draw with. Default 1: one core makes the default dataset in seconds,
    and spawned workers pay for importing clip_jax and JAX first. Use more for big datasets on
    big hosts; the workers are spawned, so the calling script needs an
    ``if __name__ == "__main__"`` guard.
    Local paths only (os.rename).
    """
    sizes = dict(DEFAULT_SIZES, **(sizes or {}))
    return cached_splits(cache_dir, "shapes", VERSION, seed, image_size, sizes, num_shards,
                         lambda tmp, shards: _write(tmp, seed, image_size, sizes, shards, workers))


def write_splits(directory: str, sizes: Dict[str, int], shards: Dict[str, int], encode, info: dict) -> None:
    """Each split's records in order (``encode(split, index)`` -> serialized bytes) into its shards, one
    process, then ``info`` as dataset_info.json, last: what marks a complete directory for cached_splits."""
    for split, size in sizes.items():
        with records.ShardWriter(os.path.join(directory, split), shards[split]) as writer:
            for i in range(size):
                writer.write(encode(split, i))
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=1)


def cached_splits(cache_dir: str, name: str, version: int, seed: int, image_size: int, sizes: Dict[str, int],
                  num_shards: Optional[Dict[str, int]], write) -> Dict[str, List[str]]:
    """split -> shard paths of a generated dataset under ``cache_dir``, made on first use by
    ``write(directory, shards)``, which writes every split and dataset_info.json last. The version,
    seed, image size, sizes and shards name the directory; it is written as a temporary sibling and
    renamed, so a crash or a concurrent writer leaves no partial one under the final name."""
    shards = {s: max(1, math.ceil(sizes[s] / 2500)) for s in SPLITS}
    shards.update(num_shards or {})
    cache_dir = os.path.expanduser(cache_dir)
    parts = "-".join(f"{s}{sizes[s]}x{shards[s]}" for s in SPLITS)
    final = os.path.join(cache_dir, f"{name}-v{version}-seed{seed}-{image_size}px-{parts}")
    paths = {s: [records.shard_name(os.path.join(final, s), i, shards[s]) for i in range(shards[s])] for s in SPLITS}
    if os.path.exists(os.path.join(final, "dataset_info.json")):
        return paths

    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=cache_dir)
    try:
        write(tmp, shards)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not os.path.exists(os.path.join(final, "dataset_info.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _write(out: str, seed: int, image_size: int, sizes, shards, workers: int) -> None:
    chunk = 500
    jobs = [(seed, s, a, min(a + chunk, sizes[s]), image_size) for s in SPLITS for a in range(0, sizes[s], chunk)]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the caller may hold TensorFlow/JAX threads that fork would copy
        # mid-state. Workers only draw and PNG-encode; this process serializes and writes.
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        results = pool.map(_encoded_range, jobs)
    else:
        pool, results = None, map(_encoded_range, jobs)
    try:
        writers = {s: records.ShardWriter(os.path.join(out, s), shards[s]) for s in SPLITS}
        for job, encoded in zip(jobs, results):
            for item in encoded:
                writers[job[1]].write(serialize(*item))
        for w in writers.values():
            w.close()
    finally:
        if pool is not None:
            pool.shutdown()
    info = dict(
        name="shapes",
        version=VERSION,
        seed=seed,
        image_size=image_size,
        image_format="png",
        sizes=sizes,
        num_shards=shards,
        files={s: [os.path.basename(p) for p in writers[s].paths] for s in SPLITS},
        features=dict(LABEL_TASKS),
        captions={feature: lang for lang, feature in CAPTION_FEATURES.items()},
        dense_features={"objects/color": "color of each object", "objects/shape": "shape of each object",
                        "objects/bbox": "[ymin, xmin, ymax, xmax] in [0, 1] of each object",
                        "segmentation": "PNG, 0 = background, k = the k-th object"},
        class_names={t: class_names(t) for t in LABEL_TASKS.values()},
        held_out=held_out_names(),
        held_out_labels=[int(k) for k in _HELD],
        templates=TEMPLATES,
        class_names_zh={t: class_names(t, "zh") for t in LABEL_TASKS.values()},
        held_out_zh=held_out_names("zh"),
        templates_zh=TEMPLATES_ZH,
    )
    # Written last: its presence marks a complete directory.
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=1)


# ---------------------------------------------------------------------------------- CLI


def parse(serialized: bytes) -> dict:
    """A record back as dict(image=uint8 [H, W, 3], caption, caption_zh, key, label, label_color,
    label_shape, label_count, objects=[dict(color, shape, bbox)], segmentation=uint8 [H, W]). caption_zh is None
    in a record without one."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    f = tf.train.Example.FromString(serialized).features.feature
    out = dict(
        image=np.asarray(Image.open(io.BytesIO(f[records.IMAGE].bytes_list.value[0])).convert("RGB")),
        caption=f[records.CAPTION].bytes_list.value[0].decode("utf-8"),
        caption_zh=(f[CAPTION_FEATURES["zh"]].bytes_list.value[0].decode("utf-8") if CAPTION_FEATURES["zh"] in f
                    else None),
        key=f[records.KEY].bytes_list.value[0].decode("utf-8"),
    )
    for name in LABEL_TASKS:
        out[name] = int(f[name].int64_list.value[0])
    bbox = np.asarray(f["objects/bbox"].float_list.value, np.float32).reshape(-1, 4)
    out["objects"] = [dict(color=int(c), shape=int(s), bbox=b) for c, s, b in
                      zip(f["objects/color"].int64_list.value, f["objects/shape"].int64_list.value, bbox)]
    out["segmentation"] = np.asarray(Image.open(io.BytesIO(f["segmentation"].bytes_list.value[0])))
    return out


def read_split(paths: Sequence[str]) -> List[dict]:
    """All records of some shards, parsed (small splits only: for tests and previews)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    return [parse(r.numpy()) for p in paths for r in tf.data.TFRecordDataset(p)]


def preview(examples: Sequence[dict], path: str, scale: int = 3, columns: int = 4) -> None:
    """A grid PNG of examples (upscaled ``scale`` times) with their captions under them."""
    import textwrap

    from PIL import ImageFont

    font = ImageFont.load_default()
    side = examples[0]["image"].shape[0] * scale
    cell_h = side + 4 * 12 + 6
    rows = math.ceil(len(examples) / columns)
    grid = Image.new("RGB", (columns * (side + 8), rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, ex in enumerate(examples):
        x, y = (k % columns) * (side + 8) + 4, (k // columns) * cell_h + 2
        grid.paste(Image.fromarray(ex["image"]).resize((side, side), Image.NEAREST), (x, y))
        text = f"[{ex['key']}] {ex['caption']}"
        for j, line in enumerate(textwrap.wrap(text, width=side // 6)[:4]):
            draw.text((x, y + side + 2 + 12 * j), line, fill="black", font=font)
    grid.save(path)


# CLIP_benchmark's folders of the one-object splits: zero-shot by each label task, and retrieval
CLIP_BENCHMARK_DATASETS = {"shapes_shape": "label_shape", "shapes_color": "label_color", "shapes_combo": "label",
                           "shapes_captions": None}
CLIP_BENCHMARK_SPLITS = ("validation", "test")


def raw_records(paths: Sequence[str]):
    """(key, encoded PNG, {label feature: int}, English caption) of every record of some shards, in order."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    for r in tf.data.TFRecordDataset(list(paths)):
        f = tf.train.Example.FromString(r.numpy()).features.feature
        labels = {name: int(f[name].int64_list.value[0]) for name in LABEL_TASKS}
        yield (f[records.KEY].bytes_list.value[0].decode("utf-8"), f[records.IMAGE].bytes_list.value[0], labels,
               f[records.CAPTION].bytes_list.value[0].decode("utf-8"))


def write_clip_benchmark(root: str, paths: Dict[str, List[str]], log=print) -> dict:
    """ROOT/shapes_shape, shapes_color, shapes_combo (zero_shot, English prompts) and shapes_captions
    (retrieval) in CLIP_benchmark's layout (clip_jax.input.wds_layout), each with the validation and test
    splits of the shards `paths` (ensure_shapes_dataset's). {folder: {split: records}}."""
    from clip_jax.input import wds_layout

    written = {}
    for name, label_key in CLIP_BENCHMARK_DATASETS.items():
        task = LABEL_TASKS.get(label_key)
        for split in CLIP_BENCHMARK_SPLITS:
            samples = ((key, png, labels[label_key] if label_key else None, [caption])
                       for key, png, labels, caption in raw_records(paths[split]))
            done = wds_layout.write_dataset(
                os.path.join(root, name), split, samples, task="zero_shot" if task else "retrieval",
                names=class_names(task) if task else None, prompts=prompts(task) if task else None,
                what=f"shapes:{split}", log=log)
            written.setdefault(name, {})[split] = done["count"]
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="cache directory; the dataset goes in a subdirectory")
    p.add_argument("--variant", choices=("shapes", "scenes"), default="shapes",
                   help="scenes: 2 to 5 objects per image with visible masks (clip_jax.input.shapes_scenes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=64)
    for s in SPLITS:
        p.add_argument(f"--{s}", type=int, default=None, help=f"{s} examples (default {DEFAULT_SIZES[s]}; scenes: "
                       "shapes_scenes.DEFAULT_SIZES)")
    p.add_argument("--workers", type=int, default=1, help="processes drawing images (see ensure_shapes_dataset)")
    p.add_argument("--preview", default="", help="write a grid of 8 train and 8 test examples here")
    p.add_argument("--format", choices=("tfrecord", "clip_benchmark"), default="tfrecord",
                   help="clip_benchmark: CLIP_benchmark's webdataset folders under --out (shapes_shape, shapes_color, "
                        "shapes_combo, shapes_captions: write_clip_benchmark), from the TFRecords in --cache_dir")
    p.add_argument("--cache_dir", default="", help="with --format=clip_benchmark: the TFRecords' cache "
                   "(default ~/.cache/clip_jax, as training's data.cache_dir)")
    args = p.parse_args(argv)
    t = time.time()
    sizes = {s: getattr(args, s) for s in SPLITS if getattr(args, s) is not None}
    if args.variant == "scenes":
        import importlib

        shapes_scenes = importlib.import_module(VARIANT_MODULES["scenes"])  # it builds on this module

        paths = shapes_scenes.ensure_scenes_dataset(args.out, args.seed, args.image_size, sizes)
        print(f"{os.path.dirname(paths['train'][0])} ready in {time.time() - t:.1f}s")
        if args.preview:
            preview([x for s in ("train", "test") for x in shapes_scenes.read_split(paths[s][:1])[:8]], args.preview)
            print(f"preview: {args.preview}")
        return
    if args.format == "clip_benchmark":
        cache = args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "clip_jax")
        write_clip_benchmark(args.out, ensure_shapes_dataset(cache, args.seed, args.image_size, sizes,
                                                             workers=args.workers))
        print(f"{args.out} ready in {time.time() - t:.1f}s")
        return
    paths = ensure_shapes_dataset(args.out, args.seed, args.image_size, sizes, workers=args.workers)
    print(f"{os.path.dirname(paths['train'][0])} ready in {time.time() - t:.1f}s")
    if args.preview:
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        examples = [parse(r.numpy()) for s in ("train", "test") for r in tf.data.TFRecordDataset(paths[s][:1]).take(8)]
        preview(examples, args.preview)
        print(f"preview: {args.preview}")


if __name__ == "__main__":
    main()
