"""ViLD-image's region embeddings (clip_jax.input.region_embeds, .regions, .crop_resize; python -m clip_jax.embed
regions): crops against PIL's resize, embeddings against crop -> resize -> teacher -> sum -> normalize done plainly,
the written records against their inputs, the 'regions' op against the 'boxes' op, and bad input."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import jax  # noqa: E402
from PIL import Image  # noqa: E402

from clip_jax.input import crop_resize, detection, eval_data, region_embeds, regions, shapes_scenes  # noqa: E402
from clip_jax.input.pipeline import InputPipeline  # noqa: E402
from clip_jax.methods.base import BatchInput  # noqa: E402
from clip_jax.models import create_model, init_variables  # noqa: E402
from clip_jax.preprocessing import MEAN, STD  # noqa: E402

SIZES = {"train": 12, "validation": 2, "test": 2}
PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    paths = shapes_scenes.ensure_scenes_dataset(root, sizes=SIZES)
    config = {"cache_dir": root, "scenes_sizes": SIZES, "shuffle_buffer": 8, "image_dtype": "uint8",
              "resize_method": "nearest"}
    return config, paths


@pytest.fixture(scope="module")
def teacher():
    """A tiny random CLIP (32 px input, 32-d embeddings) and its image embeddings, jitted."""
    model = create_model("ViT-Tiny-test")
    variables = init_variables(model, jax.random.key(0))
    embed = jax.jit(lambda x: model.apply(variables, x, method="encode_image"))
    return model, variables, lambda crops: np.asarray(embed(np.asarray(crops)))


def _pil_crop(image, box, size, resample="bicubic"):
    """PIL's resize of the box, per channel in its float mode, clipped as the pipeline clips pixels."""
    channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize(
        (size, size), PIL_RESAMPLE[resample], box=tuple(float(v) for v in box))) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255)


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
def test_crops_equal_pils_resize_of_the_box(resample):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 58, 3)).astype(np.uint8)
    boxes = [(0, 0, 58, 37), (3.3, 4.1, 9.7, 30.2), (50.5, 0.0, 58.0, 2.5), (10.2, 11.7, 10.9, 12.0),
             (0.0, 20.0, 57.9, 37.0)]
    got = crop_resize.crop_resize(image, boxes, 24, resample)
    for box, crop in zip(boxes, got):
        np.testing.assert_allclose(crop, _pil_crop(image, box, 24, resample), atol=2e-3)


def _square_and_wide_records(tmp_path):
    """Two records: a 64 px square and an 80 x 48 image (its evaluation crop at 32 px: resized to 53 x 32, columns
    11..43 kept)."""
    rng = np.random.default_rng(1)
    out = []
    for i, (h, w) in enumerate([(64, 64), (48, 80)]):
        out.append({"image": _png(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)), "number": i, "key": f"r{i}"})
    return out


