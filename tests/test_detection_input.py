"""clip_jax.input.detection: the batch key 'boxes' against the cropped and flipped segmentation map (the visible
pixels of each object), padding and counts against the records, each bad-input rule against a closed form, the
evaluation features, the COCO / LVIS converter against its JSON, and tfds coco's features as a source."""

import io
import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

from clip_jax.input import detection, eval_data, ops, shapes, shapes_scenes  # noqa: E402
from clip_jax.input.convert_detection import convert  # noqa: E402
from clip_jax.input.pipeline import InputPipeline  # noqa: E402
from clip_jax.methods.base import BatchInput  # noqa: E402

SIZES = {"train": 24, "validation": 4, "test": 10}
READS = ("objects/bbox", "objects/shape", "objects/color")
RECORD_READS = ("objects/bbox", "objects/label", "objects/is_crowd")


def boxes_key(labels="shape", reads=READS, **options):
    return BatchInput("boxes", "boxes", reads, tuple({"labels": labels, **options}.items()))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    paths = shapes_scenes.ensure_scenes_dataset(root, sizes=SIZES)
    config = {"cache_dir": root, "scenes_sizes": SIZES, "shuffle_buffer": 8, "image_dtype": "uint8",
              "resize_method": "nearest"}
    return config, paths, {s: shapes_scenes.read_split(p) for s, p in paths.items()}


def _pixel_box(seg, k):
    """The box (x1, y1, x2, y2) of the pixels of object k in a label map, None where none is visible."""
    ys, xs = np.nonzero(seg == k)
    return None if len(ys) == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_boxes_take_the_crop_and_flip_of_the_segmentation(scenes):
    """The reference: the record's object map cropped and flipped as its image (op 'crop' on 'segmentation'). A box
    the crop did not cut is the box of its object's pixels (1 px); a cut one contains them, clipped to the input;
    every object with a visible pixel keeps its box (min_visible 0), with its shape as label."""
    config, _, data = scenes
    config = dict(config, crop_scale=(0.3, 0.6))
    size = 64  # the record's own size: the window (<= 64 px) is never shrunk, so nearest resizing skips no pixel
    by_caption = {ex["caption"]: ex for ex in data["train"]}
    flip = (("flip", True),)
    inputs = (BatchInput("image", "crop", ("image",), flip), BatchInput("seg", "crop", ("segmentation",), flip),
              BatchInput("caption", "value", ("caption",)), boxes_key(max_objects=6))
    pipe = InputPipeline("shapes_scenes:train", config, global_batch_size=8, image_size=size, train=True,
                         num_epochs=1, inputs=inputs)
    unflipped = InputPipeline("shapes_scenes:train", config, global_batch_size=8, image_size=size, train=True,
                              num_epochs=1, inputs=(BatchInput("seg", "crop", ("segmentation",)),))
    whole = cut = flipped = 0
    for batch, plain in zip(pipe, unflipped):
        assert batch["boxes"].shape == (8, 6, 4) and batch["boxes"].dtype == np.float32
        for i, caption in enumerate(batch["caption"]):
            objects = by_caption[caption.decode()]["objects"]
            seg = batch["seg"][i]
            valid, index = batch["boxes/valid"][i], batch["boxes/index"][i]
            kept = set(index[valid].tolist())
            for k in range(len(objects)):
                if _pixel_box(seg, k + 1) is not None:
                    assert k in kept, (k, index)
            for box, label, k in zip(batch["boxes"][i][valid], batch["boxes/labels"][i][valid], index[valid]):
                assert label == objects[k]["shape"]
                ref = _pixel_box(seg, k + 1)
                at_border = np.isclose(box, 0.0, atol=1e-4) | np.isclose(box, size, atol=1e-4)
                if not at_border.any():
                    whole += 1
                    np.testing.assert_allclose(box, ref, atol=1.0)
                elif ref is not None:
                    cut += 1
                    assert (box[:2] <= ref[:2] + 1).all() and (box[2:] >= ref[2:] - 1).all(), (box, ref)
            flipped += not np.array_equal(seg, plain["seg"][i])
        assert not np.isnan(batch["boxes"]).any()
        assert (batch["boxes"][~batch["boxes/valid"]] == 0).all() and (batch["boxes/labels"][~batch["boxes/valid"]]
                                                                       == -1).all()
    assert whole > 5 and cut > 5 and 0 < flipped < SIZES["train"]


