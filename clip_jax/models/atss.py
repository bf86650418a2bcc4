"""GLIP's one-stage assigner and losses (ATSS with word-region alignment), static in every shape.

ATSS (Zhang et al. 2020) as GLIP's maskrcnn_benchmark/modeling/rpn/loss.py (ATSSLossComputation) does it:
for each true box, the `top_k` anchors per pyramid level nearest its centre are candidates; those with
IoU >= mean + std (unbiased, as torch's) of the candidates' IoUs and their centre more than 0.01 inside
the box are positives; an anchor positive for several boxes goes to the one of highest IoU (the lowest
index on a tie). The reference's box arithmetic keeps maskrcnn_benchmark's "+1" pixel convention (IoU
and box widths are x2 - x1 + 1) and the ATSS box coder (weights 10, 10, 5, 5, centres (x1 + x2) / 2),
both built here from clip_jax.models.box_ops.

Losses (GLIP-T: USE_DOT_PRODUCT_TOKEN_LOSS): sigmoid focal loss (alpha 0.25, gamma 2) per (anchor, token)
over the prompt's tokens, GIoU of the decoded boxes weighted by the centerness targets, centerness BCE.
`AlignmentHead` is the alignment logit of vldyhead.py. One image per call for the targets (vmap over a
batch); the losses take the batch, padded boxes come with a boolean `valid`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import box_ops

ATSS_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the ATSS BoxCoder's (vldyhead.py), fixed there
INSIDE_EPS = 0.01  # a positive anchor's centre is more than this inside its box
REG_LOSS_WEIGHT = 2.0  # cfg.MODEL.ATSS.REG_LOSS_WEIGHT, applied to the GIoU loss
LOGIT_CLAMP = 50000.0  # CLAMP_DOT_PRODUCT's bound on the alignment logits
PRIOR_PROB = 0.01  # the focal-loss prior: bias0 = -log((1 - p) / p)


class AtssTargets(NamedTuple):
    """Per anchor: the index of its true box (-1: background), the box's regression targets in the
    ATSS coder (0 on background) and its centerness target (0 on background)."""

    matched: jax.Array  # [A] int32
    reg_targets: jax.Array  # [A, 4]
    centerness: jax.Array  # [A]


# -- the reference's box arithmetic ("+1" widths) ------------------------------------------------


def _plus_one(boxes):
    """x2 and y2 moved by one pixel: box_ops' continuous formulas on these are maskrcnn_benchmark's
    inclusive-pixel ones (widths x2 - x1 + 1)."""
    return boxes + jnp.asarray([0.0, 0.0, 1.0, 1.0], boxes.dtype)


def _widened(boxes):
    """Half a pixel out on each side: width x2 - x1 + 1 about the centre (x1 + x2) / 2, the ATSS coder's."""
    return boxes + jnp.asarray([-0.5, -0.5, 0.5, 0.5], boxes.dtype)


def legacy_iou(a, b):
    """[..., N, 4] x [..., M, 4] -> [..., N, M]: maskrcnn_benchmark's boxlist_iou (areas and intersections
    over inclusive pixels, x2 - x1 + 1)."""
    return box_ops.box_iou(_plus_one(jnp.asarray(a)), _plus_one(jnp.asarray(b)))


def encode(boxes, anchors):
    """The ATSS BoxCoder's encode(boxes, anchors) ([..., 4], broadcast): (dx, dy, dw, dh) with weights
    (10, 10, 5, 5), widths x2 - x1 + 1 and centres (x1 + x2) / 2."""
    return box_ops.encode_boxes(_widened(jnp.asarray(boxes)), _widened(jnp.asarray(anchors)), ATSS_WEIGHTS)


def decode(deltas, anchors):
    """The ATSS BoxCoder's decode(deltas, anchors): encode's inverse, dw and dh clamped at log(1000 / 16),
    the box's x2 at centre + (w - 1) / 2."""
    deltas = jnp.asarray(deltas)
    widened = box_ops.decode_boxes(deltas, _widened(jnp.asarray(anchors).astype(deltas.dtype)), ATSS_WEIGHTS)
    return widened - jnp.asarray([-0.5, -0.5, 0.5, 0.5], widened.dtype)


def _centres(boxes):
    return (boxes[..., 0] + boxes[..., 2]) / 2.0, (boxes[..., 1] + boxes[..., 3]) / 2.0