def test_embeddings_equal_crop_resize_embed_sum_normalize(teacher, tmp_path):
    """The proposal stage's boxes (at its 32 px input) mapped to each record's pixels, the best by score, valid
    only; each cropped at 1x and 1.5x around its centre (clipped), resized by PIL, embedded by the model applied
    plainly one crop at a time, summed and normalized."""
    model, variables, embed = teacher
    one = jax.jit(lambda x: model.apply(variables, x, method="encode_image"))  # a crop at a time
    records = _square_and_wide_records(tmp_path)
    proposals = np.array([[4, 5, 20, 30], [0, 0, 32, 32], [10, 10, 12, 31], [1, 1, 3, 3], [20, 2, 31, 9]], np.float32)
    scores = np.array([0.2, 0.9, 0.5, 0.99, 0.4], np.float32)
    valid = np.array([True, True, True, False, True])

    def proposal_fn(images):
        assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
        n = len(images)
        return {"boxes": np.tile(proposals, (n, 1, 1)), "valid": np.tile(valid, (n, 1)),
                "scores": np.tile(scores, (n, 1))}

    got = list(region_embeds.embed_regions(records, proposal_fn, embed, 32, (1.0, 1.5), 3, proposal_size=32,
                                           batch_size=4, crop_batch=8, embed_dim=32))
    assert [g["key"] for g in got] == ["r0", "r1"]
    best = proposals[[1, 2, 4]]  # valid ones by score, the first 3
    frames = {0: (0.5, 0.5, 0.0), 1: (53 / 80, 32 / 48, 11.0)}  # (x scale, y scale, left) of the evaluation crop
    for rec, g in zip(records, got):
        image = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))
        h, w = image.shape[:2]
        sx, sy, left = frames[rec["number"]]
        boxes = np.stack([(best[:, 0] + left) / sx, best[:, 1] / sy, (best[:, 2] + left) / sx, best[:, 3] / sy], -1)
        boxes = np.clip(boxes, 0, [w, h, w, h])
        np.testing.assert_allclose(g["regions/bbox"], boxes[:, [1, 0, 3, 2]] / [h, w, h, w], atol=1e-6)
        want = []
        for x1, y1, x2, y2 in boxes.astype(np.float64):
            total = 0
            for s in (1.0, 1.5):
                cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * s, (y2 - y1) / 2 * s
                box = (max(cx - hw, 0), max(cy - hh, 0), min(cx + hw, w), min(cy + hh, h))
                x = (_pil_crop(image, box, 32) / 255.0 - np.array(MEAN)) / np.array(STD)
                total = total + np.asarray(one(x[None].astype(np.float32)))[0]
            want.append(total / np.linalg.norm(total))
        np.testing.assert_allclose(g["regions/embeds"], np.array(want), atol=2e-5)
        np.testing.assert_allclose(np.linalg.norm(g["regions/embeds"], axis=-1), 1.0, atol=1e-6)
    valid[:] = False  # no proposal left: no region, embeddings of the teacher's width all the same
    for g in region_embeds.embed_regions(records, proposal_fn, embed, 32, max_regions=3, proposal_size=32,
                                         batch_size=4, crop_batch=8):
        assert g["regions/bbox"].shape == (0, 4) and g["regions/embeds"].shape == (0, 32)


def _by_key(paths):
    return {tf.train.Example.FromString(r.numpy()).features.feature["key"].bytes_list.value[0]: r.numpy()
            for p in paths for r in tf.data.TFRecordDataset(p)}


