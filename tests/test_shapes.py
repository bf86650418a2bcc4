"""clip_jax.input.shapes: determinism, held-out combos, captions vs labels vs pixels, the cache."""

import glob
import json
import os
import re
import threading

import numpy as np
import pytest

from clip_jax.input import shapes

SIZES = {"train": 100, "validation": 20, "test": 20}
COLOR = "|".join(shapes.COLOR_NAMES)
SHAPE = "|".join(shapes.SHAPE_NAMES)
PAIR = re.compile(rf"\b({COLOR}) ({SHAPE})\b")


def mentioned(caption):
    """(colour, shape) index pairs a caption names, in order, read from its words alone."""
    return [(shapes.COLOR_NAMES.index(c), shapes.SHAPE_NAMES.index(s)) for c, s in PAIR.findall(caption)]


def read_bytes(paths):
    return {s: [open(p, "rb").read() for p in ps] for s, ps in paths.items()}


def _raw(path):
    import tensorflow as tf

    return [r.numpy() for r in tf.data.TFRecordDataset(path)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    paths = shapes.ensure_shapes_dataset(root, seed=0, sizes=SIZES, workers=1)
    return root, paths, {s: shapes.read_split(p) for s, p in paths.items()}


def test_layout_and_info(built):
    root, paths, data = built
    assert {s: len(v) for s, v in data.items()} == SIZES
    (d,) = glob.glob(os.path.join(root, "*"))  # nothing else left behind (no temp dirs)
    assert os.path.basename(d) == "shapes-v4-seed0-64px-train100x1-validation20x1-test20x1"
    info = json.load(open(os.path.join(d, "dataset_info.json")))
    assert info["sizes"] == SIZES and info["seed"] == 0
    assert info["class_names"]["combo"] == shapes.class_names("combo")
    assert info["held_out"] == shapes.held_out_names()


def test_deterministic_across_processes_and_seeds(built, tmp_path):
    _, paths, _ = built
    # Same seed, 2 worker processes and another shard count: identical records.
    again = shapes.ensure_shapes_dataset(str(tmp_path / "a"), seed=0, sizes=SIZES, num_shards={"train": 3}, workers=2)
    assert len(again["train"]) == 3
    for s in shapes.SPLITS:
        ref = sorted(r for p in paths[s] for r in _raw(p))
        assert sorted(r for p in again[s] for r in _raw(p)) == ref
    same = shapes.ensure_shapes_dataset(str(tmp_path / "b"), seed=0, sizes=SIZES, workers=1)
    assert read_bytes(same) == read_bytes(paths)
    other = read_bytes(shapes.ensure_shapes_dataset(str(tmp_path / "c"), seed=1, sizes=SIZES, workers=1))
    assert all(other[s] != read_bytes(paths)[s] for s in shapes.SPLITS)


def test_held_out_combos(built):
    _, _, data = built
    held = set(shapes.HELD_OUT)
    assert len(held) == len(shapes.COLOR_NAMES)
    assert {c for c, _ in held} == set(range(6)) and {s for _, s in held} == set(range(6))
    for split in ("train", "validation"):
        for ex in data[split]:
            assert not held & set(mentioned(ex["caption"])), ex["caption"]
            assert (ex["label_color"], ex["label_shape"]) not in held
    for ex in data["test"]:
        assert mentioned(ex["caption"])[0] in held, ex["caption"]
    # The generator itself, over more examples than the files hold.
    for i in range(300):
        objs = shapes.make_example(0, "train", i)[2]
        assert not held & {(o["color"], o["shape"]) for o in objs}
        main = shapes.make_example(0, "test", i)[2][0]
        assert (main["color"], main["shape"]) in held


def test_captions_and_labels_agree(built):
    _, _, data = built
    combos = shapes.class_names("combo")
    n_two = 0
    for split, examples in data.items():
        for ex in examples:
            pairs = mentioned(ex["caption"])
            assert 1 <= len(pairs) <= 2, ex["caption"]
            n_two += len(pairs) == 2
            c, s = pairs[0]  # the first-mentioned object is the labelled one
            assert (ex["label_color"], ex["label_shape"]) == (c, s), ex["caption"]
            assert ex["label"] == shapes.combo_index(c, s)
            assert combos[ex["label"]] == f"{shapes.COLOR_NAMES[c]} {shapes.SHAPE_NAMES[s]}"
            assert ex["key"].startswith(split + "-")
    assert n_two > 10  # both kinds of image occur


def test_image_size(built, tmp_path):
    _, _, data = built
    for examples in data.values():
        for ex in examples:
            assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    small = shapes.ensure_shapes_dataset(str(tmp_path), image_size=32, sizes={"train": 8, "validation": 4, "test": 4})
    assert "32px" in small["train"][0]
    for ex in shapes.read_split(small["train"] + small["test"]):
        assert ex["image"].shape == (32, 32, 3)


def _mask(image, color):
    """Pixels within the generator's colour jitter (12) of a named colour. No anti-aliasing
    and lossless PNG: a shape's pixels are exactly its drawn colour."""
    return (np.abs(image.astype(int) - np.array(shapes.COLORS[color])) <= 12).all(-1)


def test_pixels_show_what_the_caption_says(built):
    _, _, data = built
    checked_where = checked_relation = 0
    for ex in [e for v in data.values() for e in v]:
        pairs = mentioned(ex["caption"])
        colors = [shapes.COLOR_NAMES[c] for c, _ in pairs]
        main = _mask(ex["image"], colors[0])
        assert main.sum() >= 20, ex["caption"]  # the smallest shape (a small star) is ~35 px
        # Background and other colours never pass for the named colour.
        assert main.sum() < 0.5 * main.size
        ys, xs = np.nonzero(main)
        if len(pairs) == 1:
            h = ex["image"].shape[0] / 2
            where = {"left": xs.mean() < h, "right": xs.mean() > h, "top": ys.mean() < h, "bottom": ys.mean() > h}
            for word, ok in where.items():
                if re.search(rf"(on|at|near) the {word}", ex["caption"]):
                    assert ok, ex["caption"]
                    checked_where += 1
        elif colors[0] != colors[1]:
            ys2, xs2 = np.nonzero(_mask(ex["image"], colors[1]))
            rel = {
                "to the left of": xs.max() < xs2.min(),
                "to the right of": xs.min() > xs2.max(),
                "above": ys.max() < ys2.min(),
                "below": ys.min() > ys2.max(),
            }
            for words, ok in rel.items():
                if f" {words} " in ex["caption"]:
                    assert ok, ex["caption"]  # and the shapes do not overlap
                    checked_relation += 1
    assert checked_where > 5 and checked_relation > 5


def test_cache_reuses_files(built, monkeypatch):
    root, paths, _ = built
    mtimes = {p: os.stat(p).st_mtime_ns for ps in paths.values() for p in ps}
    monkeypatch.setattr(shapes, "_write", lambda *a, **k: pytest.fail("regenerated"))
    assert shapes.ensure_shapes_dataset(root, seed=0, sizes=SIZES) == paths
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes


def test_concurrent_writers(built, tmp_path):
    _, paths, _ = built
    results = []
    def build():
        results.append(shapes.ensure_shapes_dataset(str(tmp_path), sizes=SIZES))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(os.listdir(tmp_path)) == 1  # the loser's temp dir is gone
    assert read_bytes(results[0]) == read_bytes(paths)


def test_class_names_and_prompts():
    assert shapes.class_names("color") == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert len(shapes.class_names("shape")) == 6 and len(shapes.class_names("combo")) == 36
    with pytest.raises(ValueError):
        shapes.class_names("size")
    assert shapes.prompt("a photo of a {}.", "orange star") == "a photo of an orange star."
    assert shapes.prompt("a {} shape.", "red") == "a red shape."
    combo = shapes.prompts("combo")
    assert len(combo) == 36 and all(len(p) == len(shapes.TEMPLATES) for p in combo)
    color = shapes.prompts("color")
    assert len(color) == 6 and all("orange" in t for t in color[5]) and len(color[0]) == 6 * len(shapes.TEMPLATES)


def test_dense_labels_match_the_pixels(built):
    """Every object's colour, shape and box, and the per-pixel object map, agree with the image."""
    _, _, data = built
    for ex in [e for v in data.values() for e in v]:
        seg, objs, size = ex["segmentation"], ex["objects"], ex["image"].shape[0]
        assert seg.shape == (size, size) and set(np.unique(seg)) == set(range(len(objs) + 1))
        assert [(o["color"], o["shape"]) for o in objs] == mentioned(ex["caption"])  # caption order
        for k, obj in enumerate(objs, start=1):
            ys, xs = np.nonzero(seg == k)
            ymin, xmin, ymax, xmax = obj["bbox"] * size
            assert ymin - 1 <= ys.min() and ys.max() <= ymax + 1 and xmin - 1 <= xs.min() and xs.max() <= xmax + 1
            # the object's pixels are drawn in its colour; the background's never are
            assert _mask(ex["image"][seg == k][None], shapes.COLOR_NAMES[obj["color"]]).all()
        assert not _mask(ex["image"][seg == 0][None], shapes.COLOR_NAMES[objs[0]["color"]]).any()


def test_evaluation_is_well_posed_a_labeller_reading_the_objects_scores_100(built):
    """Validation and test images hold one object each: a labeller that reads the generator's own
    objects (the dense labels) scores 100% against the labels zero-shot evaluation scores with, on
    every task. (With two objects and the first-mentioned one as the label, no labeller could.)"""
    _, paths, data = built
    from clip_jax.input import eval_data

    for split in ("validation", "test"):
        assert all(len(ex["objects"]) == 1 for ex in data[split])
        info = eval_data.describe(f"shapes:{split}", {"cache_dir": os.path.dirname(os.path.dirname(paths["train"][0])),
                                                      "shapes_sizes": SIZES})
        keys = list(eval_data.SHAPES_TASKS)  # the label features evaluation reads, one per task
        batches = eval_data.eval_batches(info, {"cache_dir": os.path.dirname(os.path.dirname(paths["train"][0])),
                                                "shapes_sizes": SIZES}, batch_size=8, image_size=64, context_length=77,
                                         label_keys=keys)
        labels = np.concatenate([b["labels"][b["mask"].astype(bool)] for b in batches])
        assert len(labels) == SIZES[split]
        labeller = {"label": lambda o: shapes.combo_index(o[0]["color"], o[0]["shape"]),
                    "label_color": lambda o: o[0]["color"], "label_shape": lambda o: o[0]["shape"],
                    "label_count": lambda o: len(o) - 1}
        for j, key in enumerate(keys):
            predicted = np.array([labeller[key](ex["objects"]) for ex in data[split]])
            assert (predicted == labels[:, j]).mean() == 1.0, (split, key)
