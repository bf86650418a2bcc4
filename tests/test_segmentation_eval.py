"""The segmentation evaluation: mIoU by mmseg's convention against a plain numpy count, the background rule,
sliding-window inference, and the task end to end on a tiny CLIP (MaskCLIP) and a method's own segmenter."""

import io
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax import evaluate
from clip_jax.evaluate import features, zero_shot
from clip_jax.evaluate.segmentation_metrics import ConfusionMatrix
from clip_jax.evaluate.tasks import TASKS
from clip_jax.evaluate.tasks import segmentation as seg
from clip_jax.input import shapes
from clip_jax.methods.base import Prediction, two_tower_predictions
from clip_jax.parallel import sharding


def numpy_scores(pred, true, num_classes, ignore=255):
    """mIoU, pixel accuracy and per-class IoU, one class at a time over the valid pixels."""
    valid = true != ignore
    ious = []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (true == c) & valid)
        union = np.sum(((pred == c) | (true == c)) & valid)
        ious.append(inter / union if union else np.nan)
    return np.nanmean(ious), np.sum((pred == true) & valid) / np.sum(valid), np.array(ious)


def random_maps(seed, n=6, size=16, num_classes=7):
    """Random class maps with ignore pixels, where classes 3 and 5 never occur in either map."""
    rng = np.random.default_rng(seed)
    present = np.array([0, 1, 2, 4, 6])
    true = present[rng.integers(0, 5, (n, size, size))].astype(np.uint8)
    pred = np.where(rng.random((n, size, size)) < 0.6, true, present[rng.integers(0, 5, (n, size, size))])
    pred = pred.astype(np.uint8)
    true[rng.random((n, size, size)) < 0.15] = 255
    pred[0, 0, 0], true[0, 0, 0] = 4, 255  # a prediction on an ignore pixel counts nowhere
    return pred, true


def test_miou_equals_a_numpy_count_with_ignore_pixels_and_absent_classes():
    pred, true = random_maps(0)
    miou, acc, ious = numpy_scores(pred, true, 7)
    assert np.isnan(ious[3]) and np.isnan(ious[5])
    matrix = ConfusionMatrix(7).update(pred, true)
    whole = matrix.scores([f"c{i}" for i in range(7)])
    batched = ConfusionMatrix(7)
    for i in range(len(pred)):  # accumulated image by image: the same sums over the split
        batched.update(pred[i], true[i])
    for got in (whole, batched.allreduce().scores()):
        assert got["miou"] == pytest.approx(miou, abs=1e-12) and got["pixel_acc"] == pytest.approx(acc, abs=1e-12)
        np.testing.assert_allclose(got["iou"], ious, atol=1e-12)
    assert np.isnan(whole["iou_by_name"]["c3"])


def test_bad_maps_are_errors_naming_the_fix():
    with pytest.raises(ValueError, match="outside the 3 classes"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.array([[0, 1], [7, 255]]))
    with pytest.raises(ValueError, match="differ in shape"):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.zeros((4, 4)))


