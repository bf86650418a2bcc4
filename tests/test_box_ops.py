"""clip_jax.models.box_ops against torchvision.ops (one torch subprocess computes every reference):
random and adversarial boxes (across the borders, zero-area, inverted, padding), eager and jitted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import box_ops

TOL = dict(rtol=1e-5, atol=1e-5)
IMAGE = (100, 130)  # the anchors' image (height, width)
GRIDS = [(25, 33), (13, 17), (7, 9)]
SIZES = [(32, 40), (64,), (128,)]
RATIOS = [(0.5, 1.0, 2.0), (1.0,), (0.7, 1.3)]
# (output_size, spatial_scale, sampling_ratio, aligned, max_sampling)
ROI_CASES = [((3, 3), 0.5, 2, True, None), ((2, 4), 0.5, 1, False, None), ((3, 3), 0.5, -1, True, 12),
             ((3, 3), 0.5, -1, False, 12), ((4, 3), 0.25, 3, True, None)]
NMS_CASES = [(0.5, 40), (0.3, 500), (0.0, 7), (0.7, 1000)]  # (iou_threshold, max_outputs)


def _random_boxes(rng, n, low, high, max_size):
    xy = rng.uniform(low, high, (n, 2))
    wh = rng.uniform(0, max_size, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _adversarial(rng):
    """Zero-width, zero-height, point, inverted (in x, in y, in both), padding, duplicates, huge."""
    return np.array([[5, 5, 5, 20], [5, 5, 20, 5], [7, 7, 7, 7], [20, 5, 5, 20], [5, 20, 20, 5],
                     [20, 20, 5, 5], [0, 0, 0, 0], [0, 0, 0, 0], [10, 10, 30, 30], [10, 10, 30, 30],
                     [-50, -50, 200, 200], [-10, 3, 4, 9]], np.float32)


def _inputs() -> dict:
    rng = np.random.default_rng(0)
    a = np.concatenate([_random_boxes(rng, 40, -20, 100, 60), _adversarial(rng)])
    b = np.concatenate([_random_boxes(rng, 30, -20, 100, 60), _adversarial(rng)])
    anchors = _random_boxes(rng, len(a), 0, 100, 50)
    anchors[:, 2:] += 1  # anchors are never empty
    deltas = (rng.standard_normal((len(a), 3 * 4)) * 2).astype(np.float32)
    deltas[0, 2:4] = 20.0  # past the exp clip
    features = rng.standard_normal((2, 12, 15, 5)).astype(np.float32)
    # RoIs in image pixels (the map is half their size): inside, across every border, outside, empty, inverted
    rois = np.concatenate([_random_boxes(rng, 60, -8, 34, 20), np.array(
        [[-6, -6, 4, 4], [20, 16, 40, 40], [-10, 5, 50, 12], [40, 40, 60, 60], [10, 10, 10, 10], [5, 8, 5, 20],
         [12, 3, 30, 3], [20, 20, 8, 9], [0, 0, 30, 24], [23.5, 29.9, 24.2, 30.1], [-2.5, -1.9, -1.2, 0.4]],
        np.float32)])
    roi_batch = rng.integers(0, 2, len(rois))
    # NMS: clustered boxes so that many overlap, distinct scores, four classes, some padding
    centres = rng.uniform(0, 200, (25, 2))
    pick = centres[rng.integers(0, 25, 300)] + rng.normal(0, 6, (300, 2))
    wh = rng.uniform(5, 40, (300, 2))
    nms_boxes = np.concatenate([pick - wh / 2, pick + wh / 2], 1).astype(np.float32)
    nms_boxes[:12] = _adversarial(rng)
    nms_scores = rng.permutation(300).astype(np.float32) / 300
    nms_classes = rng.integers(0, 4, 300)
    nms_valid = rng.uniform(size=300) > 0.15
    # many boxes: torchvision's other batched_nms path (a loop over classes)
    many = _random_boxes(rng, 1500, 0, 400, 60)
    many_scores = rng.permutation(1500).astype(np.float32)
    many_classes = rng.integers(0, 6, 1500)
    proposals = np.stack([np.concatenate([_random_boxes(rng, 600, 0, 200, 50)]) for _ in range(2)])
    proposal_scores = np.stack([rng.permutation(600).astype(np.float32) for _ in range(2)])
    proposal_valid = rng.uniform(size=(2, 600)) > 0.2
    return dict(a=a, b=b, anchors=anchors, deltas=deltas, features=features, rois=rois, roi_batch=roi_batch,
                nms_boxes=nms_boxes, nms_scores=nms_scores, nms_classes=nms_classes, nms_valid=nms_valid,
                many=many, many_scores=many_scores, many_classes=many_classes, proposals=proposals,
                proposal_scores=proposal_scores, proposal_valid=proposal_valid)


TORCH_SIDE = f"""
import math, torch, torchvision
from torchvision.ops import boxes as B
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
t = {{k: torch.from_numpy(v) for k, v in inputs.items()}}
a, b = t["a"], t["b"]
outputs["area"] = B.box_area(a).numpy()
outputs["iou"] = B.box_iou(a, b).numpy()
outputs["giou"] = B.generalized_box_iou(a, b).numpy()
for f in ("xywh", "cxcywh"):
    outputs["to_" + f] = B.box_convert(a, "xyxy", f).numpy()
    outputs["from_" + f] = B.box_convert(a, f, "xyxy").numpy()
