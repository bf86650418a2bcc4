"""The detection evaluation: the task's AP against pycocotools run directly on the files it writes and a COCO
ground truth built here from the records, a detector that returns the truth (AP 1) or confuses classes, the
base/novel split against COCOeval restricted to those categories, boxes scaled to the records' own size, and
bad input named."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

import clip_jax  # noqa: E402
from clip_jax.evaluate import features  # noqa: E402
from clip_jax.evaluate.evaluator import Evaluator, parse_evals  # noqa: E402
from clip_jax.input import catalog, shapes, shapes_scenes  # noqa: E402
from clip_jax.methods.base import Prediction, two_tower_predictions  # noqa: E402
from clip_jax.parallel import sharding  # noqa: E402
from clip_jax.preprocessing import normalize_images  # noqa: E402

SIZES = {"train": 2, "validation": 2, "test": 12}
RECORD_SIZE = 48  # the records' pixels; the model reads 32: every box is scaled by 1.5 on its way out
STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def _encoder(model, variables, predictions=None):
    mesh = sharding.make_mesh({"data": -1})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return features.Encoder(model, jax.device_put(variables, replicated), mesh, predictions=predictions)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny CLIP, the scenes' test records as written, and the evaluator's features of them (one pass)."""
    root = tmp_path_factory.mktemp("scenes")
    config = {"cache_dir": str(root), "scenes_sizes": SIZES, "image_dtype": "uint8",
              "shapes_image_size": RECORD_SIZE}
    model = clip_jax.create_model("ViT-Tiny-test")
    variables = clip_jax.init_variables(model, jax.random.key(0))
    out = root / "pred"
    evaluator = Evaluator(f"detection=shapes_scenes:test|predictions={out}", config, image_size=32,
                          context_length=model.config.text.context_length, log=lambda *_: None)
    (group,) = evaluator.groups.values()
    feats = evaluator._extract(_encoder(model, variables), group, 8)
    records = shapes_scenes.read_split(shapes_scenes.scenes_files("test", config))
    return dict(model=model, variables=variables, evaluator=evaluator, task=evaluator.tasks[0], feats=feats,
                records=records, out=out / "detection" / "shapes_scenes.test", config=config)


def oracle(records, noise=0.0, extra=0, shuffle=0, seed=0, size=32):
    """A detector that knows the records: it finds each input among the records' images (the nearest one) and
    returns their true boxes in the model's input pixels, jittered by `noise` px, `extra` random boxes, random
    scores where noise > 0 (else 1), classes shifted by `shuffle`."""
    rng = np.random.default_rng(seed)
    stored = np.stack([np.asarray(Image.fromarray(r["image"]).resize((size, size), Image.BILINEAR)) for r in records])
    stored = np.asarray(normalize_images(jnp.asarray(stored)))
    k = shapes_scenes.MAX_OBJECTS + extra
    boxes = np.zeros((len(records), k, 4), np.float32)
    classes = np.zeros((len(records), k), np.int32)
    valid = np.zeros((len(records), k), bool)
    for i, r in enumerate(records):
        for j, o in enumerate(r["objects"]):
            boxes[i, j] = o["bbox"][[1, 0, 3, 2]] * size + rng.normal(0, noise, 4) * (noise > 0)
            classes[i, j], valid[i, j] = (o["shape"] + shuffle) % 6, True
        for j in range(extra):
            x, y = rng.uniform(0, size * 0.7, 2)
            boxes[i, -1 - j] = [x, y, x + rng.uniform(3, 10), y + rng.uniform(3, 10)]
            classes[i, -1 - j], valid[i, -1 - j] = rng.integers(0, 6), True
    scores = rng.uniform(0.05, 1.0, boxes.shape[:2]).astype(np.float32) if noise else np.ones(boxes.shape[:2],
                                                                                                np.float32)

    def detect(variables, images, class_embeds, novel):
        assert class_embeds.shape == (6, 32) and novel.shape == (6,)
        distance = ((images[:, None] - stored[None]) ** 2).sum((2, 3, 4))
        row = jnp.argmin(distance, axis=1)
        return {"boxes": jnp.asarray(boxes)[row], "scores": jnp.asarray(scores)[row],
                "classes": jnp.asarray(classes)[row], "valid": jnp.asarray(valid)[row]}

    return detect


