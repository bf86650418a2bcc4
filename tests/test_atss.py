"""clip_jax.models.atss against GLIP's ATSSLossComputation (maskrcnn_benchmark/modeling/rpn/loss.py),
transcribed here in numpy line by line, and torchvision.ops' focal and GIoU losses (one torch subprocess)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import atss, box_ops

INF = 1e8  # the reference's
# 3 levels on a 128 px image: strides 8, 16, 32 (one anchor per location, or three aspect ratios)
GRIDS, STRIDES, SIZES = [(16, 16), (8, 8), (4, 4)], [8, 16, 32], [(32,), (64,), (128,)]


def _anchor_levels(ratios):
    levels = [np.asarray(box_ops.anchors([g], [s], [z], ratios)) for g, s, z in zip(GRIDS, STRIDES, SIZES)]
    return levels, len(ratios)


# -- the reference, in numpy ----------------------------------------------------------------------


def ref_boxlist_iou(box1, box2):
    TO_REMOVE = 1
    area1 = (box1[:, 2] - box1[:, 0] + TO_REMOVE) * (box1[:, 3] - box1[:, 1] + TO_REMOVE)
    area2 = (box2[:, 2] - box2[:, 0] + TO_REMOVE) * (box2[:, 3] - box2[:, 1] + TO_REMOVE)
    lt = np.maximum(box1[:, None, :2], box2[:, :2])
    rb = np.minimum(box1[:, None, 2:], box2[:, 2:])
    wh = np.clip(rb - lt + TO_REMOVE, 0, None)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return inter / (area1[:, None] + area2 - inter)


def ref_encode(gt_boxes, anchors):
    TO_REMOVE = 1
    ex_widths = anchors[:, 2] - anchors[:, 0] + TO_REMOVE
    ex_heights = anchors[:, 3] - anchors[:, 1] + TO_REMOVE
    ex_ctr_x = (anchors[:, 2] + anchors[:, 0]) / 2
    ex_ctr_y = (anchors[:, 3] + anchors[:, 1]) / 2
    gt_widths = gt_boxes[:, 2] - gt_boxes[:, 0] + TO_REMOVE
    gt_heights = gt_boxes[:, 3] - gt_boxes[:, 1] + TO_REMOVE
    gt_ctr_x = (gt_boxes[:, 2] + gt_boxes[:, 0]) / 2
    gt_ctr_y = (gt_boxes[:, 3] + gt_boxes[:, 1]) / 2
    wx, wy, ww, wh = (10., 10., 5., 5.)
    return np.stack((wx * (gt_ctr_x - ex_ctr_x) / ex_widths, wy * (gt_ctr_y - ex_ctr_y) / ex_heights,
                     ww * np.log(gt_widths / ex_widths), wh * np.log(gt_heights / ex_heights)), axis=1)


def ref_decode(preds, anchors):
    TO_REMOVE = 1
    widths = anchors[:, 2] - anchors[:, 0] + TO_REMOVE
    heights = anchors[:, 3] - anchors[:, 1] + TO_REMOVE
    ctr_x = (anchors[:, 2] + anchors[:, 0]) / 2
    ctr_y = (anchors[:, 3] + anchors[:, 1]) / 2
    wx, wy, ww, wh = (10., 10., 5., 5.)
    dx, dy = preds[:, 0::4] / wx, preds[:, 1::4] / wy
    dw = np.minimum(preds[:, 2::4] / ww, np.log(1000. / 16))
    dh = np.minimum(preds[:, 3::4] / wh, np.log(1000. / 16))
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = np.exp(dw) * widths[:, None]
    pred_h = np.exp(dh) * heights[:, None]
    pred_boxes = np.zeros_like(preds)
    pred_boxes[:, 0::4] = pred_ctr_x - 0.5 * (pred_w - 1)
    pred_boxes[:, 1::4] = pred_ctr_y - 0.5 * (pred_h - 1)
    pred_boxes[:, 2::4] = pred_ctr_x + 0.5 * (pred_w - 1)
    pred_boxes[:, 3::4] = pred_ctr_y + 0.5 * (pred_h - 1)
    return pred_boxes


def ref_prepare_targets(anchor_levels, bboxes_per_im, topk_per_level=9, num_anchors_per_loc=1):
    """prepare_targets' 'ATSS' body for one image -> (matched index or -1, reg_targets)."""
    num_gt = len(bboxes_per_im)
    anchors_per_im = np.concatenate(anchor_levels)
    num_anchors_per_level = [len(a) for a in anchor_levels]
    ious = ref_boxlist_iou(anchors_per_im, bboxes_per_im)
    gt_cx = (bboxes_per_im[:, 2] + bboxes_per_im[:, 0]) / 2.0
    gt_cy = (bboxes_per_im[:, 3] + bboxes_per_im[:, 1]) / 2.0
    gt_points = np.stack((gt_cx, gt_cy), axis=1)
    anchors_cx_per_im = (anchors_per_im[:, 2] + anchors_per_im[:, 0]) / 2.0
    anchors_cy_per_im = (anchors_per_im[:, 3] + anchors_per_im[:, 1]) / 2.0
    anchor_points = np.stack((anchors_cx_per_im, anchors_cy_per_im), axis=1)
    distances = np.sqrt(((anchor_points[:, None, :] - gt_points[None, :, :]) ** 2).sum(-1))
    candidate_idxs = []
    star_idx = 0
    for level in range(len(anchor_levels)):
        end_idx = star_idx + num_anchors_per_level[level]
        distances_per_level = distances[star_idx:end_idx, :]
        topk = min(topk_per_level * num_anchors_per_loc, num_anchors_per_level[level])
        topk_idxs_per_level = np.argsort(distances_per_level, axis=0, kind="stable")[:topk]
        candidate_idxs.append(topk_idxs_per_level + star_idx)
        star_idx = end_idx
    candidate_idxs = np.concatenate(candidate_idxs, axis=0)
    candidate_ious = ious[candidate_idxs, np.arange(num_gt)]
    iou_mean_per_gt = candidate_ious.mean(0)
    iou_std_per_gt = candidate_ious.std(0, ddof=1)  # torch's Tensor.std: unbiased (checked below)
    iou_thresh_per_gt = iou_mean_per_gt + iou_std_per_gt
    is_pos = candidate_ious >= iou_thresh_per_gt[None, :]
    anchor_num = anchors_cx_per_im.shape[0]
    for ng in range(num_gt):
        candidate_idxs[:, ng] += ng * anchor_num
    e_anchors_cx = np.broadcast_to(anchors_cx_per_im.reshape(1, -1), (num_gt, anchor_num)).reshape(-1)
    e_anchors_cy = np.broadcast_to(anchors_cy_per_im.reshape(1, -1), (num_gt, anchor_num)).reshape(-1)
    candidate_idxs = candidate_idxs.reshape(-1)
    l = e_anchors_cx[candidate_idxs].reshape(-1, num_gt) - bboxes_per_im[:, 0]  # noqa: E741
    t = e_anchors_cy[candidate_idxs].reshape(-1, num_gt) - bboxes_per_im[:, 1]
    r = bboxes_per_im[:, 2] - e_anchors_cx[candidate_idxs].reshape(-1, num_gt)
    b = bboxes_per_im[:, 3] - e_anchors_cy[candidate_idxs].reshape(-1, num_gt)
    is_in_gts = np.stack([l, t, r, b], axis=1).min(axis=1) > 0.01
    is_pos = is_pos & is_in_gts
    ious_inf = np.full_like(ious, -INF).T.copy().reshape(-1)
    index = candidate_idxs.reshape(-1)[is_pos.reshape(-1)]
    ious_inf[index] = ious.T.copy().reshape(-1)[index]
    ious_inf = ious_inf.reshape(num_gt, -1).T
    anchors_to_gt_values, anchors_to_gt_indexs = ious_inf.max(axis=1), ious_inf.argmax(axis=1)  # first max
    matched = np.where(anchors_to_gt_values == -INF, -1, anchors_to_gt_indexs)
    return matched, ref_encode(bboxes_per_im[anchors_to_gt_indexs], anchors_per_im)


