"""clip_jax.input.shapes_scenes: pixels vs visible masks vs boxes vs caption spans, determinism, the cache,
the CLI, and the data spec through training and evaluation readers."""

import glob
import json
import os
import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from clip_jax.input import shapes, shapes_scenes  # noqa: E402

SIZES = {"train": 60, "validation": 12, "test": 12}
COLOR = "|".join(shapes.COLOR_NAMES)
SHAPE = "|".join(shapes.SHAPE_NAMES)
SIZE = "|".join(w for words in shapes._SIZE_WORDS.values() for w in words)
NAME = re.compile(rf"\b(?:(?:{SIZE}) )?({COLOR}) ({SHAPE})\b")


def _raw(paths):
    return sorted(r.numpy() for p in paths for r in tf.data.TFRecordDataset(p))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    paths = shapes_scenes.ensure_scenes_dataset(root, seed=0, sizes=SIZES)
    return root, paths, {s: shapes_scenes.read_split(p) for s, p in paths.items()}


def test_layout_info_and_novel_shapes(built):
    root, paths, data = built
    assert {s: len(v) for s, v in data.items()} == SIZES
    (d,) = glob.glob(os.path.join(root, "*"))  # no temporary directory left behind
    assert os.path.basename(d) == "shapes_scenes-v1-seed0-64px-train60x1-validation12x1-test12x1"
    info = json.load(open(os.path.join(d, "dataset_info.json")))
    assert info["sizes"] == SIZES and info["novel_shapes"] == list(shapes.NOVEL_SHAPES)
    assert len(set(shapes.NOVEL_SHAPES)) == 2 and set(shapes.NOVEL_SHAPES) <= set(shapes.SHAPE_NAMES)
    # a second call finds the cache: the same paths, nothing written
    assert shapes_scenes.ensure_scenes_dataset(root, seed=0, sizes=SIZES) == paths


def test_pixels_masks_boxes_and_captions_agree(built):
    """Independently of the generator: every mask pixel of object k shows k's colour (so the mask is what is
    visible, occluders included), background pixels are grey, boxes are the extent of the mask, the
    caption's spans name each object's colour and shape in mask order, largest visible area first."""
    _, _, data = built
    counts = set()
    for ex in data["train"] + data["test"]:
        image, seg, objs, caption = ex["image"].astype(int), ex["segmentation"], ex["objects"], ex["caption"]
        n = len(objs)
        counts.add(n)
        assert 2 <= n <= 5 and seg.shape == image.shape[:2]
        areas = np.bincount(seg.ravel(), minlength=n + 1)
        assert len(areas) == n + 1 and (areas[1:] >= shapes_scenes.MIN_PIXELS).all()
        assert (np.diff(areas[1:]) <= 0).all()  # caption order: largest visible first
        grey = image[seg == 0]
        assert (grey.max(1) - grey.min(1) <= 16).all()
        for k, obj in enumerate(objs, 1):
            want = np.array(shapes.COLORS[shapes.COLOR_NAMES[obj["color"]]])
            assert (np.abs(image[seg == k] - want) <= 12).all()
            ys, xs = np.nonzero(seg == k)
            np.testing.assert_allclose(obj["bbox"], np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / 64,
                                       atol=1e-6)
            a, b = obj["phrase_span"]
            named = NAME.fullmatch(caption[a:b])
            assert named, (caption, caption[a:b])
            assert named.groups() == (shapes.COLOR_NAMES[obj["color"]], shapes.SHAPE_NAMES[obj["shape"]])
        pairs = [(o["color"], o["shape"]) for o in objs]
        assert [(shapes.COLOR_NAMES.index(c), shapes.SHAPE_NAMES.index(s)) for c, s in NAME.findall(caption)] == pairs
        assert len(set(pairs)) == n
        assert ex["label"] == shapes.combo_index(*pairs[0])
        assert (ex["label_color"], ex["label_shape"]) == pairs[0]
        zh = ex["caption_zh"]
        names_zh = [shapes.COLOR_NAMES_ZH[c] + shapes.SHAPE_NAMES_ZH[s] for c, s in pairs]
        where = [zh.find(name) for name in names_zh]
        assert min(where) >= 0 and where == sorted(where), (zh, names_zh)
    assert counts == {2, 3, 4, 5}