def _run(setup, detect, task=None):
    predictions = {**two_tower_predictions(setup["model"]), "detect": Prediction(detect, "image", 3)}
    task = task or setup["task"]
    return task.evaluate({"data": setup["feats"]}, _encoder(setup["model"], setup["variables"], predictions))


def _reference(setup, out, cat_ids=None):
    """COCOeval's stats on the written detections.json and a ground truth built here from the records."""
    images = json.loads((out / "images.json").read_text())
    categories = json.loads((out / "categories.json").read_text())
    by_name = {c["name"]: c["id"] for c in categories}
    by_key = {r["key"]: r for r in setup["records"]}
    annotations = []
    for image in images:
        r = by_key[image["key"]]
        height, width = r["image"].shape[:2]
        assert (image["width"], image["height"]) == (width, height) == (RECORD_SIZE, RECORD_SIZE)
        for o in r["objects"]:
            ymin, xmin, ymax, xmax = (float(v) for v in o["bbox"])
            w, h = (xmax - xmin) * width, (ymax - ymin) * height
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "iscrowd": 0, "area": w * h,
                                "category_id": by_name[shapes.SHAPE_NAMES[o["shape"]]],
                                "bbox": [xmin * width, ymin * height, w, h]})
    truth = out / "truth.json"
    truth.write_text(json.dumps({"images": images, "annotations": annotations,
                                 "categories": [{"id": c["id"], "name": c["name"]} for c in categories]}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(truth))
        dt = gt.loadRes(str(out / "detections.json"))
        run = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            run.params.catIds = cat_ids
        run.evaluate()
        run.accumulate()
        run.summarize()
    return dict(zip(STATS, run.stats[:6])), categories


def test_ap_equals_cocoeval_on_the_written_files(setup):
    """A noisy detector with false positives: every figure equals pycocotools' on detections.json against a
    ground truth made from the records, the base/novel ones with COCOeval's catIds restricted."""
    metrics, details = _run(setup, oracle(setup["records"], noise=1.5, extra=3))
    out = setup["out"]
    want, categories = _reference(setup, out)
    assert [c["name"] for c in categories] == shapes.class_names("shape")
    assert [c["name"] for c in categories if c["novel"]] == list(shapes.NOVEL_SHAPES)
    assert 0.05 < metrics["detection/shapes_scenes.test/AP"] < 0.95
    for name, value in want.items():
        key = f"detection/shapes_scenes.test/{name}"
        if value < 0:  # no truth in that area range: no figure
            assert key not in metrics
        else:
            assert metrics[key] == pytest.approx(value, abs=1e-12), name
    for part, ids in (("novel", [c["id"] for c in categories if c["novel"]]),
                      ("base", [c["id"] for c in categories if not c["novel"]])):
        split, _ = _reference(setup, out, ids)
        assert metrics[f"detection/shapes_scenes.test/AP_{part}"] == pytest.approx(split["AP"], abs=1e-12)
        assert metrics[f"detection/shapes_scenes.test/AP50_{part}"] == pytest.approx(split["AP50"], abs=1e-12)
    detections = json.loads((out / "detections.json").read_text())
    assert set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    # every valid box is written, but those the noise made empty (inverted): dropped and counted
    assert len(detections) == details["detections"]
    assert len(detections) + details["dropped"] == sum(len(r["objects"]) + 3 for r in setup["records"])
    assert details["truth_boxes"] == {n: sum(o["shape"] == k for r in setup["records"] for o in r["objects"])
                                      for k, n in enumerate(shapes.class_names("shape"))}
    assert Image.open(out / "picture.png").size[1] > 8 * 160


def test_true_boxes_score_one_and_confused_classes_less(setup):
    """The truth as detections, through the evaluator: AP 1 over every class and on base and novel; boxes
    written in the records' 48 px equal their boxes (the detector answered in the model's 32 px)."""
    predictions = {**two_tower_predictions(setup["model"]), "detect": Prediction(oracle(setup["records"]), "image", 3)}
    metrics, _ = setup["evaluator"].run(_encoder(setup["model"], setup["variables"], predictions), batch_size=8)
    for key in ("AP", "AP50", "AP75", "AP_base", "AP_novel", "AP50_novel"):
        assert metrics[f"detection/shapes_scenes.test/{key}"] == pytest.approx(1.0, abs=1e-9), key
    detections = json.loads((setup["out"] / "detections.json").read_text())
    images = {i["id"]: i["key"] for i in json.loads((setup["out"] / "images.json").read_text())}
    by_key = {r["key"]: r for r in setup["records"]}
    for d in detections:
        want = [o["bbox"][[1, 0, 3, 2]] * RECORD_SIZE for o in by_key[images[d["image_id"]]]["objects"]]
        x, y, w, h = d["bbox"]
        assert min(np.abs(np.asarray(want) - [x, y, x + w, y + h]).max(-1)) < 1e-3
    confused, _ = _run(setup, oracle(setup["records"], shuffle=1))
    assert confused["detection/shapes_scenes.test/AP"] < 0.2


def test_a_detector_reading_its_classes_its_own_way_gets_its_class_inputs(setup, tmp_path):
    """Prediction.class_inputs (GLIP's prompt): called with the task's class names, its arrays reach 'detect' in
    place of the class embeddings; its prompt text goes to the details and above the picture's rows."""
    truth = oracle(setup["records"])
    seen = {}

    def class_inputs(names):
        seen["names"] = list(names)
        return {"tokens": np.arange(4, dtype=np.int32)[None], "weights": np.eye(6, dtype=np.float32),
                "prompt": ". ".join(names)}

    def detect(variables, images, classes, novel):
        assert set(classes) == {"tokens", "weights"}  # the text stays with the task
        assert classes["tokens"].shape == (1, 4) and classes["tokens"].dtype == jnp.int32
        assert classes["weights"].shape == (6, 6)
        return truth(variables, images, jnp.zeros((6, 32)), novel)

    predictions = {**two_tower_predictions(setup["model"]),
                   "detect": Prediction(detect, "image", 3, class_inputs=class_inputs)}
    (spec,) = parse_evals(f"detection=shapes_scenes:test|predictions={tmp_path}")
    task = type(setup["task"])(spec, setup["config"], log=lambda *_: None)
    task.prepare(setup["task"].infos)
    metrics, details = task.evaluate({"data": setup["feats"]}, _encoder(setup["model"], setup["variables"],
                                                                        predictions))
    assert seen["names"] == list(task.names)
    assert metrics["detection/shapes_scenes.test/AP"] == pytest.approx(1.0, abs=1e-9)
    assert details["prompt"] == ". ".join(task.names)
    from PIL import Image

    with_prompt = Image.open(tmp_path / "detection" / "shapes_scenes.test" / "picture.png")
    _run(setup, truth, task)  # the same boxes without a prompt: the picture is shorter by the prompt's lines
    assert with_prompt.height > Image.open(tmp_path / "detection" / "shapes_scenes.test" / "picture.png").height


def test_max_detections_and_min_score_and_record_classes(setup, tmp_path):
    """max_detections keeps each image's best; min_score drops the rest; a classes file in convert_detection's
    form (a list of {index, name}) with its own novel marks."""
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"index": k, "id": 10 + k, "name": n, "novel": n == "circle"}
                                   for k, n in enumerate(shapes.class_names("shape"))]))
    loaded = catalog.from_file(str(classes))
    assert loaded.names == shapes.class_names("shape") and loaded.novel == ("circle",)
    (spec,) = parse_evals(f"detection=shapes_scenes:test|max_detections=2|min_score=0.5|novel=circle,star|"
                          f"predictions={tmp_path}")
    task = type(setup["task"])(spec, setup["config"], log=lambda *_: None)
    task.prepare(setup["task"].infos)
    assert [n for n, v in zip(task.names, task.novel) if v] == ["circle", "star"]
    _, details = _run(setup, oracle(setup["records"], noise=1.0, extra=3), task)
    detections = json.loads((tmp_path / "detection" / "shapes_scenes.test" / "detections.json").read_text())
    per_image = np.bincount([d["image_id"] for d in detections])
    assert per_image.max() <= 2 and min(d["score"] for d in detections) >= 0.5
    assert details["novel"] == ["circle", "star"] and details["detections"] == len(detections)