def test_written_records_keep_their_features_and_read_as_tfrecords(scenes, teacher, tmp_path):
    config, paths = scenes
    _, _, embed = teacher
    out = str(tmp_path / "regions")
    proposals = region_embeds.BoxProposals(copies=1, jitter=0.2, seed=3)
    manifest = region_embeds.write_regions("shapes_scenes:train", out, proposals, embed, 32, config=config,
                                           max_regions=8, batch_size=5, crop_batch=16)
    assert manifest["records"] == SIZES["train"] and manifest["embed_dim"] == 32
    assert manifest["proposals"] == {"source": "boxes", "copies": 1, "jitter": 0.2, "seed": 3}
    assert manifest["scales"] == [1.0, 1.5] and manifest["max_regions"] == 8
    assert manifest["data"] == "shapes_scenes:train"
    assert json.load(open(os.path.join(out, regions.MANIFEST))) == manifest
    assert len(manifest["shards"]) == len(paths["train"]) and sorted(os.listdir(out)) == sorted(
        manifest["shards"] + [regions.MANIFEST])
    before, after = _by_key(paths["train"]), _by_key([os.path.join(out, s) for s in manifest["shards"]])
    assert sorted(before) == sorted(after)
    objects = {}
    for key, raw in before.items():
        old = tf.train.Example.FromString(raw).features.feature
        new = tf.train.Example.FromString(after[key]).features.feature
        assert set(new) == set(old) | {"regions/bbox", "regions/embeds", "regions/embed_dim"}
        for name in old:  # each original feature byte for byte
            assert new[name].SerializeToString(deterministic=True) == old[name].SerializeToString(deterministic=True)
        bbox = np.array(new["regions/bbox"].float_list.value).reshape(-1, 4)
        gt = np.array(old["objects/bbox"].float_list.value).reshape(-1, 4)
        assert len(bbox) == min(2 * len(gt), 8)
        np.testing.assert_allclose(bbox[: len(gt)], gt, atol=1e-6)  # the boxes first, then their copies
        e = np.array(new["regions/embeds"].float_list.value).reshape(len(bbox), 32)
        np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
        objects[key] = old
    # other batchings give the same embeddings; the same settings, the same bytes
    again = region_embeds.write_regions("shapes_scenes:train", str(tmp_path / "again"), proposals, embed, 32,
                                        config=config, max_regions=8, batch_size=3, crop_batch=7)
    twice = _by_key([os.path.join(tmp_path / "again", s) for s in again["shards"]])
    for key in after:
        a, b = (np.array(tf.train.Example.FromString(x[key]).features.feature["regions/embeds"].float_list.value)
                for x in (after, twice))
        np.testing.assert_allclose(a, b, atol=1e-6)
    region_embeds.write_regions("shapes_scenes:train", str(tmp_path / "same"), proposals, embed, 32, config=config,
                                max_regions=8, batch_size=5, crop_batch=16)
    assert _by_key([os.path.join(tmp_path / "same", s) for s in manifest["shards"]]) == after
    # data.train='tfrecord:DIR/*' reads the scenes' features (the manifest matched by the glob is no shard)
    info = eval_data.describe(f"tfrecord:{out}/*", config)
    names = ("image", "key", "objects/bbox", "objects/shape", "objects/color", "regions/bbox")
    seen = 0
    for ex in eval_data.read_examples(info, config, names).as_numpy_iterator():
        old = objects[ex["key"]]
        assert ex["image"] == old["image"].bytes_list.value[0]
        np.testing.assert_array_equal(ex["objects/bbox"].reshape(-1), old["objects/bbox"].float_list.value)
        np.testing.assert_array_equal(ex["objects/shape"], old["objects/shape"].int64_list.value)
        np.testing.assert_array_equal(ex["objects/color"], old["objects/color"].int64_list.value)
        seen += 1
    assert seen == SIZES["train"]
    pipe = InputPipeline(f"tfrecord:{out}/*", config, global_batch_size=4, image_size=32, train=True, num_epochs=1,
                         inputs=(BatchInput("regions", "regions", regions.READS,
                                            (("max_regions", 8), ("embed_dim", 32))),))
    batch = next(pipe)
    assert batch["regions"].shape == (4, 8, 4) and batch["regions/embeds"].shape == (4, 8, 32)
    assert batch["regions/valid"].any(1).all()
    pipe.close()


def _with_regions_equal_to_objects(paths, out):
    """The scenes' records with regions = their objects' boxes, region i's embedding = one-hot i + 1."""
    with tf.io.TFRecordWriter(out) as w:
        for raw in _by_key(paths).values():
            bbox = np.array(tf.train.Example.FromString(raw).features.feature["objects/bbox"].float_list.value)
            n = len(bbox) // 4
            w.write(regions.serialize(raw, bbox, np.eye(n, 8, 1, np.float32)))


def test_the_regions_op_moves_regions_as_the_boxes_op_moves_boxes(scenes, tmp_path):
    config, paths = scenes
    path = str(tmp_path / "same-00000-of-00001.tfrecord")
    _with_regions_equal_to_objects(paths["train"], path)
    flip = (("flip", True),)
    for train, crop_config in ((True, dict(config, crop_scale=(0.3, 0.6))), (True, dict(config, crop="random")),
                               (False, config)):
        inputs = (BatchInput("image", "crop", ("image",), flip),
                  BatchInput("boxes", "boxes", ("objects/bbox", "objects/shape", "objects/color"),
                             (("max_objects", 4),)),
                  BatchInput("regions", "regions", regions.READS, (("max_regions", 4), ("embed_dim", 8))))
        pipe = InputPipeline(f"tfrecord:{path}", crop_config, global_batch_size=4, image_size=40, train=train,
                             num_epochs=1, inputs=inputs)
        cut = 0
        for batch in pipe:
            np.testing.assert_array_equal(batch["regions"], batch["boxes"])
            np.testing.assert_array_equal(batch["regions/valid"], batch["boxes/valid"])
            index = batch["boxes/index"]
            want = np.where(batch["boxes/valid"][..., None], np.eye(8)[np.maximum(index, 0) + 1], 0)
            np.testing.assert_array_equal(batch["regions/embeds"], want)  # each embedding with its box
            by_rule = [detection.COUNTS.index(c) for c in regions.COUNTS]  # the boxes' counts of the same rules
            np.testing.assert_array_equal(batch["regions/counts"], batch["boxes/counts"][:, by_rule])
            cut += int(batch["boxes/counts"][:, detection.COUNTS.index("cropped")].sum())
        assert pipe.tallies()["regions/overflow"] == pipe.tallies()["boxes/overflow"] > 0
        assert cut > 0 or crop_config.get("crop_scale") is None  # the small crops cut regions away