def test_background_rules():
    logits = np.random.default_rng(1).normal(size=(3, 5, 5, 4)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = np.where(probs.max(-1) >= 0.6, logits.argmax(-1) + 1, 0)
    np.testing.assert_array_equal(np.asarray(seg.class_ids(jnp.asarray(logits), "threshold", 0.6)), want)
    assert 0 < (want == 0).mean() < 1  # both outcomes occur
    np.testing.assert_array_equal(np.asarray(seg.class_ids(jnp.asarray(logits), "prompt", 0.6)), logits.argmax(-1))


def _encoder(model, variables, predictions=None):
    mesh = sharding.make_mesh({"data": -1})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return features.Encoder(model, jax.device_put(variables, replicated), mesh, predictions=predictions)


@pytest.fixture(scope="module")
def tiny():
    model = clip_jax.create_model("ViT-Tiny-test")
    variables = clip_jax.init_variables(model, jax.random.key(0))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    masks = rng.integers(0, 7, (10, 32, 32)).astype(np.uint8)
    masks[:, :3] = 255
    return model, variables, images, masks


def _task(spec):
    (parsed,) = evaluate.parse_evals(spec)
    task = TASKS.get("segmentation")(parsed, {}, log=lambda *_: None)
    task.prepare({"data": types.SimpleNamespace(name="scenes.test")})
    return task


def test_the_task_scores_maskclip_as_computed_by_hand(tiny, tmp_path):
    model, variables, images, masks = tiny
    task = _task(f"segmentation=shapes:test|bg_thresh=0.3|predictions={tmp_path}")
    assert task.names == ["background"] + shapes.class_names("shape") and len(task.names) == 7
    assert task.reads()["data"].features[:2] == ("image/whole", "mask_png/shape")
    encoder = _encoder(model, variables)
    metrics, details = task.evaluate({"data": {"image/whole": images, "mask_png/shape": masks, "image_embeds": None}},
                                     encoder)

    # by hand: MaskCLIP features, prompt-ensembled shape embeddings, cosine at the logit scale, bilinear to 32 px
    normalized = np.asarray(jax.jit(lambda x: clip_jax.preprocessing.normalize_images(x))(images))
    dense = clip_jax.encode_image_dense(model, variables, normalized, form="maskclip")
    classes = zero_shot.classifier_weights(model, variables, shapes.prompts("shape"))
    scale = float(np.exp(np.asarray(variables["params"]["logit_scale"])))
    logits = scale * (dense / np.linalg.norm(dense, axis=-1, keepdims=True)) @ classes.T
    logits = np.asarray(jax.image.resize(logits, (10, 32, 32, 6), "bilinear"))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    pred = np.where(probs.max(-1) >= 0.3, logits.argmax(-1) + 1, 0)
    miou, acc, ious = numpy_scores(pred, masks, 7)
    assert metrics["segmentation/scenes.test/miou"] == pytest.approx(miou, abs=1e-6)
    assert metrics["segmentation/scenes.test/pixel_acc"] == pytest.approx(acc, abs=1e-6)
    for name, iou in zip(task.names, ious):
        assert metrics.get(f"segmentation/scenes.test/iou/{name}", np.nan) == pytest.approx(iou, abs=1e-6,
                                                                                           nan_ok=True)
    assert details["examples"] == 10

    # the predictions contract: one 8-bit PNG of class indices per example, classes.json background first
    out = tmp_path / "segmentation" / "scenes.test"
    assert json.loads((out / "classes.json").read_text()) == task.names
    written = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(10)])
    assert written.dtype == np.uint8 and written.shape == masks.shape
    agree = (written == pred).mean()
    assert agree > 0.999, agree  # float rounding at a threshold may flip a pixel
    assert Image.open(out / "picture.png").size[1] > 8 * 64


def test_a_methods_own_segmenter_replaces_maskclip(tiny):
    """The hook: a method's 'segment_logits' (here the image's red channel decides, per pixel)."""
    model, variables, images, masks = tiny

    def by_red(variables, images, class_embeds):  # class k+1 where red falls in the k-th of C bins
        red = (images[..., 0] + 2.0) / 4.0  # normalized pixels to about [0, 1]
        bins = jnp.clip((red * class_embeds.shape[0]).astype(jnp.int32), 0, class_embeds.shape[0] - 1)
        return 50.0 * jax.nn.one_hot(bins, class_embeds.shape[0])

    predictions = {**two_tower_predictions(model), "segment_logits": Prediction(by_red, "image", 3)}
    task = _task("segmentation=shapes:test|bg_thresh=0.5")
    metrics, _ = task.evaluate({"data": {"image/whole": images, "mask_png/shape": masks}},
                               _encoder(model, variables, predictions))
    normalized = np.asarray(clip_jax.preprocessing.normalize_images(jnp.asarray(images)))
    pred = np.clip(((normalized[..., 0] + 2.0) / 4.0 * 6).astype(np.int32), 0, 5) + 1
    assert metrics["segmentation/scenes.test/miou"] == pytest.approx(numpy_scores(pred, masks, 7)[0], abs=1e-6)