outputs["clipped"] = B.clip_boxes_to_image(a, (40, 50)).numpy()
for s in (0.0, 3.0):
    mask = torch.zeros(len(a), dtype=torch.bool)
    mask[B.remove_small_boxes(a, s)] = True
    outputs[f"small_{{s}}"] = mask.numpy()
outputs["encoded"] = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(a, t["anchors"]).numpy()
outputs["encoded_1"] = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(a, t["anchors"]).numpy()
outputs["decoded"] = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(t["deltas"], t["anchors"]).numpy()
outputs["decoded_1"] = BoxCoder((1.0, 1.0, 1.0, 1.0), 2.0).decode_single(t["deltas"], t["anchors"]).numpy()
generator = AnchorGenerator(sizes={SIZES!r}, aspect_ratios={RATIOS!r})
images = ImageList(torch.zeros(1, 3, *{IMAGE!r}), [{IMAGE!r}])
outputs["anchors"] = generator(images, [torch.zeros(1, 1, *g) for g in {GRIDS!r}])[0].numpy()
features = t["features"].permute(0, 3, 1, 2)
rois = torch.cat([t["roi_batch"].float()[:, None], t["rois"]], 1)
for i, (size, scale, ratio, aligned, _) in enumerate({ROI_CASES!r}):
    pooled = torchvision.ops.roi_align(features, rois, size, scale, ratio, aligned)
    outputs[f"roi_{{i}}"] = pooled.permute(0, 2, 3, 1).numpy()
valid = t["nms_valid"].nonzero()[:, 0]
for i, (threshold, _) in enumerate({NMS_CASES!r}):
    keep = B.batched_nms(t["nms_boxes"][valid], t["nms_scores"][valid], t["nms_classes"][valid], threshold)
    outputs[f"nms_{{i}}"] = valid[keep].numpy()
outputs["nms_many"] = B.batched_nms(t["many"], t["many_scores"], t["many_classes"], 0.4).numpy()
for i in range(2):
    valid = t["proposal_valid"][i].nonzero()[:, 0]
    top = valid[t["proposal_scores"][i][valid].topk(200).indices]
    keep = B.nms(t["proposals"][i][top], t["proposal_scores"][i][top], 0.6)
    outputs[f"proposals_{{i}}"] = top[keep][:100].numpy()