def test_bad_input_is_named(scenes, teacher, tmp_path):
    config, paths = scenes
    _, _, embed = teacher

    def regions_key(**options):
        return BatchInput("regions", "regions", regions.READS, tuple({"embed_dim": 8, **options}.items()))

    def pipeline(spec, key):
        return InputPipeline(spec, config, global_batch_size=2, image_size=32, train=True, inputs=(key,))

    with pytest.raises(ValueError, match="hold no regions/bbox.*python -m clip_jax.embed regions"):
        pipeline("shapes_scenes:train", regions_key())
    path = str(tmp_path / "r-00000-of-00001.tfrecord")
    _with_regions_equal_to_objects(paths["train"], path)
    with pytest.raises(ValueError, match="width embed_dim=32, but .* holds width 8"):
        pipeline(f"tfrecord:{path}", regions_key(embed_dim=32))
    with pytest.raises(ValueError, match="TFRecord features: write them with python -m clip_jax.embed regions"):
        regions.probe(None, regions_key())
    for options, match in (({"max_regions": 0}, "max_regions an int >= 1"), ({"embed_dim": None}, "embed_dim an int"),
                           ({"min_visible": 2.0}, "min_visible")):
        with pytest.raises(ValueError, match=match):
            pipeline(f"tfrecord:{path}", regions_key(**options))
    with pytest.raises(ValueError, match="op 'regions' reads"):
        pipeline(f"tfrecord:{path}", BatchInput("regions", "regions", ("regions/bbox",), (("embed_dim", 8),)))
    # a record whose embeddings do not line up with its boxes: skipped, counted
    odd = str(tmp_path / "odd-00000-of-00001.tfrecord")
    raw = next(iter(_by_key(paths["train"]).values()))
    with tf.io.TFRecordWriter(odd) as w:
        w.write(regions.serialize(raw, np.zeros([2, 4]) + [0.1, 0.1, 0.5, 0.5], np.ones([2, 8])))
        ex = tf.train.Example.FromString(regions.serialize(raw, np.zeros([2, 4]) + [0.1, 0.1, 0.5, 0.5],
                                                           np.ones([2, 8])))
        ex.features.feature["regions/embeds"].float_list.value.pop()
        w.write(ex.SerializeToString())
    pipe = InputPipeline(f"tfrecord:{odd}", config, global_batch_size=1, image_size=32, train=False, num_epochs=1,
                         inputs=(regions_key(),))
    assert len(list(pipe)) == 1 and pipe.bad_records()["bad_regions"] == 1

    records = _square_and_wide_records(tmp_path)
    boxes = region_embeds.BoxProposals(copies=0)

    def proposals(images):
        n = len(images)
        return {"boxes": np.tile([[0.0, 0.0, 8.0, 8.0]], (n, 2, 1)), "valid": np.ones((n, 2), bool),
                "scores": np.ones((n, 2))}

    run = lambda fn, **kw: list(region_embeds.embed_regions(records, fn, embed, 32, **{"proposal_size": 32, **kw}))  # noqa: E731
    with pytest.raises(ValueError, match="max_regions=0"):
        run(proposals, max_regions=0)
    with pytest.raises(ValueError, match="max_regions=3 but the proposal stage gives 2 proposals"):
        run(proposals, max_regions=3)
    with pytest.raises(ValueError, match="the teacher's image embeddings have width 32, but .* width 64"):
        run(proposals, max_regions=2, embed_dim=64)
    with pytest.raises(ValueError, match="must return"):
        run(lambda images: images, max_regions=2)
    with pytest.raises(ValueError, match="reads each record's objects/bbox"):
        run(boxes)
    with pytest.raises(ValueError, match="scales"):
        run(proposals, scales=(1.0, -1.5))
    with pytest.raises(ValueError, match="must be TFRecords"):
        region_embeds.write_regions("tfds:coco/2017:train", str(tmp_path / "x"), boxes, embed, 32)