def centerness_targets(boxes, anchors):
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of each anchor's centre within its box
    ([..., 4], broadcast), as compute_centerness_targets (which decodes the box from its targets)."""
    cx, cy = _centres(anchors)
    left, top = cx - boxes[..., 0], cy - boxes[..., 1]
    right, bottom = boxes[..., 2] - cx, boxes[..., 3] - cy
    ratio = (box_ops._safe_divide(jnp.minimum(left, right), jnp.maximum(left, right))
             * box_ops._safe_divide(jnp.minimum(top, bottom), jnp.maximum(top, bottom)))
    return jnp.sqrt(jnp.maximum(ratio, 0.0))


# -- ATSS assignment ------------------------------------------------------------------------------


def _check_levels(level_sizes, num_anchors: int) -> tuple[int, ...]:
    sizes = tuple(level_sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in sizes):
        raise ValueError(f"level_sizes must be the number of anchors of each pyramid level (positive ints), "
                         f"got {level_sizes!r}")
    if sum(sizes) != num_anchors:
        raise ValueError(f"level_sizes sum to {sum(sizes)} but there are {num_anchors} anchors: give one count "
                         "per level, in the anchors' (level-major) order")
    return tuple(int(s) for s in sizes)


def atss_assign(anchors, boxes, valid, level_sizes: Sequence[int], top_k: int = 9,
                anchors_per_location: int = 1) -> AtssTargets:
    """One image's ATSS targets: anchors [A, 4] (levels concatenated, `level_sizes` anchors each),
    true boxes [M, 4] (x1, y1, x2, y2 pixels) with valid [M] (padding: False) -> AtssTargets.

    Candidates per box are the top_k * anchors_per_location anchors of each level nearest its centre
    (all of a level that has fewer); everything else is the reference's rule (module docstring).
    Boxes without a positive anchor (no anchor centre inside them) are left out; padded boxes claim
    nothing. Targets are data: no gradient flows back to the boxes."""
    anchors = box_ops._check_boxes("anchors", anchors, rank=2)
    boxes = box_ops._check_boxes("boxes", boxes, rank=2)
    num_anchors, num_boxes = anchors.shape[0], boxes.shape[0]
    if num_boxes < 1:
        raise ValueError("boxes has no rows: pad to at least one box slot (with valid=False)")
    if jnp.shape(valid) != (num_boxes,):
        raise ValueError(f"valid must be [M] = [{num_boxes}] (one flag per box slot), got {jnp.shape(valid)}")
    sizes = _check_levels(level_sizes, num_anchors)
    top_k = box_ops._check_int("top_k", top_k, 1)
    per_location = box_ops._check_int("anchors_per_location", anchors_per_location, 1)
    anchors = anchors.astype(jnp.float32)
    boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
    valid = jnp.asarray(valid, bool)

    acx, acy = _centres(anchors)  # [A]
    bcx, bcy = _centres(boxes)  # [M]
    distances = jnp.sqrt((acx[None, :] - bcx[:, None]) ** 2 + (acy[None, :] - bcy[:, None]) ** 2)  # [M, A]
    candidates, start = [], 0
    for size in sizes:
        k = min(top_k * per_location, size)
        _, index = jax.lax.top_k(-distances[:, start:start + size], k)
        candidates.append(index + start)
        start += size
    candidates = jnp.concatenate(candidates, axis=1)  # [M, K]

    cand_anchors = anchors[candidates]  # [M, K, 4]
    cand_iou = legacy_iou(cand_anchors, boxes[:, None, :])[..., 0]  # [M, K]
    threshold = cand_iou.mean(1) + jnp.std(cand_iou, axis=1, ddof=1)  # torch's std is unbiased
    cx, cy = acx[candidates], acy[candidates]
    inside = jnp.min(jnp.stack([cx - boxes[:, None, 0], cy - boxes[:, None, 1],
                                boxes[:, None, 2] - cx, boxes[:, None, 3] - cy]), axis=0) > INSIDE_EPS
    positive = (cand_iou >= threshold[:, None]) & inside & valid[:, None]

    rows = jnp.arange(num_boxes)[:, None]
    claims = jnp.full((num_boxes, num_anchors), -jnp.inf, jnp.float32)
    claims = claims.at[rows, candidates].set(jnp.where(positive, cand_iou, -jnp.inf))
    best = jnp.argmax(claims, axis=0).astype(jnp.int32)  # the first box on a tie, as torch's max
    is_pos = jnp.max(claims, axis=0) > -jnp.inf
    matched = jnp.where(is_pos, best, -1)

    gt = boxes[best]
    reg = jnp.where(is_pos[:, None], encode(gt, anchors), 0.0)
    centerness = jnp.where(is_pos, centerness_targets(gt, anchors), 0.0)
    return AtssTargets(matched, reg, centerness)


def token_targets(matched, box_tokens, no_object_token: bool = True):
    """Each anchor's token labels [..., A, L] bool: its box's row of the prompt's positive map box_tokens
    [..., M, L] (bool), none for background. no_object_token: background anchors label the last token
    position instead, as the reference does (its "[NoObj]" token; the loss counts it only where that
    position is inside the token mask, i.e. a prompt filling the query length)."""
    box_tokens = jnp.asarray(box_tokens).astype(bool)
    if box_tokens.ndim != jnp.ndim(matched) + 1:
        raise ValueError(f"box_tokens must be [..., M, L] with matched [..., A], got {box_tokens.shape} and "
                         f"{jnp.shape(matched)}")
    rows = jnp.take_along_axis(box_tokens, jnp.maximum(matched, 0)[..., None], axis=-2)
    background = matched[..., None] < 0
    none = jnp.zeros(box_tokens.shape[-1], bool)
    if no_object_token:
        none = none.at[-1].set(True)
    return jnp.where(background, none, rows)


# -- losses ---------------------------------------------------------------------------------------


def _bce_with_logits(logits, targets):
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise binary focal loss (fvcore's, as torchvision.ops.sigmoid_focal_loss with reduction
    'none'): BCE(logits, targets) * (1 - p_t)^gamma, times alpha_t where alpha >= 0."""
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets).astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = _bce_with_logits(logits, targets) * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def positive_normalizer(num_positive, num_replicas: int = 1):
    """The divisor of the token and centerness losses summed over the global batch: the reference
    divides each replica's sum by max(total positives / replicas, 1) and averages the replicas'
    gradients, so over the global batch it is max(total, replicas). num_replicas=1 (the default) is
    the one-GPU reference and keeps losses independent of the device count."""
    replicas = box_ops._check_int("num_replicas", num_replicas, 1)
    return jnp.maximum(jnp.asarray(num_positive, jnp.float32), float(replicas))


