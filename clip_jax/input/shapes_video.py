"""Shapes video: the embedded dataset's clips, one shape that performs one action over FRAMES frames.

Each clip shows one object drawn as the shapes dataset draws it (clip_jax.input.shapes: its colours, shapes,
sizes and polygons) on a grey background, and one of ACTIONS over its frames, linearly in time: it moves left,
right, up or down (by 30-40% of the frame), grows or shrinks (its radius x2 or /2), rotates (50-70 degrees
clockwise; never a circle, whose turn cannot be seen) or changes colour (to one of the 5 others). Every
record holds:

- ``frames`` (FRAMES PNGs) and ``frames/count``: the clip (records.serialize_clip; read by clip_jax.input.video);
- ``caption``: what happens, "a small red circle at the top moves to the left", "a big blue square in the
  center grows", "a little green star on the left turns yellow": the size word names the object's size at the
  start, the place where it starts (its row for a move left or right, its column for a move up or down, else
  the third of the frame it is in), so that few clips of a split share a caption;
- ``label_action`` (index into ACTIONS), ``label_color`` (the colour at the start), ``label_shape``;
- ``key``: "SPLIT-0000012".

Every combination appears in every split; splits differ only by their examples. Examples are drawn from their
own ``np.random.default_rng([seed, SALT, split, index])``: byte-identical records for a seed whatever the
sharding. Zero-shot: class names ACTIONS with ACTION_TEMPLATES ("a video of a shape that moves up."), and
shapes' colour and shape tasks.

    paths = ensure_video_dataset("~/.cache/clip_jax")  # {"train": [...], ...}

CLI: ``python -m clip_jax.input.shapes_video --out=DIR [--preview=strip.png]``. Data spec:
``shapes_video:SPLIT``; the sizes come from ``data.video_sizes``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from clip_jax.input import records, shapes, shapes_scenes
from clip_jax.input.settings import VIDEO_SIZES

VERSION = 1
SPLITS = shapes.SPLITS
DEFAULT_SIZES = dict(VIDEO_SIZES)
FRAMES = 8  # frames stored per clip
SALT = 2  # in the example's rng seed: never the random stream of a shapes (0) or scenes (1) example
# The actions (label_action), as zero-shot class names; a caption words one as PHRASES says.
ACTIONS = ("moves to the left", "moves to the right", "moves up", "moves down", "grows", "shrinks", "rotates",
           "changes color")
PHRASES = ACTIONS[:7] + ("turns {}",)  # the colour change names the colour it ends in
ROTATE, RECOLOR = ACTIONS.index("rotates"), ACTIONS.index("changes color")
ACTION_TEMPLATES = ["a video of a shape that {}.", "a shape that {}.", "a video of something that {}.",
                    "an object that {}."]
LABEL_TASKS = {"label_action": "action", "label_color": "color", "label_shape": "shape"}
MOVE = (0.3, 0.4)  # distance moved, a share of the frame
SCALE = (1.8, 2.2)  # growth (shrinking: its inverse) of the radius
TURN = (50.0, 70.0)  # degrees turned


def parse_source(rest: str) -> str:
    """The split of a data spec's part after 'shapes_video:' ('' = train)."""
    split = (rest or "").strip() or "train"
    if split not in SPLITS:
        raise ValueError(f"shapes_video split {split!r} not in {', '.join(SPLITS)} (captions are English only: no "
                         "|lang= option)")
    return split


def class_names(task: str) -> List[str]:
    """Zero-shot class names: "action" (ACTIONS), "color" or "shape" (shapes')."""
    if task == "action":
        return list(ACTIONS)
    return shapes.class_names(task)


def prompts(task: str, templates: Optional[Sequence[str]] = None) -> List[List[str]]:
    """Prompt texts [class][k]: each action in every ACTION_TEMPLATES template; colour and shape as shapes.prompts."""
    if task == "action":
        return [[t.format(name) for t in (templates or ACTION_TEMPLATES)] for name in ACTIONS]
    return shapes.prompts(task, templates)


# ------------------------------------------------------------------------- one example


def _inside(rng: np.random.Generator, r: float, size: int, travel: float = 0.0) -> float:
    """A start coordinate (px) that keeps a shape of radius r inside the frame while it travels `travel` px."""
    lo, hi = r + shapes._EDGE * size, size - r - shapes._EDGE * size
    lo, hi = (lo, hi - travel) if travel >= 0 else (lo - travel, hi)
    return float(rng.uniform(lo, hi)) if hi > lo else float((lo + hi) / 2)