def test_bad_input_is_named(setup):
    model, variables = setup["model"], setup["variables"]
    task = setup["task"]
    with pytest.raises(ValueError, match="offers no detector"):
        task.evaluate({"data": setup["feats"]}, _encoder(model, variables))
    with pytest.raises(ValueError, match=r"needs the predictions \['detect'\]"):  # before any image is read
        setup["evaluator"].run(_encoder(model, variables), batch_size=8)

    def wrong(variables, images, class_embeds, novel):
        n = images.shape[0]
        return {"boxes": jnp.zeros((n, 4, 3)), "scores": jnp.zeros((n, 4)), "classes": jnp.zeros((n, 4), jnp.int32),
                "valid": jnp.ones((n, 4), bool)}

    with pytest.raises(ValueError, match=r"'boxes' float32 \[\d+, 4, 3\].*fix the method's detector"):
        _run(setup, wrong)
    with pytest.raises(ValueError, match="returned tuple"):
        _run(setup, lambda v, x, c, n: (x, c))
    with pytest.raises(ValueError, match="class 6, outside the 6 classes"):
        _run(setup, _shifted(setup["records"]))
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    bad = dict(setup["feats"])
    rows = np.asarray([[1, 2, 5, 6, 9, 0]], np.float32)  # class 9 of 6
    bad["boxes/shape"] = np.asarray([tf.io.serialize_tensor(rows).numpy()] * len(bad["boxes/shape"]), object)
    with pytest.raises(ValueError, match="class index 9, outside the 6 classes"):
        task.evaluate({"data": bad}, _encoder(model, variables, {"detect": Prediction(wrong, "image", 3)}))
    for spec, message in (("labels=record", "classes=FILE.json"), ("labels=mask", "labels='mask'"),
                          ("max_detections=0", "must be >= 1"), ("min_score=high", "is not a number")):
        with pytest.raises(ValueError, match=message):
            Evaluator(f"detection=shapes_scenes:test|{spec}", setup["config"], image_size=32, context_length=77)
    with pytest.raises(ValueError, match=r"novel= names \['hexagon'\]"):
        Evaluator("detection=shapes_scenes:test|novel=star,hexagon", setup["config"], image_size=32,
                  context_length=77)