def test_a_method_names_the_templates_its_class_embeddings_were_trained_with(tiny):
    """LSeg's classes are the bare names (background one of them): the task embeds them so, not with
    the dataset's prompts."""
    model, variables, _, _ = tiny
    encoder = _encoder(model, variables, {**two_tower_predictions(model), "segment_logits": Prediction(
        lambda v, x, c: x, "image", 3, templates=("{}",))})
    task = _task("segmentation=shapes:test|background=prompt")
    names = ["background"] + list(shapes.class_names("shape"))
    want = np.asarray(clip_jax.encode_text(model, variables, clip_jax.tokenize(names, model=model.config)))
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(task.class_embeds(encoder), want, atol=1e-5)
    dataset = _task("segmentation=shapes:test").class_embeds(_encoder(model, variables))  # the prompts, no background
    assert dataset.shape == (6, want.shape[1]) and not np.allclose(dataset, want[1:], atol=1e-3)


def test_a_segmenter_that_scores_background_itself_gets_the_foreground_classes(tiny):
    """background=model: the task passes the foreground classes' embeddings and takes the segmenter's
    first logit as background's (argmax); a segmenter that does not score background is refused."""
    model, variables, images, masks = tiny

    def own(variables, images, class_embeds):  # background where red is low, else class 1 + (green bin)
        red, green = images[..., 0], images[..., 1]
        k = class_embeds.shape[0]
        fg = jax.nn.one_hot(jnp.clip(((green + 2.0) / 4.0 * k).astype(jnp.int32), 0, k - 1), k)
        return 50.0 * jnp.concatenate([(red < 0)[..., None].astype(jnp.float32), fg * (red >= 0)[..., None]], -1)

    predictions = {**two_tower_predictions(model), "segment_logits": Prediction(own, "image", 3, background=True)}
    task = _task("segmentation=shapes:test|background=model")
    encoder = _encoder(model, variables, predictions)
    assert task.class_embeds(encoder).shape[0] == 6  # the foreground classes only
    metrics, _ = task.evaluate({"data": {"image/whole": images, "mask_png/shape": masks}}, encoder)
    x = np.asarray(clip_jax.preprocessing.normalize_images(jnp.asarray(images)))
    pred = np.where(x[..., 0] < 0, 0, np.clip(((x[..., 1] + 2.0) / 4.0 * 6).astype(np.int32), 0, 5) + 1)
    assert metrics["segmentation/scenes.test/miou"] == pytest.approx(numpy_scores(pred, masks, 7)[0], abs=1e-6)
    with pytest.raises(ValueError, match="background=model needs a segmenter that scores background itself"):
        _task("segmentation=shapes:test|background=model").class_embeds(_encoder(model, variables))


def numpy_bilinear(logits, height, width):
    """Bilinear resize of [h, w, C], pixel by pixel: half-pixel centres, edges clamped, no antialiasing
    (torch's interpolate with align_corners=False, which mmseg resizes logits with)."""
    h, w = logits.shape[:2]

    def source(n_out, n_in):
        pos = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        low = np.minimum(pos.astype(int), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), pos - low

    y0, y1, fy = source(height, h)
    x0, x1, fx = source(width, w)
    fy, fx = fy[:, None, None], fx[None, :, None]
    top = logits[y0][:, x0] * (1 - fx) + logits[y0][:, x1] * fx
    bottom = logits[y1][:, x0] * (1 - fx) + logits[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def test_predictions_and_scores_are_at_each_records_own_size(tiny, tmp_path):
    """Records larger, smaller and of other aspects than the model's 32 px: each PNG has its record's size and
    holds the classes of the segmenter's logits resized to it; mIoU counts those pixels against the masks."""
    model, variables, _, _ = tiny
    rng = np.random.default_rng(5)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)  # the whole image at the model's size
    sizes = [(40, 40), (24, 56), (70, 48), (16, 12)]  # up, mixed, up, down
    masks = [rng.integers(0, 4, size).astype(np.uint8) for size in sizes]
    masks[1][:3] = 255

    def coarse(variables, images, class_embeds):  # [N, 8, 8, C] logits of 4x4-pooled pixels
        pooled = images.reshape(images.shape[0], 8, 4, 8, 4, 3).mean((2, 4))
        return 10.0 * pooled @ class_embeds.T

    predictions = {**two_tower_predictions(model), "segment_logits": Prediction(coarse, "image", 3)}
    task = _task(f"segmentation=shapes:test|background=prompt|predictions={tmp_path}")
    task.class_embeds = lambda encoder: np.eye(7, 3, dtype=np.float32)  # classes 0..2 score the channels
    metrics, _ = task.evaluate({"data": {"image/whole": images, "mask_png/shape": masks,
                                         "key": np.array([f"r{i}".encode() for i in range(4)])}},
                               _encoder(model, variables, predictions))
    pooled = images.reshape(4, 8, 4, 8, 4, 3).mean((2, 4))
    want = [numpy_bilinear(10.0 * pooled[i] @ np.eye(7, 3).T, *sizes[i]).argmax(-1) for i in range(4)]
    out = tmp_path / "segmentation" / "scenes.test"
    for i, size in enumerate(sizes):
        written = np.asarray(Image.open(out / f"r{i}.png"))
        assert written.shape == size
        np.testing.assert_array_equal(written, want[i])
    flat_pred = np.concatenate([p.ravel() for p in want])
    flat_true = np.concatenate([m.ravel() for m in masks])
    assert metrics["segmentation/scenes.test/miou"] == pytest.approx(numpy_scores(flat_pred, flat_true, 7)[0],
                                                                     abs=1e-9)