def test_excluded_classes_never_reach_a_batch_and_are_counted(scenes):
    """Open-vocabulary training: the boxes of held-out classes are dropped before padding, in record order."""
    config, _, data = scenes
    by_caption = {ex["caption"]: ex for ex in data["train"]}
    held_out = (shapes.SHAPE_NAMES.index("star"), shapes.SHAPE_NAMES.index("cross"))
    inputs = (BatchInput("caption", "value", ("caption",)), boxes_key("shape", exclude=held_out))
    pipe = InputPipeline("shapes_scenes:train", config, global_batch_size=8, image_size=64, train=False, num_epochs=1,
                         inputs=inputs)
    excluded = 0
    for batch in pipe:
        for i, caption in enumerate(batch["caption"]):
            objects = [o for o in by_caption[caption.decode()]["objects"] if o["shape"] not in held_out]
            n = len(objects)
            excluded += len(by_caption[caption.decode()]["objects"]) - n
            np.testing.assert_allclose(batch["boxes"][i][:n], [o["bbox"][[1, 0, 3, 2]] * 64 for o in objects],
                                       atol=1e-4)
            np.testing.assert_array_equal(batch["boxes/labels"][i][:n], [o["shape"] for o in objects])
            assert batch["boxes/valid"][i].sum() == n
    assert excluded > 0 and pipe.tallies()["boxes/excluded"] == excluded


def test_padding_overflow_and_tallies_against_the_records(scenes):
    """Evaluation crop of a square record = the whole image: boxes = objects/bbox * S as (x1, y1, x2, y2); more
    objects than max_objects keep the first ones and count the rest."""
    config, _, data = scenes
    by_caption = {ex["caption"]: ex for ex in data["train"]}
    inputs = (BatchInput("caption", "value", ("caption",)), boxes_key("combo", max_objects=3))
    pipe = InputPipeline("shapes_scenes:train", config, global_batch_size=8, image_size=64, train=False, num_epochs=1,
                         inputs=inputs)
    overflow = seen = 0
    after_first = None
    for batch in pipe:
        after_first = after_first or pipe.state()
        for i, caption in enumerate(batch["caption"]):
            objects = by_caption[caption.decode()]["objects"]
            n = min(len(objects), 3)
            want = np.array([o["bbox"][[1, 0, 3, 2]] * 64 for o in objects[:n]], np.float32)
            np.testing.assert_allclose(batch["boxes"][i][:n], want, atol=1e-4)
            np.testing.assert_array_equal(batch["boxes"][i][n:], 0)
            combos = [o["color"] * len(shapes.SHAPE_NAMES) + o["shape"] for o in objects[:n]]
            np.testing.assert_array_equal(batch["boxes/labels"][i], combos + [-1] * (3 - n))
            np.testing.assert_array_equal(batch["boxes/valid"][i], np.arange(3) < n)
            np.testing.assert_array_equal(batch["boxes/counts"][i], [0, 0, 0, 0, 0, len(objects) - n])
            overflow += len(objects) - n
            seen += 1
    assert seen == SIZES["train"] and overflow > 0
    assert pipe.tallies() == {"boxes/invalid": 0, "boxes/clipped": 0, "boxes/crowd": 0, "boxes/excluded": 0,
                              "boxes/cropped": 0,
                              "boxes/overflow": overflow}
    resumed = InputPipeline("shapes_scenes:train", config, global_batch_size=8, image_size=64, train=False,
                            num_epochs=1, inputs=inputs, state=after_first)
    list(resumed)
    assert resumed.tallies() == pipe.tallies()  # the counts travel in the input state a checkpoint keeps


def _png(h, w):
    """An image whose red channel is each pixel's column and green its row: a crop shows where it was taken."""
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    buf = io.BytesIO()
    Image.fromarray(np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _record(boxes, labels, crowd=None, key="r", h=64, w=128):
    def floats(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(v, np.float32).reshape(-1)))

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png(h, w)])),
               "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
               "objects/bbox": floats(boxes), "objects/label": ints(labels),
               "objects/is_crowd": ints(crowd if crowd is not None else [0] * len(labels))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# A 64 x 128 image; the evaluation crop of 64 px keeps columns 32..96 (x in [0.25, 0.75]).