def _shifted(records):
    """The truth with one class past the list."""
    detect = oracle(records)

    def fn(variables, images, class_embeds, novel):
        out = detect(variables, images, class_embeds, novel)
        return dict(out, classes=out["classes"] + 6)

    return fn


def test_the_predictions_flag_goes_to_the_detection_specs():
    from clip_jax.evaluate.__main__ import with_predictions

    got = with_predictions(["--eval=detection=shapes_scenes:test|novel=star,cross", "--predictions=/out"])
    (spec,) = parse_evals(got[0].partition("=")[2])
    assert (spec.task, spec.get("predictions"), spec.get("novel")) == ("detection", "/out", "star,cross")


def test_record_labels_at_other_aspects_with_crowd_boxes(setup, tmp_path):
    """labels=record on TFRecords of three sizes and aspects, one crowd box: a detector's box in the model's
    32 px comes back as (x W/32, y H/32) of each record, and AP equals COCOeval on the written files against a
    ground truth built here (the crowd box iscrowd=1)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()

    def record(key, h, w, boxes, labels, crowd):
        png = io.BytesIO()
        Image.fromarray(np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(png, "PNG")
        feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png.getvalue()])),
                   "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
                   "objects/bbox": tf.train.Feature(float_list=tf.train.FloatList(
                       value=np.asarray(boxes, np.float32).reshape(-1))),
                   "objects/label": tf.train.Feature(int64_list=tf.train.Int64List(value=labels)),
                   "objects/is_crowd": tf.train.Feature(int64_list=tf.train.Int64List(value=crowd))}
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    # [ymin, xmin, ymax, xmax] in [0, 1]; the detector's box (8, 8, 24, 24) of 32 px is [0.25, 0.25, 0.75, 0.75]
    rows = [("a", 40, 80, [[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.2, 0.2]], [0, 1], [0, 0]),
            ("b", 60, 30, [[0.2, 0.25, 0.8, 0.75]], [0], [0]),
            ("c", 50, 50, [[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 1.0, 1.0]], [0, 1], [0, 1])]
    with tf.io.TFRecordWriter(str(tmp_path / "boxes-00000-of-00001.tfrecord")) as writer:
        for row in rows:
            writer.write(record(*row))
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"index": 0, "id": 1, "name": "dog"}, {"index": 1, "id": 3, "name": "cat"}]))

    def fixed(variables, images, class_embeds, novel):
        n = images.shape[0]
        box = jnp.asarray([[8.0, 8.0, 24.0, 24.0], [20.0, 20.0, 40.0, 40.0]])  # the second clipped to 32
        return {"boxes": jnp.broadcast_to(box, (n, 2, 4)), "scores": jnp.broadcast_to(jnp.asarray([0.9, 0.6]), (n, 2)),
                "classes": jnp.broadcast_to(jnp.asarray([0, 1], jnp.int32), (n, 2)), "valid": jnp.ones((n, 2), bool)}

    model, variables = setup["model"], setup["variables"]
    out = tmp_path / "pred"
    evaluator = Evaluator(f"detection=tfrecord:{tmp_path}/boxes-*|labels=record|classes={classes}|novel=cat|"
                          f"predictions={out}", setup["config"], image_size=32, context_length=77, log=lambda *_: None)
    predictions = {**two_tower_predictions(model), "detect": Prediction(fixed, "image", 3)}
    metrics, details = evaluator.run(_encoder(model, variables, predictions), batch_size=8)
    where = out / "detection" / "boxes"
    images = json.loads((where / "images.json").read_text())
    assert [(i["key"], i["height"], i["width"]) for i in images] == [(r[0], r[1], r[2]) for r in rows]
    detections = json.loads((where / "detections.json").read_text())
    for image in images:
        w, h = image["width"], image["height"]
        got = [d["bbox"] for d in detections if d["image_id"] == image["id"]]
        np.testing.assert_allclose(got, [[w / 4, h / 4, w / 2, h / 2], [w * 20 / 32, h * 20 / 32, w * 12 / 32,
                                                                         h * 12 / 32]], atol=1e-9)
    annotations = []
    for image, (_, h, w, boxes, labels, crowd) in zip(images, rows):
        for (ymin, xmin, ymax, xmax), label, c in zip(boxes, labels, crowd):
            bw, bh = (xmax - xmin) * w, (ymax - ymin) * h
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": label + 1,
                                "bbox": [xmin * w, ymin * h, bw, bh], "area": bw * bh, "iscrowd": c})
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"images": images, "annotations": annotations,
                                 "categories": json.loads((where / "categories.json").read_text())}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(truth))
        run = COCOeval(gt, gt.loadRes(str(where / "detections.json")), "bbox")
        run.evaluate()
        run.accumulate()
        run.summarize()
    for name, value in zip(STATS, run.stats):
        assert metrics.get(f"detection/boxes/{name}", -1.0) == pytest.approx(value, abs=1e-12), name
    (details,) = details.values()  # by spec
    assert details["crowd_boxes"] == 1 and details["novel"] == ["cat"]
    assert "detection/boxes/AP_novel" in metrics