def _choices(rng: np.random.Generator, size: int) -> dict:
    """The clip's drawn choices: action, colours, shape, size word, radii, path, turn, background."""
    dark = rng.random() < 0.5
    grey = rng.uniform(20, 60) if dark else rng.uniform(195, 245)
    background = shapes._jitter(rng, (grey, grey, grey), 8)
    action = int(rng.integers(len(ACTIONS)))
    color = int(rng.integers(len(shapes.COLOR_NAMES)))
    shape = int(rng.integers(len(shapes.SHAPE_NAMES)))
    if action == ROTATE and shapes.SHAPE_NAMES[shape] == "circle":
        shape = int(rng.integers(1, len(shapes.SHAPE_NAMES)))  # SHAPE_NAMES[0] is the circle
    target = (color + 1 + int(rng.integers(len(shapes.COLOR_NAMES) - 1))) % len(shapes.COLOR_NAMES)
    kind = {"grows": "small", "shrinks": "large"}.get(ACTIONS[action], "small" if rng.random() < 0.5 else "large")
    r0 = rng.uniform(*shapes._RADIUS[kind]) * size
    scale = rng.uniform(*SCALE)
    r1 = {"grows": r0 * scale, "shrinks": r0 / scale}.get(ACTIONS[action], r0)
    r_max = max(r0, r1)
    dx = dy = 0.0
    step = rng.uniform(*MOVE) * size
    if action < 4:
        dx, dy = [(-step, 0.0), (step, 0.0), (0.0, -step), (0.0, step)][action]
    x0, y0 = _inside(rng, r_max, size, dx), _inside(rng, r_max, size, dy)
    return dict(background=background, action=action, color=color, shape=shape, target=target, kind=kind,
                size_word=shapes._SIZE_WORDS[kind][int(rng.integers(2))], r=(r0, r1), x=(x0, x0 + dx),
                y=(y0, y0 + dy), turn=rng.uniform(*TURN) if action == ROTATE else 0.0,
                rgb=(shapes._jitter(rng, shapes.COLORS[shapes.COLOR_NAMES[color]], 12),
                     shapes._jitter(rng, shapes.COLORS[shapes.COLOR_NAMES[target]], 12)))


def where(c: dict, size: int) -> str:
    """Where the object starts, as the caption says it: its row for a left or right move, its column for an up or
    down move, else the third of the frame its centre is in (shapes_scenes' rule)."""
    x, y = c["x"][0] / size, c["y"][0] / size
    third = lambda v, low, high: low if v < 1 / 3 else high if v > 2 / 3 else "center"  # noqa: E731
    if c["action"] < 2:
        return third(y, "top", "bottom")
    if c["action"] < 4:
        return third(x, "left", "right")
    return shapes_scenes._where(np.array([y, x, y, x]))


def caption(c: dict) -> str:
    """"a small red circle at the top moves to the left", "a big green star in the center turns yellow"."""
    name = f"{c['size_word']} {shapes.COLOR_NAMES[c['color']]} {shapes.SHAPE_NAMES[c['shape']]}"
    return (f"{shapes._a(name)} {shapes._WHERE[c['where']][0]} "
            f"{PHRASES[c['action']].format(shapes.COLOR_NAMES[c['target']])}")


def _frame(c: dict, t: float, size: int) -> Image.Image:
    """The clip at time t in [0, 1]: every property interpolated linearly from its start to its end."""
    lerp = lambda pair: pair[0] + t * (pair[1] - pair[0])  # noqa: E731
    x, y, r = lerp(c["x"]), lerp(c["y"]), lerp(c["r"])
    rgb0, rgb1 = c["rgb"] if c["action"] == RECOLOR else (c["rgb"][0], c["rgb"][0])
    rgb = tuple(int(round(a + t * (b - a))) for a, b in zip(rgb0, rgb1))
    image = Image.new("RGB", (size, size), c["background"])
    draw = ImageDraw.Draw(image)
    name = shapes.SHAPE_NAMES[c["shape"]]
    if name == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
    else:
        angle = math.radians(t * c["turn"])
        cos, sin = math.cos(angle), math.sin(angle)  # clockwise on screen (y grows downwards)
        points = [(px - x, py - y) for px, py in shapes._polygon(name, x, y, r)]
        draw.polygon([(x + px * cos - py * sin, y + px * sin + py * cos) for px, py in points], fill=rgb)
    return image


def make_clip(seed: int, split: str, index: int, image_size: int = 64, frames: int = FRAMES):
    """(uint8 [frames, S, S, 3], caption, {label feature: int}) of one example."""
    rng = np.random.default_rng([seed, SALT, SPLITS.index(split), index])
    c = _choices(rng, image_size)
    c["where"] = where(c, image_size)
    pixels = np.stack([np.asarray(_frame(c, k / max(frames - 1, 1), image_size)) for k in range(frames)])
    return pixels, caption(c), {"label_action": c["action"], "label_color": c["color"], "label_shape": c["shape"]}


# -------------------------------------------------------------------------- records


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # flat frames: level 1 is small enough
    return buf.getvalue()