def giou_loss(pred_boxes, target_boxes):
    """Elementwise 1 - GIoU ([..., 4] pairs), the reference's GIoULoss before weighting: the predicted
    box's x2 and y2 are raised to its x1 and y1 (an inverted prediction is empty); equal to
    torchvision.ops.generalized_box_iou_loss elsewhere, with box_ops' 0 for divisions by zero."""
    pred_boxes = jnp.asarray(pred_boxes)
    x1, y1 = pred_boxes[..., 0], pred_boxes[..., 1]
    pred_boxes = jnp.stack([x1, y1, jnp.maximum(x1, pred_boxes[..., 2]), jnp.maximum(y1, pred_boxes[..., 3])], -1)
    giou = box_ops.generalized_box_iou(pred_boxes[..., None, :], jnp.asarray(target_boxes)[..., None, :])
    return 1.0 - giou[..., 0, 0]


def atss_losses(token_logits, box_deltas, centerness_logits, anchors, targets: AtssTargets, token_labels,
                token_mask, alpha: float = 0.25, gamma: float = 2.0, num_replicas: int = 1):
    """The reference's three losses over a batch: token_logits [N, A, L], box_deltas [N, A, 4] (ATSS
    coder), centerness_logits [N, A], anchors [A, 4] or [N, A, 4], targets (AtssTargets, batched [N, ...]),
    token_labels [N, A, L] bool (token_targets), token_mask [N, L] (the prompt's tokens) ->
    {'token': focal sum / normalizer, 'reg': REG_LOSS_WEIGHT * centerness-weighted GIoU sum / centerness
    sum, 'centerness': BCE sum over positives / normalizer}; the normalizer is positive_normalizer.
    Finite, with finite gradients, when no anchor is positive (then 'reg' and 'centerness' are 0)."""
    n, a, length = jnp.shape(token_logits)
    if jnp.shape(box_deltas) != (n, a, 4) or jnp.shape(centerness_logits) != (n, a):
        raise ValueError(f"box_deltas must be [N, A, 4] and centerness_logits [N, A] with token_logits [N, A, L] = "
                         f"{(n, a, length)}, got {jnp.shape(box_deltas)} and {jnp.shape(centerness_logits)}")
    if jnp.shape(token_labels) != (n, a, length) or jnp.shape(token_mask) != (n, length):
        raise ValueError(f"token_labels must be [N, A, L] = {(n, a, length)} and token_mask [N, L] = {(n, length)}, "
                         f"got {jnp.shape(token_labels)} and {jnp.shape(token_mask)}")
    if jnp.shape(targets.matched) != (n, a):
        raise ValueError(f"targets must be batched per image and anchor, [N, A] = {(n, a)}, got matched "
                         f"{jnp.shape(targets.matched)}: vmap atss_assign over the images")
    if jnp.shape(anchors) not in ((a, 4), (n, a, 4)):
        raise ValueError(f"anchors must be [A, 4] or [N, A, 4] with A = {a}, got {jnp.shape(anchors)}")
    anchors = jnp.broadcast_to(jnp.asarray(anchors, jnp.float32), (n, a, 4))
    positive = targets.matched >= 0
    normalizer = positive_normalizer(positive.sum(), num_replicas)

    focal = sigmoid_focal_loss(token_logits, token_labels, alpha, gamma)
    token = jnp.where(jnp.asarray(token_mask, bool)[:, None, :], focal, 0.0).sum() / normalizer

    # background anchors regress to themselves, so their (masked) terms stay finite
    gt = jnp.where(positive[..., None], decode(targets.reg_targets, anchors), anchors)
    pred = decode(jnp.asarray(box_deltas, jnp.float32), anchors)
    weight = jnp.where(positive, targets.centerness, 0.0)
    weight_sum = weight.sum()
    losses = jnp.where(positive, giou_loss(pred, gt), 0.0)
    # the reference's GIoULoss sums unweighted where the weights sum to 0 (not reached: centres are inside)
    reg_sum = jnp.where(weight_sum > 0, (losses * weight).sum(), losses.sum())
    reg = REG_LOSS_WEIGHT * reg_sum / jnp.where(weight_sum > 0, weight_sum, 1.0)

    bce = _bce_with_logits(jnp.asarray(centerness_logits, jnp.float32), targets.centerness)
    centerness = jnp.where(positive, bce, 0.0).sum() / normalizer
    return {"token": token, "reg": reg, "centerness": centerness}