def test_sliding_windows_cover_the_image_as_mmseg():
    assert seg.window_starts(64, 32, 16) == [0, 16, 32]
    assert seg.window_starts(70, 32, 16) == [0, 16, 32, 38]
    assert seg.window_starts(32, 32, 16) == [0]
    # a per-pixel segmenter: windows averaged where they overlap give the whole image's logits
    model = clip_jax.create_model("ViT-Tiny-test")
    encoder = _encoder(model, {"params": {}}, {"segment_logits": Prediction(lambda v, x, c: x @ c.T, "image", 3)})
    run = seg.SegmenterRun(encoder, lambda v, x, c: x @ c.T, 3, "prompt", 0.5, 32, window="slide", stride=12)
    images = np.random.default_rng(3).normal(size=(8, 56, 48, 3)).astype(np.float32)
    masks = np.zeros((8, 56, 48), np.uint8)
    weights = np.eye(3, dtype=np.float32)
    _, predicted = run(images, masks, weights, keep_rows=8)
    np.testing.assert_array_equal(np.stack(predicted), images.argmax(-1))


def test_spec_errors():
    with pytest.raises(ValueError, match="labels=record .* classes=FILE.json"):
        _task("segmentation=shapes:test|labels=record")
    with pytest.raises(ValueError, match="background='none'"):
        _task("segmentation=shapes:test|background=none")
    with pytest.raises(ValueError, match="unknown option 'top_k=5'"):
        evaluate.parse_evals("segmentation=shapes:test|top_k=5")
    model = clip_jax.create_model("ViT-Tiny-test")
    task = _task("segmentation=shapes:test")
    masks = np.full((2, 32, 32), 9, np.uint8)
    with pytest.raises(ValueError, match="example 0 holds class id 9"):
        task.evaluate({"data": {"image/whole": np.zeros((2, 32, 32, 3), np.uint8), "mask_png/shape": masks}},
                      _encoder(model, {"params": {}}))


def test_the_predictions_flag_goes_to_the_segmentation_specs():
    from clip_jax.evaluate.__main__ import with_predictions

    argv = ["--weights=w.safetensors", "--eval=segmentation=shapes:test|bg_thresh=0.3,zero_shot=shapes:test",
            "--predictions", "/out"]
    got = with_predictions(argv)
    assert got[0] == "--weights=w.safetensors" and "--predictions" not in " ".join(got)
    specs = evaluate.parse_evals(got[1].partition("=")[2])
    assert [(s.task, s.get("predictions")) for s in specs] == [("segmentation", "/out"), ("zero_shot", None)]
    assert specs[0].get("bg_thresh") == "0.3"
    assert with_predictions(["--eval=zero_shot=shapes:test"]) == ["--eval=zero_shot=shapes:test"]
    with pytest.raises(SystemExit, match="pass --eval=segmentation=DATA"):
        with_predictions(["--eval=zero_shot=shapes:test", "--predictions=/out"])