def encoded(seed: int, split: str, index: int, image_size: int) -> bytes:
    """The serialized record of one example."""
    pixels, text, labels = make_clip(seed, split, index, image_size)
    return records.serialize_clip([_png(f) for f in pixels], [text], f"{split}-{index:07d}", ints=labels)


def parse(serialized: bytes) -> dict:
    """A record back: dict(frames=uint8 [T, S, S, 3], caption, key, label_action, label_color, label_shape)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    f = tf.train.Example.FromString(serialized).features.feature
    out = dict(frames=np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                                for b in f[records.FRAMES].bytes_list.value]),
               caption=f[records.CAPTION].bytes_list.value[0].decode("utf-8"),
               key=f[records.KEY].bytes_list.value[0].decode("utf-8"))
    for name in LABEL_TASKS:
        out[name] = int(f[name].int64_list.value[0])
    return out


def read_split(paths: Sequence[str], most: int = 0) -> List[dict]:
    """The records of some shards, parsed (the first `most`; 0 = all: small splits, tests and previews)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    ds = tf.data.TFRecordDataset(list(paths))
    return [parse(r.numpy()) for r in (ds.take(most) if most else ds)]


def preview(clips: Sequence[dict], path: str, scale: int = 2) -> None:
    """A PNG strip: one clip a row, its frames side by side (upscaled `scale` times), its caption beside them."""
    import textwrap

    from PIL import ImageFont

    font = ImageFont.load_default()
    t, side = len(clips[0]["frames"]), clips[0]["frames"].shape[1] * scale
    text_w = 260
    grid = Image.new("RGB", (t * (side + 2) + text_w, len(clips) * (side + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for row, clip in enumerate(clips):
        y = row * (side + 4) + 2
        for k, frame in enumerate(clip["frames"]):
            grid.paste(Image.fromarray(frame).resize((side, side), Image.NEAREST), (k * (side + 2), y))
        label = f"[{clip['key']}] {clip['caption']} (label: {ACTIONS[clip['label_action']]})"
        for j, line in enumerate(textwrap.wrap(label, width=text_w // 6)[:4]):
            draw.text((t * (side + 2) + 4, y + 4 + 12 * j), line, fill="black", font=font)
    grid.save(path)


# --------------------------------------------------------------------------- caching


def ensure_video_dataset(cache_dir: str, seed: int = 0, image_size: int = 64,
                         sizes: Optional[Dict[str, int]] = None) -> Dict[str, List[str]]:
    """The clips' TFRecords under ``cache_dir``, written on first use: split -> shard paths (made as
    shapes.ensure_shapes_dataset's: shapes.cached_splits)."""
    sizes = dict(DEFAULT_SIZES, **(sizes or {}))
    return shapes.cached_splits(cache_dir, "shapes_video", VERSION, seed, image_size, sizes, None,
                                lambda tmp, shards: _write(tmp, seed, image_size, sizes, shards))


def _write(tmp: str, seed: int, image_size: int, sizes: Dict[str, int], shards: Dict[str, int]) -> None:
    info = dict(
        name="shapes_video", version=VERSION, seed=seed, image_size=image_size, image_format="png", frames=FRAMES,
        sizes=sizes, num_shards=shards, features=dict(LABEL_TASKS), actions=list(ACTIONS),
        class_names={t: class_names(t) for t in LABEL_TASKS.values()}, action_templates=ACTION_TEMPLATES,
    )
    shapes.write_splits(tmp, {split: sizes[split] for split in SPLITS}, shards,
                        lambda split, i: encoded(seed, split, i, image_size), info)


def video_files(split: str, config) -> List[str]:
    """A split's shards as the data settings make them (cache_dir, shapes_seed, shapes_image_size, video_sizes)."""
    from clip_jax.input.settings import data_settings

    config = data_settings(config)
    return list(ensure_video_dataset(
        config["cache_dir"] or os.path.join(os.path.expanduser("~"), ".cache", "clip_jax"),
        seed=config["shapes_seed"], image_size=config["shapes_image_size"], sizes=dict(config["video_sizes"]),
    )[split])


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="cache directory; the dataset goes in a subdirectory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=64)
    for s in SPLITS:
        p.add_argument(f"--{s}", type=int, default=None, help=f"{s} clips (default {DEFAULT_SIZES[s]})")
    p.add_argument("--preview", default="", help="write a strip of 6 train and 6 test clips with captions here")
    args = p.parse_args(argv)
    start = time.time()
    sizes = {s: getattr(args, s) for s in SPLITS if getattr(args, s) is not None}
    paths = ensure_video_dataset(args.out, args.seed, args.image_size, sizes)
    print(f"{os.path.dirname(paths['train'][0])} ready in {time.time() - start:.1f}s")
    if args.preview:
        preview(read_split(paths["train"], 6) + read_split(paths["test"], 6), args.preview)
        print(f"preview: {args.preview}")


if __name__ == "__main__":
    main()