def ref_centerness(reg_targets, anchors):
    gts = ref_decode(reg_targets, anchors)
    anchors_cx = (anchors[:, 2] + anchors[:, 0]) / 2
    anchors_cy = (anchors[:, 3] + anchors[:, 1]) / 2
    left_right = np.stack([anchors_cx - gts[:, 0], gts[:, 2] - anchors_cx], axis=1)
    top_bottom = np.stack([anchors_cy - gts[:, 1], gts[:, 3] - anchors_cy], axis=1)
    return np.sqrt((left_right.min(-1) / left_right.max(-1)) * (top_bottom.min(-1) / top_bottom.max(-1)))


def ref_giou_loss(pred, target, anchor, weight):
    pred_boxes, gt_boxes = ref_decode(pred, anchor), ref_decode(target, anchor)
    px1, py1 = pred_boxes[:, 0], pred_boxes[:, 1]
    px2, py2 = np.maximum(px1, pred_boxes[:, 2]), np.maximum(py1, pred_boxes[:, 3])
    pred_area = (px2 - px1) * (py2 - py1)
    tx1, ty1, tx2, ty2 = gt_boxes.T
    target_area = (tx2 - tx1) * (ty2 - ty1)
    xi1, yi1, xi2, yi2 = np.maximum(px1, tx1), np.maximum(py1, ty1), np.minimum(px2, tx2), np.minimum(py2, ty2)
    mask = (yi2 > yi1) & (xi2 > xi1)
    area_intersect = np.where(mask, (xi2 - xi1) * (yi2 - yi1), 0)
    area_enclosing = ((np.maximum(px2, tx2) - np.minimum(px1, tx1)) * (np.maximum(py2, ty2) - np.minimum(py1, ty1))
                      + 1e-7)
    area_union = pred_area + target_area - area_intersect + 1e-7
    gious = area_intersect / area_union - (area_enclosing - area_union) / area_enclosing
    losses = 1 - gious
    return (losses * weight).sum() if weight.sum() > 0 else losses.sum()