"""


@pytest.fixture(scope="module")
def case():
    from conftest import reference, torch_reference

    reference("torch", load=False)
    reference("torchvision", load=False)
    inputs = _inputs()
    return inputs, torch_reference(TORCH_SIDE, **inputs)


def _both(fn, *args, **static):
    """fn eagerly and under jax.jit (static keywords bound), as numpy."""
    eager = fn(*args, **static)
    jitted = jax.jit(functools.partial(fn, **static))(*args)
    return jax.tree.map(np.asarray, (eager, jitted))


def test_iou_giou_area_and_conversions(case):
    x, ref = case
    for ours in _both(box_ops.box_area, x["a"]):
        np.testing.assert_allclose(ours, ref["area"], **TOL)
    a, b = x["a"], x["b"]
    w = np.maximum(np.maximum(a[:, None, 2], b[None, :, 2]) - np.minimum(a[:, None, 0], b[None, :, 0]), 0)
    h = np.maximum(np.maximum(a[:, None, 3], b[None, :, 3]) - np.minimum(a[:, None, 1], b[None, :, 1]), 0)
    enclosing = w * h
    for iou, giou in zip(*(_both(f, a, b) for f in (box_ops.box_iou, box_ops.generalized_box_iou))):
        assert np.isfinite(iou).all() and np.isfinite(giou).all()
        bad = ~np.isfinite(ref["iou"])
        assert bad.sum() > 10  # the adversarial rows reach torchvision's 0/0
        np.testing.assert_allclose(iou[~bad], ref["iou"][~bad], **TOL)
        np.testing.assert_array_equal(iou[bad], 0)  # the rule: 0/0 -> 0
        bad = ~np.isfinite(ref["giou"])
        assert bad.sum() > 10
        np.testing.assert_allclose(giou[~bad], ref["giou"][~bad], **TOL)
        # the rule: where torchvision divides by zero, -1 (two empty boxes apart) or 0 (empty enclosing box)
        np.testing.assert_array_equal(giou[bad], np.where(enclosing[bad] > 0, -1.0, 0.0))
    for f in ("xywh", "cxcywh"):
        np.testing.assert_allclose(box_ops.box_convert(a, "xyxy", f), ref["to_" + f], **TOL)
        np.testing.assert_allclose(box_ops.box_convert(a, f, "xyxy"), ref["from_" + f], **TOL)
    for ours in _both(box_ops.clip_boxes, a, height=40, width=50):
        np.testing.assert_array_equal(ours, ref["clipped"])
    for s in (0.0, 3.0):
        np.testing.assert_array_equal(box_ops.remove_small_boxes(a, s), ref[f"small_{s}"])


def test_box_coder(case):
    x, ref = case
    for key, weights in (("encoded", (10, 10, 5, 5)), ("encoded_1", (1, 1, 1, 1))):
        bad = ~np.isfinite(ref[key]).all(1)
        w, h = x["a"][:, 2] - x["a"][:, 0], x["a"][:, 3] - x["a"][:, 1]
        np.testing.assert_array_equal(bad, (w <= 0) | (h <= 0))  # torchvision fails exactly on empty boxes
        for ours in _both(box_ops.encode_boxes, x["a"], x["anchors"], weights=weights):
            np.testing.assert_allclose(ours[~bad], ref[key][~bad], **TOL)
            np.testing.assert_array_equal(ours[bad], 0)  # the rule: no target for an empty box
    deltas = x["deltas"].reshape(len(x["deltas"]), 3, 4)
    for key, kwargs in (("decoded", {}), ("decoded_1", dict(weights=(1, 1, 1, 1), clip=2.0))):
        for ours in _both(box_ops.decode_boxes, deltas, x["anchors"][:, None], **kwargs):
            np.testing.assert_allclose(ours.reshape(len(deltas), 12), ref[key], **TOL)
    # round trip on proper boxes
    ok = ~np.isfinite(ref["encoded"]).all(1) == 0
    back = box_ops.decode_boxes(box_ops.encode_boxes(x["a"], x["anchors"]), x["anchors"])
    np.testing.assert_allclose(np.asarray(back)[ok], x["a"][ok], rtol=1e-5, atol=1e-4)


def test_anchors(case):
    _, ref = case
    strides = [(IMAGE[0] // g[0], IMAGE[1] // g[1]) for g in GRIDS]
    ours = box_ops.anchors(GRIDS, strides, SIZES, RATIOS)
    assert ours.dtype == jnp.float32
    np.testing.assert_array_equal(ours, ref["anchors"])
    one = box_ops.anchors([(4, 5)], [8], [(32, 64)], (0.5, 1.0, 2.0))  # one ratio list for all levels
    assert one.shape == (4 * 5 * 6, 4)
    with pytest.raises(ValueError, match="one entry per pyramid level"):
        box_ops.anchors(GRIDS, strides[:2], SIZES, RATIOS)


@pytest.mark.parametrize("impl", ["gather", "dense"])
@pytest.mark.parametrize("i", range(len(ROI_CASES)))
def test_roi_align(case, i, impl):
    x, ref = case
    size, scale, ratio, aligned, max_sampling = ROI_CASES[i]
    outs = _both(box_ops.roi_align, x["features"], x["rois"], x["roi_batch"], output_size=size, spatial_scale=scale,
                 sampling_ratio=ratio, aligned=aligned, max_sampling=max_sampling, impl=impl)
    for ours in outs:
        np.testing.assert_allclose(ours, ref[f"roi_{i}"], **TOL)


def test_roi_align_dense_equals_gather_with_its_gradient_on_one_image(case):
    """The detector's call (one image's map, all rows index 0): values and the map's gradient agree."""
    x, _ = case
    features = x["features"][:1]
    index = np.zeros(len(x["rois"]), np.int32)

    def pooled(impl):
        fn = functools.partial(box_ops.roi_align, output_size=3, spatial_scale=0.5, impl=impl)
        value = fn(features, x["rois"], index)
        grad = jax.grad(lambda f: (fn(f, x["rois"], index) ** 2).sum())(features)
        return np.asarray(value), np.asarray(grad)

    (v_gather, g_gather), (v_dense, g_dense) = pooled("gather"), pooled("dense")
    assert np.abs(g_gather).sum() > 0
    np.testing.assert_allclose(v_dense, v_gather, **TOL)
    np.testing.assert_allclose(g_dense, g_gather, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="impl"):
        box_ops.roi_align(features, x["rois"], index, 3, impl="matmul")