RULES = [  # (ymin, xmin, ymax, xmax), label, crowd, the rule's outcome
    ((0.1, 0.3, 0.5, 0.6), 0, 0, "kept"),
    ((0.5, 0.4, 0.2, 0.6), 1, 0, "invalid"),  # inverted
    ((0.2, 0.4, 0.2, 0.6), 1, 0, "invalid"),  # zero area
    ((np.nan, 0.4, 0.5, 0.6), 1, 0, "invalid"),
    ((0.2, 1.2, 0.5, 1.5), 1, 0, "invalid"),  # wholly outside the image
    ((-0.2, 0.5, 0.5, 0.7), 2, 0, "clipped"),  # partly outside: clipped to the image, kept
    ((0.3, 0.3, 0.6, 0.5), 2, 1, "crowd"),
    ((0.0, 0.0, 1.0, 0.3125), 1, 0, "small"),  # 8 of its 40 px columns inside the crop: 20% visible
    ((0.0, 0.0, 1.0, 0.2), 1, 0, "cropped"),  # wholly outside the crop
    ((0.6, 0.45, np.inf, 0.55), 0, 0, "invalid"),
]


def _rule_records(path):
    good = _record([r[0] for r in RULES], [r[1] for r in RULES], [r[2] for r in RULES], "rules")
    bad = [_record([(0.1, 0.3, 0.5, 0.6)], [3], key="label_3"),  # outside num_classes=3
           _record([(0.1, 0.3, 0.5, 0.6)], [-1], key="label_-1"),
           _record([(0.1, 0.3, 0.5, 0.6), (0.1, 0.3, 0.5, 0.7)], [0], key="one_label_two_boxes"),
           _record([(0.1, 0.3, 0.5, 0.6)], [0], [0, 1], key="two_crowd_flags")]
    empty = _record(np.zeros([0, 4]), [], key="empty")
    with tf.io.TFRecordWriter(path) as w:
        for r in [good, *bad, empty]:
            w.write(r)


def _expected(rules):
    """Closed form: x' = 128 x - 32, y' = 64 y, clipped to [0, 64]."""
    boxes = [np.clip([128 * b[1] - 32, 64 * max(b[0], 0), 128 * b[3] - 32, 64 * b[2]], 0, 64) for b, *_ in rules]
    return np.array(boxes, np.float32), [label for _, label, *_ in rules]


@pytest.mark.parametrize("min_visible", [0.0, 0.25])
def test_every_bad_input_rule_is_applied_and_counted(tmp_path, min_visible):
    path = str(tmp_path / "rules-00000-of-00001.tfrecord")
    _rule_records(path)
    inputs = (BatchInput("key", "value", ("key",)),
              boxes_key("record", RECORD_READS, num_classes=3, max_objects=4, min_visible=min_visible))
    config = {"image_dtype": "uint8", "resize_method": "nearest"}
    pipe = InputPipeline(f"tfrecord:{path}", config, global_batch_size=1, image_size=64, train=False, num_epochs=1,
                         inputs=inputs)
    rows = {b["key"][0].decode(): b for b in pipe}
    assert sorted(rows) == ["empty", "rules"]
    assert pipe.bad_records()["bad_boxes"] == 4
    kept = [r for r in RULES if r[3] in ("kept", "clipped") or (r[3] == "small" and not min_visible)]
    want_boxes, want_labels = _expected(kept)
    got = rows["rules"]
    np.testing.assert_allclose(got["boxes"][0][:len(kept)], want_boxes, atol=1e-4)
    np.testing.assert_array_equal(got["boxes/labels"][0], want_labels + [-1] * (4 - len(kept)))
    np.testing.assert_array_equal(got["boxes/index"][0][:len(kept)], [RULES.index(r) for r in kept])
    outcome = [r[3] for r in RULES]
    cropped = outcome.count("cropped") + (outcome.count("small") if min_visible else 0)
    want_counts = [outcome.count("invalid"), outcome.count("clipped"), outcome.count("crowd"), 0, cropped, 0]
    np.testing.assert_array_equal(got["boxes/counts"][0], want_counts)
    assert not rows["empty"]["boxes/valid"].any() and not np.isnan(got["boxes"]).any()
    assert pipe.tallies() == dict(zip((f"boxes/{c}" for c in detection.COUNTS), want_counts))
    # fewer slots than kept boxes: the first max_objects stay, the rest are overflow
    inputs = (inputs[0], boxes_key("record", RECORD_READS, num_classes=3, max_objects=1, min_visible=min_visible))
    pipe = InputPipeline(f"tfrecord:{path}", config, global_batch_size=1, image_size=64, train=False, num_epochs=1,
                         inputs=inputs)
    rows = {b["key"][0].decode(): b for b in pipe}
    np.testing.assert_allclose(rows["rules"]["boxes"][0], want_boxes[:1], atol=1e-4)
    assert rows["rules"]["boxes/counts"][0][-1] == len(kept) - 1