# -- the alignment head ---------------------------------------------------------------------------


def _normalize(x, eps: float = 1e-12):
    """F.normalize (x / max(||x||, eps)), with a finite gradient at x = 0."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), eps * eps))


def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default: kernel and bias uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class AlignmentHead(nn.Module):
    """GLIP's word-region alignment logits (vldyhead.py, USE_DOT_PRODUCT_TOKEN_LOSS): visual features
    O [N, A, D] and token embeddings e [N, L, Dt] ->
    O . Linear(norm(e) / 2)^T / exp(log_scale) + (norm(e) . bias_lang + bias0), clamped to +-50000,
    [N, A, L] float32. The Linear maps Dt to D (torch's default init); log_scale starts at
    `log_scale`, bias_lang at 0 and bias0 at -log((1 - 0.01) / 0.01). Tokens outside token_mask [N, L]
    get the clamp's floor -50000 (sigmoid 0, no gradient)."""

    log_scale: float = 0.0
    prior_prob: float = PRIOR_PROB

    @nn.compact
    def __call__(self, visual, tokens, token_mask):
        if jnp.ndim(visual) != 3 or jnp.ndim(tokens) != 3:
            raise ValueError(f"visual must be [N, A, D] and tokens [N, L, Dt], got {jnp.shape(visual)} and "
                             f"{jnp.shape(tokens)}: flatten the pyramid's positions into A")
        n, _, dim = jnp.shape(visual)
        _, length, text_dim = jnp.shape(tokens)
        if jnp.shape(tokens)[0] != n or jnp.shape(token_mask) != (n, length):
            raise ValueError(f"tokens must be [N, L, Dt] with N = {n} and token_mask [N, L] = {(n, length)}, got "
                             f"{jnp.shape(tokens)} and {jnp.shape(token_mask)}")
        if not 0.0 < self.prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {self.prior_prob!r}")
        embedding = _normalize(tokens)
        proj = nn.Dense(dim, kernel_init=_torch_linear_init(text_dim), bias_init=_torch_linear_init(text_dim),
                        name="text_proj")(embedding / 2.0)  # [N, L, D]
        log_scale = self.param("log_scale", nn.initializers.constant(self.log_scale), ())
        bias_lang = self.param("bias_lang", nn.initializers.zeros, (text_dim,))
        bias0 = self.param("bias0", nn.initializers.constant(-math.log((1 - self.prior_prob) / self.prior_prob)), ())
        bias = embedding @ bias_lang + bias0  # [N, L]
        logits = jnp.einsum("nad,nld->nal", visual.astype(jnp.float32), proj) / jnp.exp(log_scale) + bias[:, None, :]
        logits = jnp.clip(logits, -LOGIT_CLAMP, LOGIT_CLAMP)
        return jnp.where(jnp.asarray(token_mask, bool)[:, None, :], logits, -LOGIT_CLAMP)