def test_roi_align_adaptive_default_grid(case):
    """The default static grid covers every box within the map (plus an output bin of border)."""
    x, ref = case
    rois = x["rois"]
    inside = ((rois[:, 2] - rois[:, 0]) * 0.5 <= 15 + 3) & ((rois[:, 3] - rois[:, 1]) * 0.5 <= 12 + 3)
    ours = box_ops.roi_align(x["features"], rois, x["roi_batch"], (3, 3), 0.5, -1, True)
    np.testing.assert_allclose(np.asarray(ours)[inside], ref["roi_2"][inside], **TOL)
    with pytest.raises(ValueError, match="sampling_ratio"):
        box_ops.roi_align(x["features"], rois, x["roi_batch"], 3, 0.5, 0)
    with pytest.raises(ValueError, match="NHWC"):
        box_ops.roi_align(x["features"][0], rois, x["roi_batch"], 3)


def _padded(indices, n):
    return np.concatenate([indices[:n], -np.ones(max(n - len(indices), 0), np.int64)])


@pytest.mark.parametrize("i", range(len(NMS_CASES)))
def test_batched_nms(case, i):
    x, ref = case
    threshold, max_outputs = NMS_CASES[i]
    expected = _padded(ref[f"nms_{i}"], max_outputs)
    for keep, ok in _both(box_ops.batched_nms, x["nms_boxes"], x["nms_scores"], x["nms_classes"], x["nms_valid"],
                          iou_threshold=threshold, max_outputs=max_outputs):
        np.testing.assert_array_equal(keep, expected)
        np.testing.assert_array_equal(ok, expected >= 0)


def test_batched_nms_many_boxes_and_padding(case):
    x, ref = case
    keep, _ = box_ops.batched_nms(x["many"], x["many_scores"], x["many_classes"], np.ones(1500, bool), 0.4, 1500)
    np.testing.assert_array_equal(keep, _padded(ref["nms_many"], 1500))
    nothing = box_ops.batched_nms(x["many"][:50], x["many_scores"][:50], x["many_classes"][:50], np.zeros(50, bool),
                                  0.5, 20)
    np.testing.assert_array_equal(nothing[0], -1)
    assert not np.asarray(nothing[1]).any()
    # equal scores: the lower index first (a stable order)
    same = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    keep, _ = box_ops.batched_nms(same, np.ones(3, np.float32), np.zeros(3, int), np.ones(3, bool), 0.5, 3)
    np.testing.assert_array_equal(keep, [0, 2, -1])
    with pytest.raises(ValueError, match="iou_threshold"):
        box_ops.batched_nms(same, np.ones(3), np.zeros(3), np.ones(3, bool), 1.5, 3)
    with pytest.raises(ValueError, match="max_outputs"):
        box_ops.batched_nms(same, np.ones(3), np.zeros(3), np.ones(3, bool), 0.5, 0)


def test_select_proposals_vmapped(case):
    x, ref = case
    run = jax.jit(jax.vmap(functools.partial(box_ops.select_proposals, pre_nms_top_k=200, iou_threshold=0.6,
                                             post_nms_top_k=100)))
    inputs = (x["proposals"], x["proposal_scores"], x["proposal_valid"])
    boxes, scores, ok, index = jax.tree.map(np.asarray, run(*inputs))
    # the batch split over a 2-device mesh (Auto axes, as clip_jax.parallel's) gives the same proposals
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = run(*(jax.device_put(v, sharding) for v in inputs))
    np.testing.assert_array_equal(sharded[3], index)
    for i in range(2):
        expected = _padded(ref[f"proposals_{i}"], 100)
        np.testing.assert_array_equal(index[i], expected)
        np.testing.assert_array_equal(ok[i], expected >= 0)
        np.testing.assert_array_equal(boxes[i][ok[i]], x["proposals"][i][expected[expected >= 0]])
        np.testing.assert_array_equal(scores[i][ok[i]], x["proposal_scores"][i][expected[expected >= 0]])