def test_the_command_line(scenes, teacher, tmp_path):
    import clip_jax
    from clip_jax.embed import regions_main

    config, _ = scenes
    model, variables, _ = teacher
    weights = str(tmp_path / "teacher.safetensors")
    clip_jax.save_open_clip("ViT-Tiny-test", variables, weights)
    out = str(tmp_path / "cli")
    settings = [f"--data_setting=cache_dir={config['cache_dir']}", f"--data_setting=scenes_sizes={json.dumps(SIZES)}"]
    manifest = regions_main(["--data=shapes_scenes:train", f"--teacher={weights}", "--proposals=boxes",
                             f"--out={out}", "--max_regions=4", "--limit=5", "--crop_batch=8", *settings])
    assert manifest["records"] == 5 and manifest["max_regions"] == 4 and manifest["teacher"] == weights
    with pytest.raises(SystemExit):
        regions_main(["--data=shapes_scenes:train", f"--teacher={weights}", f"--out={out}"])  # no proposals
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    old = subprocess.run([sys.executable, "-m", "clip_jax.embed"], capture_output=True, text=True, env=env)
    assert old.returncode != 0 and "--config" in old.stderr  # the LiT cache's command, as before
    with pytest.raises(SystemExit):
        regions_main([])  # --data, --out and --teacher are required


def test_the_command_line_runs_a_runs_proposals_prediction(scenes, teacher, tmp_path, monkeypatch):
    """--workdir: the run's method's Prediction 'proposals' (here a stand-in method's, on the tiny model) proposes
    the regions, at the run's input size, with the run's data settings."""
    import ml_collections

    import clip_jax
    from clip_jax.embed import regions_main
    from clip_jax.evaluate import evaluator
    from clip_jax.methods.base import Prediction

    config, _ = scenes
    model, variables, _ = teacher
    weights = str(tmp_path / "teacher.safetensors")
    clip_jax.save_open_clip("ViT-Tiny-test", variables, weights)
    run_config = ml_collections.ConfigDict({"method": "vild", "data": {
        "train": "", "eval": "", "cache_dir": config["cache_dir"], "scenes_sizes": SIZES}})
    load = evaluator.load_model
    monkeypatch.setattr(evaluator, "load_model", lambda workdir, weights, name, step: (
        (model, variables, f"{workdir} step 7", run_config, 7) if workdir else load(workdir, weights, name, step)))

    def proposals(variables, images):  # the whole input, and its left half
        n = images.shape[0]
        boxes = np.array([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 16.0, 32.0]], np.float32)
        return {"boxes": jax.numpy.tile(boxes, (n, 1, 1)), "valid": jax.numpy.ones((n, 2), bool),
                "scores": jax.numpy.tile(jax.numpy.array([0.5, 0.9]), (n, 1))}

    offered = {"proposals": Prediction(proposals, "image", 3)}
    monkeypatch.setattr(evaluator, "method_predictions", lambda run_config, model, mesh: offered)
    out = str(tmp_path / "vild")
    manifest = regions_main(["--data=shapes_scenes:train", f"--teacher={weights}", "--workdir=RUN", f"--out={out}",
                             "--max_regions=2", "--limit=3", "--batch_size=2"])
    assert manifest["proposals"] == {"source": "model", "image_size": 32, "workdir": "RUN", "step": 7,
                                     "run": "RUN step 7"}
    for raw in _by_key([os.path.join(out, s) for s in manifest["shards"]]).values():
        bbox = np.array(tf.train.Example.FromString(raw).features.feature["regions/bbox"].float_list.value)
        np.testing.assert_allclose(bbox, [0, 0, 1, 0.5, 0, 0, 1, 1])  # best first, in the record's [0, 1]
    offered = {"image_embeds": offered["proposals"]}
    with pytest.raises(ValueError, match="offers no 'proposals' prediction .* pass a ViLD run, or --proposals=boxes"):
        regions_main(["--data=shapes_scenes:train", f"--teacher={weights}", "--workdir=RUN", f"--out={out}"])