def ref_focal(logits, targets, alpha=0.25, gamma=2.0):  # the closed form
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    return np.where(targets, -alpha * (1 - p) ** gamma * np.log(p), -(1 - alpha) * p ** gamma * np.log(1 - p))


def ref_losses(logits, deltas, ctr_logits, anchors, matched, reg_targets, token_labels, token_mask):
    """The end of ATSSLossComputation.__call__ on one process (num_gpus 1)."""
    pos = matched.reshape(-1) >= 0
    num_pos_avg_per_gpu = max(float(pos.sum()), 1.0)
    token = ref_focal(logits, token_labels)[np.broadcast_to(token_mask[:, None, :], logits.shape)].sum()
    a = np.broadcast_to(anchors, deltas.shape).reshape(-1, 4)[pos]
    reg_t, pred = reg_targets.reshape(-1, 4)[pos], deltas.reshape(-1, 4)[pos]
    if not pos.any():
        return token / num_pos_avg_per_gpu, 0.0, 0.0
    ctr = ref_centerness(reg_t, a)
    reg = ref_giou_loss(pred, reg_t, a, ctr) / ctr.sum() * 2.0
    x = ctr_logits.reshape(-1)[pos].astype(np.float64)
    bce = (np.maximum(x, 0) - x * ctr + np.log1p(np.exp(-np.abs(x)))).sum()
    return token / num_pos_avg_per_gpu, reg, bce / num_pos_avg_per_gpu


# -- cases ----------------------------------------------------------------------------------------


