"""The CLIP-on-crops baseline (clip_jax.evaluate.crops_baseline): its scoring (softmax of 100 x cos per region,
every (region, class) pair, per-class NMS, the best K) against numpy; its truth against the detection task's
evaluation batches; and on a tiny scenes split, crops embedded as their true class's text embedding score AP 1."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("pycocotools")

from ml_collections import ConfigDict  # noqa: E402

from clip_jax.evaluate import crops_baseline  # noqa: E402
from clip_jax.evaluate.detection_metrics import truth_json  # noqa: E402
from clip_jax.evaluate.tasks.detection import score  # noqa: E402
from clip_jax.input import eval_data, region_embeds, regions, shapes_scenes  # noqa: E402
from clip_jax.input.detection import read_boxes  # noqa: E402
from clip_jax.methods.vild import VILD_DEFAULTS  # noqa: E402

SIZES = {"train": 2, "validation": 2, "test": 4}


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _iou(a, b):
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(x[..., 2:] - x[..., :2], -1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _reference(boxes, embeds, scores, class_embeds, objectness, nms, k):
    """numpy: p = softmax(100 cos) [x objectness], pairs best first (ties: lower pair index), greedy NMS per class."""
    logits = 100.0 * embeds.astype(np.float64) @ class_embeds.T.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if objectness:
        p = p * scores[:, None]
    c = class_embeds.shape[0]
    flat = p.reshape(-1)
    kept = []
    for i in sorted(range(len(flat)), key=lambda i: (-flat[i], i)):
        same = [j for j in kept if j % c == i % c]
        if same and (_iou(boxes[i // c], boxes[[j // c for j in same]]) > nms).any():
            continue
        kept.append(i)
        if len(kept) == k:
            break
    return boxes[[i // c for i in kept]], flat[kept], np.asarray([i % c for i in kept])


@pytest.mark.parametrize("objectness", [False, True])
def test_scoring_equals_numpy(objectness):
    rng = np.random.default_rng(int(objectness))
    k, m, c, e = 9, 12, 4, 8
    shared = rng.normal(size=e)  # close directions: logits within a few units, no probability underflows to a tie
    class_embeds = _unit(shared + 0.05 * rng.normal(size=(c, e))).astype(np.float32)
    embeds = _unit(shared + 0.05 * rng.normal(size=(k, e))).astype(np.float32)
    xy = rng.uniform(0, 40, (k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (k, 2))], -1).astype(np.float32)
    boxes[1] = boxes[0] + 1.0  # overlapping pairs NMS must drop
    boxes[4] = boxes[3] * 1.02
    scores = rng.uniform(0.1, 1.0, k).astype(np.float32)
    detect = crops_baseline.CropDetector(class_embeds, m, objectness=objectness, max_detections=20)
    out = detect(boxes, embeds, scores)
    want_boxes, want_scores, want_classes = _reference(boxes, embeds, scores, class_embeds, objectness, 0.5, 20)
    n = len(want_scores)
    assert out["valid"].sum() == n and out["valid"][:n].all()
    np.testing.assert_array_equal(out["classes"][:n], want_classes)
    np.testing.assert_allclose(out["scores"][:n], want_scores, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out["boxes"][:n], want_boxes, atol=1e-5)
    assert n < k * c  # NMS dropped some pairs
    # no region: no detection
    assert not crops_baseline.CropDetector(class_embeds, m)(np.zeros((0, 4)), np.zeros((0, e)), np.zeros(0))[
        "valid"].any()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    shapes_scenes.ensure_scenes_dataset(root, sizes=SIZES)
    return {"cache_dir": root, "scenes_sizes": SIZES, "image_dtype": "uint8"}


def test_truth_equals_the_detection_tasks_batches(scenes):
    truth = crops_baseline.Truth("shapes_scenes:test", "shape", scenes)
    _, records = region_embeds.read_records("shapes_scenes:test", scenes)
    ours = [truth(rec["raw"]) for rec in records]
    info = eval_data.describe("shapes_scenes:test", scenes)
    batch = next(eval_data.eval_batches(info, scenes, batch_size=8, image_size=32, context_length=8,
                                        features=("boxes/shape", "image/size")))
    assert len(ours) == int(batch["mask"].sum()) == SIZES["test"]
    for row, (boxes, size, _) in enumerate(ours):
        theirs = read_boxes(batch["boxes/shape"][row])
        for key in ("boxes", "labels", "crowd"):
            np.testing.assert_array_equal(boxes[key], theirs[key])
        assert size == list(batch["image/size"][row])


def test_true_boxes_embedded_as_their_class_score_ap_1(scenes):
    """Proposals = the true boxes (BoxProposals), each region's embedding its class's text embedding: every
    figure 1, with and without objectness."""
    config = ConfigDict({"vild": dict(VILD_DEFAULTS)})
    labels, names, novel, _ = crops_baseline.class_setup(config)
    assert [n for n, v in zip(names, novel) if v] == ["star", "cross"]
    class_embeds = np.eye(len(names), 8, dtype=np.float32)
    truth = crops_baseline.Truth("shapes_scenes:test", labels, scenes)
    _, raw = region_embeds.read_records("shapes_scenes:test", scenes, needs=("objects/bbox",))
    records = list(region_embeds.embed_regions(raw, region_embeds.BoxProposals(copies=0), lambda x: np.ones(
        (len(x), 8), np.float32), 16, crop_batch=8))
    for rec in records:  # the regions are the true boxes in order: give each its class's embedding
        own = truth(rec["raw"])[0]
        assert len(own["labels"]) == len(rec[regions.BBOX])
        rec[regions.EMBEDS] = class_embeds[own["labels"]]
    detectors = {tag: crops_baseline.CropDetector(class_embeds, 16, objectness=o) for tag, o in (("", False),
                                                                                                  ("o", True))}
    listed, images, truths, skipped = crops_baseline.evaluate_crops(records, truth, detectors, len(names))
    assert skipped == 0 and len(images) == SIZES["test"]
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    gt = truth_json(images, truths, categories)
    present = set(np.concatenate([t["labels"] for t in truths]).tolist())
    for detections in listed.values():
        figures, _ = score(gt, detections, 100, novel)
        assert figures["AP"] == pytest.approx(1.0) and figures["AP50"] == pytest.approx(1.0)
        for part, which in (("base", ~novel), ("novel", novel)):
            if present & set(np.flatnonzero(which).tolist()):
                assert figures[f"AP50_{part}"] == pytest.approx(1.0)


def test_classes_not_the_label_sets_are_refused():
    config = ConfigDict({"vild": {**VILD_DEFAULTS, "classes": ("circle", "square", "hexagon")}})
    with pytest.raises(ValueError, match="not the classes of labels='shape'"):
        crops_baseline.class_setup(config)
    with pytest.raises(ValueError, match="templates"):
        crops_baseline.class_setup(ConfigDict({"vild": dict(VILD_DEFAULTS)}), ["no placeholder"])