def _mask_records(path, sizes=((40, 40),) * 6):
    """TFRecords of image, segmentation_mask (class ids 0..6, 255 ignore) and key, as the VOC converter writes,
    one record of each (height, width)."""
    from clip_jax.input import records
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    rng = np.random.default_rng(4)
    with records.ShardWriter(str(path / "seg"), 1) as writer:
        for i, size in enumerate(sizes):
            image, mask = io.BytesIO(), io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(image, format="PNG")
            ids = rng.integers(0, 7, size).astype(np.uint8)
            ids[:4] = 255
            Image.fromarray(ids).save(mask, format="PNG")
            feature = {name: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value])) for name, value in
                       (("image", image.getvalue()), ("segmentation_mask", mask.getvalue()),
                        ("key", f"img{i}".encode()))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return f"tfrecord:{path}/seg-*"


def _record_masks(data):
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    files = sorted(tf.io.gfile.glob(data.partition(":")[2]))
    spec = {"segmentation_mask": tf.io.FixedLenFeature([], tf.string)}
    return [tf.io.parse_single_example(r, spec)["segmentation_mask"].numpy() for r in tf.data.TFRecordDataset(files)]


def test_the_cli_writes_the_predictions_contract(tiny, tmp_path):
    """python -m clip_jax.evaluate --weights=... --eval=segmentation=...|labels=record --predictions=DIR."""
    try:
        import clip_jax.input.segmentation  # noqa: F401  (registers the evaluation mask features)
    except ImportError:
        pytest.skip("the evaluation mask features (clip_jax.input.segmentation) are not in this checkout")
    from clip_jax.evaluate.__main__ import with_predictions
    from clip_jax.evaluate.evaluator import main
    from clip_jax.input.features import FEATURES

    model, variables, _, _ = tiny
    sizes = [(40, 40), (24, 56), (70, 33), (16, 20), (32, 32), (45, 30)]  # the model reads 32 x 32
    data = _mask_records(tmp_path, sizes)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classnames": shapes.class_names("shape"), "templates": ["a {}."]}))
    weights = clip_jax.save_open_clip("ViT-Tiny-test", variables, str(tmp_path / "tiny.safetensors"),
                                      config_path=str(tmp_path / "tiny.json"))
    out = tmp_path / "out.json"
    spec = f"segmentation={data}|labels=record|classes={classes}"
    # a second spec on the same records: its keys and folder carry the option that differs
    metrics = main(with_predictions([f"--weights={weights}", f"--eval={spec}", f"--eval={spec}|bg_thresh=0.9",
                                     f"--predictions={tmp_path / 'pred'}", f"--out={out}"]))
    assert sorted(k for k in metrics if k.endswith("/miou")) == ["segmentation/seg.bg_thresh-0.9/miou",
                                                                "segmentation/seg/miou"]
    assert json.loads(out.read_text())["metrics"] == metrics
    true = [np.asarray(Image.open(io.BytesIO(m))) for m in _record_masks(data)]
    names = [f"img{i}.png" for i in range(6)] if "key" in FEATURES else [f"{i:06d}.png" for i in range(6)]
    for where in ("seg", "seg.bg_thresh-0.9"):
        directory = tmp_path / "pred" / "segmentation" / where
        assert json.loads((directory / "classes.json").read_text()) == ["background"] + shapes.class_names("shape")
        predicted = []
        for name, (height, width) in zip(names, sizes):  # each at its record's resolution
            png = Image.open(directory / name)
            assert png.mode == "L" and png.size == (width, height)
            predicted.append(np.asarray(png))
        # the metric counts the written pixels against the records' own masks
        want = numpy_scores(np.concatenate([p.ravel() for p in predicted]),
                            np.concatenate([t.ravel() for t in true]), 7)
        assert metrics[f"segmentation/{where}/miou"] == pytest.approx(want[0], abs=1e-9)