def test_the_random_square_crop_and_flip_move_boxes_as_the_image(tmp_path):
    """crop='random' (resize the shorter side, random square window): the window's offset and the flip read off
    the cropped image's coordinate pixels give the boxes in closed form."""
    path = str(tmp_path / "rules-00000-of-00001.tfrecord")
    _rule_records(path)
    kept = [r for r in RULES if r[3] in ("kept", "clipped", "small", "cropped")]  # those rules 1-3 leave
    config = {"image_dtype": "uint8", "resize_method": "nearest", "crop": "random"}
    inputs = (BatchInput("image", "crop", ("image",), (("flip", True),)), BatchInput("key", "value", ("key",)),
              boxes_key("record", RECORD_READS, num_classes=3, max_objects=4))
    flips = set()
    for epoch_seed in range(4):
        pipe = InputPipeline(f"tfrecord:{path}", config, global_batch_size=1, image_size=64, train=True,
                             num_epochs=1, seed=epoch_seed, inputs=inputs)
        (row,) = [b for b in pipe if b["key"][0] == b"rules"]
        red = row["image"][0, 0, :, 0].astype(int)
        flip = red[0] > red[-1]
        left = red[-1] if flip else red[0]
        want = np.array([[128 * b[1] - left, 64 * max(b[0], 0), 128 * b[3] - left, 64 * b[2]] for b, *_ in kept])
        want = np.clip(want, 0, 64)
        survives = (want[:, 2] > want[:, 0]) & (want[:, 3] > want[:, 1])
        want = want[survives]
        if flip:
            want = np.stack([64 - want[:, 2], want[:, 1], 64 - want[:, 0], want[:, 3]], -1)
        n = len(want)
        np.testing.assert_allclose(row["boxes"][0][:n], want, atol=1e-4)
        assert row["boxes/valid"][0].sum() == n and row["boxes/counts"][0][4] == len(kept) - n
        flips.add(bool(flip))
    assert flips == {False, True}


def test_evaluation_reads_uncropped_boxes_and_the_image_size(scenes, tmp_path):
    config, _, data = scenes
    info = eval_data.describe("shapes_scenes:test", config)
    rows = list(eval_data.eval_batches(info, config, batch_size=4, image_size=32, context_length=77,
                                       features=("boxes/shape", "image/size")))
    got = [detection.read_boxes(s) for b in rows for s, real in zip(b["boxes/shape"], b["mask"]) if real]
    assert len(got) == SIZES["test"]
    for g, ex in zip(got, data["test"]):  # the record's own 64 px, not the 32 px input
        np.testing.assert_allclose(g["boxes"], [o["bbox"][[1, 0, 3, 2]] * 64 for o in ex["objects"]], atol=1e-4)
        np.testing.assert_array_equal(g["labels"], [o["shape"] for o in ex["objects"]])
    assert (np.concatenate([b["image/size"][b["mask"]] for b in rows]) == 64).all()

    path = str(tmp_path / "rules-00000-of-00001.tfrecord")
    _rule_records(path)
    info = eval_data.describe(f"tfrecord:{path}", config)
    rows = list(eval_data.eval_batches(info, config, batch_size=8, image_size=64, context_length=77,
                                       features=("boxes/record",)))
    got = [detection.read_boxes(s) for b in rows for s, real in zip(b["boxes/record"], b["mask"]) if real]
    assert len(got) == 3  # the rules record, the empty one and label 3 (no class count here); the label < 0 and
    # the records whose labels or crowd flags do not line up with their boxes are skipped
    rules = next(g for g in got if len(g["labels"]) > 2)
    survivors = [r for r in RULES if r[3] != "invalid"]  # uncropped: only rules 1 and 2 apply, crowd flagged
    want = np.array([np.clip([128 * b[1], 64 * b[0], 128 * b[3], 64 * b[2]], 0, [128, 64, 128, 64])
                     for b, *_ in survivors], np.float32)
    np.testing.assert_allclose(rules["boxes"], want, atol=1e-4)
    np.testing.assert_array_equal(rules["crowd"], [r[2] == 1 for r in survivors])