def _image_boxes(rng, n_random):
    """Slots: random boxes, a 2 px box between anchor centres (no positive), boxes whose left edge is 0.005
    and 0.015 left of a candidate's centre (outside and inside by the 0.01 rule), a duplicate pair (tied
    claims), padding (an image-sized box that would claim much if it counted)."""
    xy = rng.uniform(-10, 120, (n_random, 2))
    wh = rng.uniform(4, 90, (n_random, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    tiny = [[3.1, 3.2, 5.3, 5.4]]
    dup = rng.uniform(20, 60, 2)
    dup = [list(dup) + list(dup + rng.uniform(20, 50, 2))]
    pad = [[0.0, 0.0, 128.0, 128.0]]
    edge = [[15.995, 11.0, 25.995, 21.0], [79.985, 59.0, 89.985, 69.0]]
    boxes = np.concatenate([boxes[:2], dup, pad, tiny, edge, boxes[2:], dup, pad]).astype(np.float32)
    valid = np.ones(len(boxes), bool)
    valid[[3, len(boxes) - 1]] = False
    return boxes, valid, 2, 4  # the first duplicate's and the tiny box's slots


@pytest.mark.parametrize("ratios", [(1.0,), (0.5, 1.0, 2.0)])
def test_assignment_equals_reference(ratios):
    levels, per_loc = _anchor_levels(ratios)
    anchors = np.concatenate(levels)
    sizes = [len(a) for a in levels]
    rng = np.random.default_rng(len(ratios))
    images = [_image_boxes(rng, 9) for _ in range(3)]
    boxes = np.stack([b for b, _, _, _ in images])
    valid = np.stack([v for _, v, _, _ in images])
    assign = jax.jit(jax.vmap(functools.partial(atss.atss_assign, level_sizes=sizes, anchors_per_location=per_loc),
                              in_axes=(None, 0, 0)))
    out = jax.tree.map(np.asarray, assign(jnp.asarray(anchors), jnp.asarray(boxes), jnp.asarray(valid)))
    for i, (b, v, dup, tiny) in enumerate(images):
        slots = np.flatnonzero(v)
        ref_idx, ref_reg = ref_prepare_targets(levels, b[v], num_anchors_per_loc=per_loc)
        ref_matched = np.where(ref_idx >= 0, slots[np.maximum(ref_idx, 0)], -1)
        np.testing.assert_array_equal(out.matched[i], ref_matched)
        pos = ref_matched >= 0
        assert 20 < pos.sum() and (out.matched[i] == dup).any() and not (out.matched[i] == len(b) - 2).any()
        assert not (out.matched[i] == tiny).any() and not np.isin(out.matched[i], np.flatnonzero(~v)).any()
        np.testing.assert_allclose(out.reg_targets[i][pos], ref_reg[pos], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.reg_targets[i][~pos], 0)
        np.testing.assert_allclose(out.centerness[i][pos], ref_centerness(ref_reg[pos], anchors[pos]),
                                   rtol=1e-5, atol=1e-6)
        assert (out.centerness[i][~pos] == 0).all()
    # the coder is its own inverse and the IoU is boxlist_iou's
    np.testing.assert_allclose(np.asarray(atss.decode(atss.encode(boxes[0], anchors[:len(boxes[0])]),
                                                      anchors[:len(boxes[0])])), boxes[0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(atss.legacy_iou(anchors, boxes[0])), ref_boxlist_iou(anchors, boxes[0]),
                               rtol=1e-5, atol=1e-6)


TORCH_SIDE = """
import torch, torchvision
t = {k: torch.from_numpy(v) for k, v in inputs.items()}
outputs["focal"] = torchvision.ops.sigmoid_focal_loss(t["logits"], t["targets"].float(), 0.25, 2.0, "none").numpy()
outputs["giou"] = torchvision.ops.generalized_box_iou_loss(t["pred"], t["target"], "none").numpy()
outputs["std"] = t["values"].std(0).numpy()
"""


def test_losses_equal_torchvision_and_closed_form():
    from conftest import reference, torch_reference

    reference("torch", load=False)
    reference("torchvision", load=False)
    rng = np.random.default_rng(3)
    logits = np.concatenate([rng.normal(0, 4, 500), [-30, 30, 0]]).astype(np.float32)
    targets = rng.uniform(size=logits.shape) < 0.3
    xy = rng.uniform(0, 100, (200, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 50, (200, 2))], 1).astype(np.float32)
    target = (pred + rng.normal(0, 15, pred.shape)).astype(np.float32)
    target[:, 2:] = np.maximum(target[:, 2:], target[:, :2] + 1)
    values = rng.uniform(size=(9, 4)).astype(np.float32)
    ref = torch_reference(TORCH_SIDE, logits=logits, targets=targets, pred=pred, target=target, values=values)
    focal = np.asarray(jax.jit(atss.sigmoid_focal_loss)(logits, targets))
    np.testing.assert_allclose(focal, ref["focal"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(focal, ref_focal(logits, targets), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(atss.giou_loss)(pred, target)), ref["giou"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref["std"], values.std(0, ddof=1), rtol=1e-6)  # the transcription's ddof


def _batch(rng, images, anchors, sizes, length=12):
    boxes, valid = [], []
    for _ in range(images):
        b, v, _, _ = _image_boxes(rng, 5)
        boxes.append(b)
        valid.append(v)
    boxes, valid = np.stack(boxes), np.stack(valid)
    n, a, m = images, len(anchors), boxes.shape[1]
    box_tokens = rng.uniform(size=(n, m, length)) < 0.2
    token_mask = np.arange(length)[None, :] < np.array([[length], [7]])[:n]
    deltas = rng.normal(0, 1, (n, a, 4)).astype(np.float32)
    deltas[rng.uniform(size=(n, a)) < 0.15, 2:] = -40.0  # predictions inverted by the (w - 1) decode: x2 < x1
    return boxes, valid, box_tokens, token_mask, deltas, rng.normal(0, 2, (n, a)).astype(np.float32)


def test_loss_values_equal_reference():
    levels, _ = _anchor_levels((1.0,))
    anchors = np.concatenate(levels)
    sizes = [len(x) for x in levels]
    rng = np.random.default_rng(7)
    boxes, valid, box_tokens, token_mask, deltas, ctr_logits = _batch(rng, 2, anchors, sizes)
    logits = rng.normal(-2, 3, (2, len(anchors), box_tokens.shape[-1])).astype(np.float32)

    @jax.jit
    def run(boxes, valid, box_tokens, logits, deltas, ctr_logits, token_mask):
        targets = jax.vmap(functools.partial(atss.atss_assign, level_sizes=sizes), in_axes=(None, 0, 0))(
            anchors, boxes, valid)
        labels = atss.token_targets(targets.matched, box_tokens)
        return targets, labels, atss.atss_losses(logits, deltas, ctr_logits, anchors, targets, labels, token_mask)

    targets, labels, losses = jax.tree.map(np.asarray, run(boxes, valid, box_tokens, logits, deltas, ctr_logits,
                                                           token_mask))
    # the reference's token labels: the matched box's row, background the last position only
    bg = targets.matched < 0
    expect = np.take_along_axis(box_tokens, np.maximum(targets.matched, 0)[..., None], 1)
    expect[bg] = np.eye(box_tokens.shape[-1], dtype=bool)[-1]
    np.testing.assert_array_equal(labels, expect)
    ref = ref_losses(logits, deltas, ctr_logits, anchors, targets.matched, targets.reg_targets, labels, token_mask)
    np.testing.assert_allclose([losses["token"], losses["reg"], losses["centerness"]], ref, rtol=2e-5)


def test_jits_with_finite_gradients_and_no_boxes():
    levels, _ = _anchor_levels((1.0,))
    anchors = np.concatenate(levels)
    sizes = [len(x) for x in levels]
    rng = np.random.default_rng(11)
    boxes, valid, box_tokens, token_mask, deltas, ctr_logits = _batch(rng, 2, anchors, sizes)
    head = atss.AlignmentHead()
    visual = rng.normal(0, 1, (2, len(anchors), 16)).astype(np.float32)
    tokens = rng.normal(0, 1, (2, box_tokens.shape[-1], 24)).astype(np.float32)
    tokens[1, 7:] = 0.0  # padding tokens: zero embeddings
    params = head.init(jax.random.PRNGKey(0), visual, tokens, token_mask)["params"]
    assert float(params["log_scale"]) == 0.0 and np.allclose(params["bias0"], -np.log(0.99 / 0.01))

    @jax.jit
    def loss(params, visual, tokens, deltas, ctr_logits, boxes, valid):
        targets = jax.vmap(functools.partial(atss.atss_assign, level_sizes=sizes), in_axes=(None, 0, 0))(
            anchors, boxes, valid)
        labels = atss.token_targets(targets.matched, box_tokens)
        logits = head.apply({"params": params}, visual, tokens, token_mask)
        parts = atss.atss_losses(logits, deltas, ctr_logits, anchors, targets, labels, token_mask)
        return sum(parts.values()), parts

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    for v in (valid, np.zeros_like(valid)):
        grads, parts = grad(params, visual, tokens, deltas, ctr_logits, boxes, v)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
        assert all(np.isfinite(float(p)) for p in parts.values())
    assert float(parts["reg"]) == 0 and float(parts["centerness"]) == 0 and float(parts["token"]) > 0
    # the alignment logit's formula, in numpy
    logits = np.asarray(head.apply({"params": params}, visual, tokens, token_mask))
    e = tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    proj = (e / 2) @ np.asarray(params["text_proj"]["kernel"]) + np.asarray(params["text_proj"]["bias"])
    expect = np.einsum("nad,nld->nal", visual, proj) + (e @ np.asarray(params["bias_lang"]) + float(params["bias0"]))[
        :, None]
    expect = np.where(token_mask[:, None, :], np.clip(expect, -50000, 50000), -50000)
    np.testing.assert_allclose(logits, expect, rtol=1e-5, atol=1e-5)


def test_bad_input():
    anchors = np.concatenate(_anchor_levels((1.0,))[0])
    boxes = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="level_sizes sum"):
        atss.atss_assign(anchors, boxes, np.ones(3, bool), [256, 64])
    with pytest.raises(ValueError, match="valid must be"):
        atss.atss_assign(anchors, boxes, np.ones(2, bool), [256, 64, 16])
    with pytest.raises(ValueError, match="at least one box slot"):
        atss.atss_assign(anchors, np.zeros((0, 4)), np.ones(0, bool), [256, 64, 16])