def test_objects_overlap_somewhere(built):
    """Occlusion happens: some object's visible area is smaller than its own drawn area."""
    _, _, data = built
    hidden = 0
    for ex in data["train"]:
        for k, obj in enumerate(ex["objects"], 1):
            own = np.count_nonzero(_draw_alone(obj, ex))
            hidden += int(np.count_nonzero(ex["segmentation"] == k) < own)
    assert hidden > 0


def _draw_alone(obj, ex):
    """The object's own pixels, drawn alone from the generator's geometry (shapes' polygons)."""
    index = int(ex["key"].split("-")[1])
    _, _, objs, _, _ = shapes_scenes.make_example(0, ex["key"].split("-")[0], index)
    match = [o for o in objs if (o["color"], o["shape"]) == (obj["color"], obj["shape"])][0]
    from PIL import Image, ImageDraw

    alone = Image.new("L", (64, 64), 0)
    shapes._draw(ImageDraw.Draw(alone), shapes.SHAPE_NAMES[match["shape"]], match["x"], match["y"], match["r"], 1)
    return np.asarray(alone)


def test_deterministic_whatever_the_sharding_and_seeded(built, tmp_path):
    _, paths, _ = built
    again = shapes_scenes.ensure_scenes_dataset(str(tmp_path / "a"), seed=0, sizes=SIZES, num_shards={"train": 3})
    assert len(again["train"]) == 3
    for s in shapes_scenes.SPLITS:
        assert _raw(again[s]) == _raw(paths[s])
    other = shapes_scenes.ensure_scenes_dataset(str(tmp_path / "b"), seed=1, sizes=SIZES)
    assert _raw(other["test"]) != _raw(paths["test"])


def test_cli_writes_the_scenes(tmp_path, capsys):
    shapes.main(["--out", str(tmp_path), "--variant=scenes", "--train=6", "--validation=2", "--test=2",
                 "--preview", str(tmp_path / "p.png")])
    (d,) = glob.glob(str(tmp_path / "shapes_scenes-v1-*"))
    assert json.load(open(os.path.join(d, "dataset_info.json")))["sizes"] == {"train": 6, "validation": 2, "test": 2}
    assert os.path.getsize(tmp_path / "p.png") > 0 and "ready in" in capsys.readouterr().out


def test_the_data_spec_trains_and_evaluates(built, tmp_path):
    from clip_jax.input import catalog, eval_data
    from clip_jax.input.pipeline import InputPipeline, parse_spec

    root, _, data = built
    config = {"cache_dir": root, "scenes_sizes": SIZES, "shuffle_buffer": 8}
    assert parse_spec("shapes_scenes:test|lang=zh").caption_feature == "caption_zh"
    with pytest.raises(ValueError, match="split 'dev' not in"):
        parse_spec("shapes_scenes:dev")
    batch = next(InputPipeline("shapes_scenes:train", config, global_batch_size=4, image_size=32, train=True))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["tokens"].shape == (4, 77)
    info = eval_data.describe("shapes_scenes:test", config, label_keys=["label_shape"])
    assert (info.name, info.num_examples) == ("shapes_scenes.test", SIZES["test"])
    assert catalog.of("shapes_scenes:test").default_label_keys(info.source) == ["label", "label_color", "label_shape"]
    rows = [b for b in eval_data.eval_batches(info, config, batch_size=8, image_size=64, context_length=77,
                                              label_keys=["label_shape"])]
    labels = np.concatenate([b["labels"][b["mask"]] for b in rows])[:, 0]
    assert labels.tolist() == [ex["label_shape"] for ex in data["test"]]
    assert eval_data.metric_name(parse_spec("shapes_scenes:test|lang=zh")) == "shapes_scenes_zh.test"
    from clip_jax.evaluate.evaluator import Evaluator, parse_evals

    specs = parse_evals("zero_shot=shapes_scenes:test|lang=zh,linear_probe=shapes_scenes")
    assert [s.data for s in specs] == ["shapes_scenes:test|lang=zh", "shapes_scenes"]
    evaluator = Evaluator(specs, config, image_size=32, context_length=77)
    assert sorted(g.data for g in evaluator.groups.values()) == ["shapes_scenes:test", "shapes_scenes:test|lang=zh",
                                                                  "shapes_scenes:train", "shapes_scenes:validation"]