def _coco(tmp_path, lvis=False):
    sizes = [(40, 60), (50, 30), (20, 20)]  # (height, width)
    (tmp_path / "images").mkdir()
    images = []
    for i, (h, w) in enumerate(sizes):
        name = f"{i:012d}.{'jpg' if i == 1 else 'png'}"
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(tmp_path / "images" / name)
        image = {"id": 100 + i, "height": h, "width": w}
        if lvis:
            image.update(coco_url=f"http://images.cocodataset.org/val2017/{name}", not_exhaustive_category_ids=[9],
                         neg_category_ids=[1, 9])
        else:
            image["file_name"] = name
        images.append(image)
    cats = [{"id": 9, "name": "star"}, {"id": 1, "name": "circle"}, {"id": 5, "name": "square"}]
    anns = [{"id": 1, "image_id": 100, "category_id": 5, "bbox": [6.0, 4.0, 30.0, 20.0], "iscrowd": 0},
            {"id": 2, "image_id": 100, "category_id": 9, "bbox": [0.0, 0.0, 60.0, 40.0], "iscrowd": 1},
            {"id": 3, "image_id": 101, "category_id": 1, "bbox": [3.0, 5.0, 12.0, 10.0], "iscrowd": 0}]
    if lvis:  # no iscrowd; a frequency per class
        for a in anns:
            a.pop("iscrowd")
        for c, f in zip(cats, ("r", "f", "c")):
            c["frequency"] = f
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path), str(tmp_path / "images"), images, anns


@pytest.mark.parametrize("lvis", [False, True])
def test_coco_and_lvis_json_convert_to_records_the_op_reads(tmp_path, lvis):
    annotations, folder, images, anns = _coco(tmp_path, lvis)
    prefix = str(tmp_path / "out" / "coco")
    (shard,) = convert(annotations, folder, prefix)
    classes = json.loads(open(prefix + ".classes.json").read())
    assert [(c["index"], c["id"], c["name"]) for c in classes] == [(0, 1, "circle"), (1, 5, "square"), (2, 9, "star")]
    index = {1: 0, 5: 1, 9: 2}
    stored = [tf.train.Example.FromString(r.numpy()).features.feature for r in tf.data.TFRecordDataset(shard)]
    assert [f["key"].bytes_list.value[0].decode() for f in stored] == ["100", "101", "102"]
    for f, image in zip(stored, images):
        mine = [a for a in anns if a["image_id"] == image["id"]]
        h, w = image["height"], image["width"]
        want = [[a["bbox"][1] / h, a["bbox"][0] / w, (a["bbox"][1] + a["bbox"][3]) / h,
                 (a["bbox"][0] + a["bbox"][2]) / w] for a in mine]
        np.testing.assert_allclose(np.reshape(f["objects/bbox"].float_list.value, (-1, 4)), np.reshape(want, (-1, 4)),
                                   rtol=1e-6)
        assert list(f["objects/label"].int64_list.value) == [index[a["category_id"]] for a in mine]
        assert list(f["objects/is_crowd"].int64_list.value) == [a.get("iscrowd", 0) for a in mine]
        if lvis:
            assert list(f["lvis/not_exhaustive"].int64_list.value) == [2]
            assert list(f["lvis/neg"].int64_list.value) == [0, 2]
    # through the op: the 40 x 60 image's evaluation crop at 40 px keeps columns 10..50 (scale 1)
    inputs = (BatchInput("key", "value", ("key",)), boxes_key("record", RECORD_READS, num_classes=3, max_objects=2))
    pipe = InputPipeline(f"tfrecord:{prefix}-*.tfrecord", {"image_dtype": "uint8"}, global_batch_size=3,
                         image_size=40, train=False, num_epochs=1, inputs=inputs)
    (batch,) = list(pipe)
    crowd = [0.0, 0.0, 40.0, 40.0]  # the whole image: a crowd box in COCO (dropped), a plain one in LVIS
    np.testing.assert_allclose(batch["boxes"][0], [[0.0, 4.0, 26.0, 24.0], crowd if lvis else [0] * 4], atol=1e-4)
    np.testing.assert_array_equal(batch["boxes/labels"][0], [1, 2 if lvis else -1])
    assert pipe.tallies()["boxes/crowd"] == (0 if lvis else 1)


def test_the_converter_names_bad_input(tmp_path):
    annotations, folder, images, anns = _coco(tmp_path)
    data = json.loads(open(annotations).read())
    data["annotations"].append({"id": 9, "image_id": 100, "category_id": 77, "bbox": [0, 0, 1, 1]})
    open(annotations, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="names category 77, which is not in the JSON's categories"):
        convert(annotations, folder, str(tmp_path / "a"))
    data["annotations"].pop()
    data["images"][0]["width"] = 61
    open(annotations, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="60x40 px, but .* says 61x40"):
        convert(annotations, folder, str(tmp_path / "a"))
    data["images"][0]["file_name"] = "nope.jpg"
    open(annotations, "w").write(json.dumps(data))
    with pytest.raises(FileNotFoundError, match="1 images .* \\(the first: 'nope.jpg'\\)"):
        convert(annotations, folder, str(tmp_path / "a"))


def test_bad_declarations_are_named():
    with pytest.raises(ValueError, match="unknown box label set 'size'"):
        ops.resolve([boxes_key("size")])
    with pytest.raises(ValueError, match="labels='record' reads \\('objects/bbox', 'objects/label'\\)"):
        ops.resolve([boxes_key("record", READS, num_classes=3)])
    with pytest.raises(ValueError, match="labels='record' needs num_classes=C"):
        ops.resolve([boxes_key("record", RECORD_READS)])
    with pytest.raises(ValueError, match="max_objects must be an int >= 1"):
        ops.resolve([boxes_key(max_objects=0)])
    with pytest.raises(ValueError, match="min_visible must be a fraction"):
        ops.resolve([boxes_key(min_visible=2)])
    with pytest.raises(ValueError, match="batch key 'boxes/labels' is declared twice"):
        ops.resolve([boxes_key(), BatchInput("boxes/labels", "value", ("labels",))])
    (w, _), = ops.resolve([BatchInput("image", "crop", ("image",), (("flip", True),)), boxes_key()])[1:]
    assert w.option("flip") is True  # boxes take their image's flip


def test_tfds_coco_features_are_a_source(tmp_path):
    """tfds coco's objects (bbox [ymin, xmin, ymax, xmax] normalized, label, is_crowd) reach the op."""
    tfds = pytest.importorskip("tensorflow_datasets")
    boxes = [np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]], np.float32), np.zeros([0, 4], np.float32)]

    class TinyCoco(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": tf.int64,
                "objects": tfds.features.Sequence({
                    "bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(num_classes=80),
                    "is_crowd": tf.bool, "area": tf.int64, "id": tf.int64})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, b in enumerate(boxes):
                yield i, {"image": np.zeros((20, 20, 3), np.uint8), "image/id": i, "objects": {
                    "bbox": b, "label": [7, 79][:len(b)], "is_crowd": [False, True][:len(b)], "area": [1, 1][:len(b)],
                    "id": [1, 2][:len(b)]}}

    TinyCoco(data_dir=str(tmp_path)).download_and_prepare()
    config = {"data_dir": str(tmp_path), "image_dtype": "uint8"}
    inputs = (BatchInput("image", "crop", ("image",)), boxes_key("record", RECORD_READS, num_classes=80, max_objects=2))
    pipe = InputPipeline("tfds:tiny_coco:train", config, global_batch_size=2, image_size=20, train=False, num_epochs=1,
                         inputs=inputs)
    (batch,) = list(pipe)
    got = sorted(zip(batch["boxes/valid"].sum(1), batch["boxes"].tolist(), batch["boxes/labels"].tolist()))
    assert got[0][0] == 0
    np.testing.assert_allclose(got[1][1], [[4.0, 2.0, 12.0, 10.0], [0, 0, 0, 0]], atol=1e-4)
    assert got[1][2] == [7, -1] and pipe.tallies()["boxes/crowd"] == 1
