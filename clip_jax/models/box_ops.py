"""Detection ops, static in their array sizes: IoU and GIoU, the box coder, anchors, RoIAlign, batched NMS with
a fixed number of outputs and proposal selection, each equal to its torchvision.ops counterpart.

Boxes are [..., 4] float (x1, y1, x2, y2) in pixels; padded inputs come with a boolean `valid`.
Pure jax.numpy (nothing else from clip_jax), so any layer may use it; every function jits and
vmaps. The rules for degenerate input (zero-area, inverted, padding) are in docs/detection.md.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's RoI heads (the RPN uses 1, 1, 1, 1)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_boxes(name: str, boxes, rank: int | None = None):
    """boxes as a jax array, after checking its shape."""
    shape = jnp.shape(boxes)
    if not shape or shape[-1] != 4:
        raise ValueError(f"{name} must be [..., 4] boxes (x1, y1, x2, y2), got shape {shape}: "
                         "stack the four coordinates on the last axis")
    if rank is not None and len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank} ([N, 4]), got shape {shape}: "
                         "vmap over any batch axis instead")
    return jnp.asarray(boxes)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum} (a static size), got {value!r}")
    return int(value)


def _check_threshold(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a Python float in [0, 1], got {value!r}")
    return float(value)


def _safe_divide(numerator, denominator):
    """numerator / denominator where denominator > 0, else 0 (the rule for 0/0 and empty boxes)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


# -- areas, IoU, conversions ------------------------------------------------------------------


def box_area(boxes):
    """(x2 - x1) * (y2 - y1), as torchvision: not clamped, so an inverted box's area may be negative."""
    boxes = _check_boxes("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _inter_union(a, b):
    area_a, area_b = box_area(a), box_area(b)
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area_a[..., :, None] + area_b[..., None, :] - inter


def box_iou(a, b):
    """[..., N, 4] x [..., M, 4] -> [..., N, M] IoU, torchvision's formula; where the union is not
    positive (two empty boxes: torchvision's 0/0 = nan) the IoU is 0."""
    a = _check_boxes("a", a)
    b = _check_boxes("b", b)
    inter, union = _inter_union(a, b)
    return _safe_divide(inter, union)


def generalized_box_iou(a, b):
    """[..., N, 4] x [..., M, 4] -> [..., N, M] GIoU (IoU - (enclosing - union) / enclosing),
    torchvision's formula; each division by a non-positive denominator gives 0 (torchvision: nan or
    -inf), so two empty boxes apart score -1 and boxes whose enclosing box is empty score 0."""
    a = _check_boxes("a", a)
    b = _check_boxes("b", b)
    inter, union = _inter_union(a, b)
    iou = _safe_divide(inter, union)
    lt = jnp.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - _safe_divide(enclosing - union, enclosing)


def box_convert(boxes, in_fmt: str, out_fmt: str):
    """Between 'xyxy', 'xywh' (COCO's bbox) and 'cxcywh', as torchvision.ops.box_convert."""
    formats = ("xyxy", "xywh", "cxcywh")
    if in_fmt not in formats or out_fmt not in formats:
        raise ValueError(f"box formats are {formats}, got in_fmt={in_fmt!r}, out_fmt={out_fmt!r}")
    boxes = _check_boxes("boxes", boxes)
    a, b, c, d = (boxes[..., i] for i in range(4))
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    if out_fmt == "xywh":
        a, b, c, d = a, b, c - a, d - b
    elif out_fmt == "cxcywh":
        a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
    return jnp.stack([a, b, c, d], axis=-1)


def clip_boxes(boxes, height, width):
    """Coordinates clamped into the image, x to [0, width] and y to [0, height]
    (torchvision.ops.clip_boxes_to_image); an inverted box stays inverted."""
    boxes = _check_boxes("boxes", boxes)
    x = jnp.clip(boxes[..., 0::2], 0, width)
    y = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def remove_small_boxes(boxes, min_size: float, valid=None):
    """A mask of the boxes torchvision.ops.remove_small_boxes keeps (width and height >= min_size),
    and `valid`; with min_size > 0 zero-area and inverted boxes are dropped."""
    boxes = _check_boxes("boxes", boxes)
    keep = ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)
    return keep if valid is None else keep & valid


# -- the box coder ----------------------------------------------------------------------------


def _sizes_centres(boxes):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return w, h, boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h


def encode_boxes(boxes, anchors, weights: Sequence[float] = BOX_CODER_WEIGHTS):
    """The regression targets of `boxes` relative to `anchors` (both [..., 4], broadcast), as
    torchvision's BoxCoder.encode_single(boxes, anchors): (dx, dy, dw, dh) with the weights.
    Where a box or its anchor has a width or height <= 0 (padding, degenerate boxes: torchvision
    gives inf or nan) all four deltas are 0, so a masked loss stays finite."""
    boxes = _check_boxes("boxes", boxes)
    anchors = _check_boxes("anchors", anchors)
    wx, wy, ww, wh = (jnp.float32(w) for w in _check_weights(weights))
    ew, eh, ex, ey = _sizes_centres(anchors)
    gw, gh, gx, gy = _sizes_centres(boxes)
    ok = (ew > 0) & (eh > 0) & (gw > 0) & (gh > 0)
    one = jnp.ones((), ew.dtype)
    ew, eh, gw, gh = (jnp.where(ok, v, one) for v in (ew, eh, gw, gh))
    deltas = jnp.stack([wx * (gx - ex) / ew, wy * (gy - ey) / eh,
                        ww * jnp.log(gw / ew), wh * jnp.log(gh / eh)], axis=-1)
    return jnp.where(ok[..., None], deltas, 0)


def decode_boxes(deltas, anchors, weights: Sequence[float] = BOX_CODER_WEIGHTS, clip: float = BBOX_XFORM_CLIP):
    """Boxes from `deltas` relative to `anchors` ([..., 4], broadcast: [R, K, 4] deltas per class
    with [R, 1, 4] anchors), as torchvision's BoxCoder.decode_single: dw and dh clamped above at
    `clip` before the exp. Not clipped to the image (clip_boxes does that)."""
    deltas = _check_boxes("deltas", deltas)
    anchors = _check_boxes("anchors", anchors)
    wx, wy, ww, wh = _check_weights(weights)
    anchors = anchors.astype(deltas.dtype)
    w, h, cx, cy = _sizes_centres(anchors)
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clip)
    dh = jnp.minimum(deltas[..., 3] / wh, clip)
    px, py = dx * w + cx, dy * h + cy
    half_w, half_h = 0.5 * (jnp.exp(dw) * w), 0.5 * (jnp.exp(dh) * h)
    return jnp.stack([px - half_w, py - half_h, px + half_w, py + half_h], axis=-1)


def _check_weights(weights) -> tuple:
    if len(weights) != 4 or any(not isinstance(w, numbers.Real) or w <= 0 for w in weights):
        raise ValueError(f"weights must be 4 positive numbers (wx, wy, ww, wh), got {weights!r}")
    return tuple(float(w) for w in weights)


# -- anchors ----------------------------------------------------------------------------------


def _pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def anchors(feature_sizes, strides, sizes, aspect_ratios):
    """The anchor grid of torchvision's AnchorGenerator for one image, levels concatenated:
    [sum over levels of H * W * len(sizes[l]) * len(aspect_ratios[l]), 4] float32.

    feature_sizes: per level (H, W); strides: per level an int or (stride_h, stride_w) (the
    generator's image_size // feature size); sizes: per level a sequence of anchor sizes;
    aspect_ratios: per level a sequence of height/width ratios, or one sequence for all levels.
    Order as torchvision: level, then row y, column x, then ratio, then size; the cell anchors
    are rounded half to even. Computed in numpy (static), so it costs nothing under jit."""
    levels = len(feature_sizes)
    if not levels or len(strides) != levels or len(sizes) != levels:
        raise ValueError("feature_sizes, strides and sizes need one entry per pyramid level, got "
                         f"{len(feature_sizes)}, {len(strides)} and {len(sizes)}")
    if aspect_ratios and isinstance(aspect_ratios[0], numbers.Real):
        aspect_ratios = [aspect_ratios] * levels
    if len(aspect_ratios) != levels:
        raise ValueError(f"aspect_ratios needs one sequence per level ({levels}) or one for all, "
                         f"got {len(aspect_ratios)}")
    out = []
    for size, stride, scales, ratios in zip(feature_sizes, strides, sizes, aspect_ratios):
        (gh, gw), (sh, sw) = _pair("a feature size", size), _pair("a stride", stride)
        scales = np.asarray(scales, np.float32).reshape(-1)
        ratios = np.asarray(ratios, np.float32).reshape(-1)
        if not scales.size or not ratios.size or (scales <= 0).any() or (ratios <= 0).any():
            raise ValueError(f"each level needs positive sizes and aspect ratios, got {scales} and {ratios}")
        h_ratios = np.sqrt(ratios)
        w_ratios = np.float32(1) / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        cell = np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))
        shift_y, shift_x = np.meshgrid(np.arange(gh) * sh, np.arange(gw) * sw, indexing="ij")
        shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4).astype(np.float32)
        out.append((shifts + cell[None]).reshape(-1, 4))
    return jnp.asarray(np.concatenate(out).astype(np.float32))


# -- RoIAlign ---------------------------------------------------------------------------------


def _axis_samples(start, bin_size, grid, grid_max: int, bins: int, extent: int):
    """Bilinear corners and weights along one axis: [R, bins * grid_max] (low, high, w_low, w_high),
    zero weights for the samples outside the map and past a box's adaptive grid."""
    b = jnp.arange(bins, dtype=start.dtype)[None, :, None]
    i = jnp.arange(grid_max)[None, None, :]
    pos = (start[:, None, None] + b * bin_size[:, None, None]
           + (i + 0.5).astype(start.dtype) * bin_size[:, None, None]
           / jnp.maximum(grid, 1)[:, None, None].astype(start.dtype))
    inside = (pos >= -1.0) & (pos <= extent) & (i < grid[:, None, None])
    pos = jnp.maximum(pos, 0)
    low = pos.astype(jnp.int32)  # truncation, as the kernel's (int) cast
    at_edge = low >= extent - 1
    low = jnp.where(at_edge, extent - 1, low)
    high = jnp.where(at_edge, extent - 1, low + 1)
    pos = jnp.where(at_edge, low.astype(pos.dtype), pos)
    frac = pos - low
    w_low = jnp.where(inside, 1.0 - frac, 0)
    w_high = jnp.where(inside, frac, 0)
    r = start.shape[0]
    return tuple(v.reshape(r, bins * grid_max) for v in (low, high, w_low, w_high))


def _axis_matrix(low, high, w_low, w_high, grid, bins: int, grid_max: int, extent: int):
    """The axis's interpolation as a matrix [R, bins, extent]: each bin's samples' two corner weights, averaged
    over the box's grid (bilinear weights factor by axis, so the 2-d average is the product of two of these)."""
    r = low.shape[0]
    w = (jax.nn.one_hot(low, extent, dtype=w_low.dtype) * w_low[..., None]
         + jax.nn.one_hot(high, extent, dtype=w_low.dtype) * w_high[..., None])
    return w.reshape(r, bins, grid_max, extent).sum(2) / jnp.maximum(grid, 1)[:, None, None].astype(w_low.dtype)


DENSE_MAX_PIXELS = 16 * 16  # impl="auto" pools maps up to this size with matrices instead of gathers


def roi_align(features, boxes, box_batch_index, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = 2, aligned: bool = True, max_sampling: int | None = None, impl: str = "auto"):
    """torchvision.ops.roi_align on NHWC features: [N, H, W, C] x [R, 4] boxes (image pixels,
    scaled by `spatial_scale` to the map) with their image's index [R] -> [R, out_h, out_w, C].

    Each output bin averages sampling_ratio x sampling_ratio bilinear samples (zero outside
    [-1, H] x [-1, W], clamped to the edge inside); `aligned` shifts by half a pixel, and without it
    a box is at least one map pixel wide and high. sampling_ratio=-1 is torchvision's adaptive grid,
    ceil(box size / output size) samples per bin, masked on a static grid of `max_sampling` (default:
    ceil(map size / output size) + 1, enough for any box within the map; larger boxes are sampled
    max_sampling times per bin and then differ from torchvision). An empty aligned box averages no
    sample under the adaptive grid and gives 0, as torchvision. A batch index outside [0, N) is
    clamped (padding rows: mask their output).

    impl: "gather" reads the 4 corners of each sample (work per box independent of the map size, but its
    gradient is a scatter, slow on CPU); "dense" multiplies the map by per-box interpolation matrices [out, H] and
    [out, W] (work grows with the map, gradient a matmul); "auto" takes dense for maps of at most
    DENSE_MAX_PIXELS pixels (small images, coarse levels). Both give the same values."""
    if impl not in ("auto", "gather", "dense"):
        raise ValueError(f"impl={impl!r}: pick 'auto', 'gather' or 'dense'")
    if jnp.ndim(features) != 4:
        raise ValueError(f"features must be [N, H, W, C] (NHWC), got shape {jnp.shape(features)}: "
                         "transpose an NCHW map with features.transpose(0, 2, 3, 1)")
    boxes = _check_boxes("boxes", boxes, rank=2)
    r = jnp.shape(boxes)[0]
    if jnp.shape(box_batch_index) != (r,):
        raise ValueError(f"box_batch_index must be [R] = [{r}] (each box's image), got {jnp.shape(box_batch_index)}")
    out_h, out_w = _pair("output_size", output_size)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, numbers.Integral) or sampling_ratio == 0 \
            or sampling_ratio < -1:
        raise ValueError(f"sampling_ratio must be a positive int, or -1 for the adaptive grid, got {sampling_ratio!r}")
    features, box_batch_index = jnp.asarray(features), jnp.asarray(box_batch_index)
    n, height, width, channels = jnp.shape(features)
    dtype = features.dtype
    boxes = boxes.astype(dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * spatial_scale - offset for i in range(4))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    if sampling_ratio > 0:
        grid_max_h = grid_max_w = int(sampling_ratio)
        grid_h = grid_w = jnp.full((r,), sampling_ratio, jnp.int32)
    else:
        if max_sampling is None:
            grid_max_h = math.ceil(height / out_h) + 1
            grid_max_w = math.ceil(width / out_w) + 1
        else:
            grid_max_h = grid_max_w = _check_int("max_sampling", max_sampling, 1)
        grid_h = jnp.clip(jnp.ceil(roi_h / out_h), 0, grid_max_h).astype(jnp.int32)
        grid_w = jnp.clip(jnp.ceil(roi_w / out_w), 0, grid_max_w).astype(jnp.int32)
    count = jnp.maximum(grid_h * grid_w, 1).astype(dtype)
    y = _axis_samples(y1, bin_h, grid_h, grid_max_h, out_h, height)
    x = _axis_samples(x1, bin_w, grid_w, grid_max_w, out_w, width)
    if impl == "dense" or (impl == "auto" and height * width <= DENSE_MAX_PIXELS):
        wy = _axis_matrix(*y, grid_h, out_h, grid_max_h, height)
        wx = _axis_matrix(*x, grid_w, out_w, grid_max_w, width)
        if n == 1:  # one image (a detector vmaps over its batch): no gather of whole maps
            rows = jnp.einsum("ryh,hwc->rywc", wy, features[0])
        else:
            index = jnp.clip(box_batch_index.astype(jnp.int32), 0, n - 1)
            rows = jnp.einsum("ryh,rhwc->rywc", wy, features[index])
        return jnp.einsum("rxw,rywc->ryxc", wx, rows)
    y_lo, y_hi, wy_lo, wy_hi = (v.reshape(r, out_h, grid_max_h)[:, :, :, None, None] for v in y)
    x_lo, x_hi, wx_lo, wx_hi = (v.reshape(r, out_w, grid_max_w)[:, None, :, :, None] for v in x)
    flat = features.reshape(n * height * width, channels)
    base = jnp.clip(box_batch_index.astype(jnp.int32), 0, n - 1)[:, None, None] * (height * width)

    def sample(iy, ix):
        """[R, out_h, out_w, C]: sample (iy, ix) of every bin, as the kernel's w1 v1 + ... + w4 v4. One
        sample at a time, so XLA fuses the four gathers into the sum instead of storing them."""
        ys = [jax.lax.dynamic_index_in_dim(v, iy, 2, keepdims=False) for v in (y_lo, y_hi, wy_lo, wy_hi)]
        xs = [v[:, :, :, ix] for v in (x_lo, x_hi, wx_lo, wx_hi)]

        def corner(row, col):
            return flat[(base[..., None] + row * width + col)[..., 0]]

        return (ys[2] * xs[2] * corner(ys[0], xs[0]) + ys[2] * xs[3] * corner(ys[0], xs[1])
                + ys[3] * xs[2] * corner(ys[1], xs[0]) + ys[3] * xs[3] * corner(ys[1], xs[1]))

    def row(iy, value):
        for ix in range(grid_max_w):
            value = value + sample(iy, ix)
        return value

    value = jnp.zeros((r, out_h, out_w, channels), dtype)
    if grid_max_h * grid_max_w <= 16:  # unrolled: the whole sum one fusion
        for iy in range(grid_max_h):
            value = row(iy, value)
    else:  # the adaptive grid's many samples: a loop over the sample rows keeps the program small
        value = jax.lax.fori_loop(0, grid_max_h, row, value)
    return value / count[:, None, None, None]


# -- NMS and proposals -----------------------------------------------------------------------


def batched_nms(boxes, scores, classes, valid, iou_threshold: float, max_outputs: int):
    """Greedy NMS within each class, static in its array sizes: -> (indices [max_outputs] int32 into the
    inputs, -1 past the kept ones; their valid mask). The kept set and its order (score
    descending) equal torchvision.ops.batched_nms's first max_outputs: a box is dropped where its
    IoU with a kept, higher-scoring box of its class is > iou_threshold. Ties in score keep the
    lower index first; boxes with valid=False are never kept nor suppress; an empty box overlaps
    nothing. A lax.while_loop runs once per kept box (at most max_outputs times)."""
    boxes = _check_boxes("boxes", boxes, rank=2)
    n = jnp.shape(boxes)[0]
    for name, value in (("scores", scores), ("classes", classes), ("valid", valid)):
        if jnp.shape(value) != (n,):
            raise ValueError(f"{name} must be [N] = [{n}] (one per box), got shape {jnp.shape(value)}")
    threshold = _check_threshold("iou_threshold", iou_threshold)
    max_outputs = _check_int("max_outputs", max_outputs, 1)
    scores, classes, valid = jnp.asarray(scores), jnp.asarray(classes), jnp.asarray(valid, bool)
    # best first: valid before padding, then score descending, then index
    order = jnp.lexsort((jnp.arange(n), -scores, ~valid))
    boxes, classes, alive = boxes[order], classes[order], valid[order]
    areas = box_area(boxes)

    def cond(carry):
        count, alive, _ = carry
        return (count < max_outputs) & alive.any()

    def body(carry):
        count, alive, kept = carry
        i = jnp.argmax(alive)  # the best box still in play
        lt = jnp.maximum(boxes[i, :2], boxes[:, :2])
        rb = jnp.minimum(boxes[i, 2:], boxes[:, 2:])
        wh = jnp.maximum(rb - lt, 0)
        inter = wh[:, 0] * wh[:, 1]
        iou = _safe_divide(inter, areas[i] + areas - inter)
        alive = alive & ~((iou > threshold) & (classes == classes[i]))
        alive = alive.at[i].set(False)
        return count + 1, alive, kept.at[count].set(order[i].astype(jnp.int32))

    kept = jnp.full((max_outputs,), -1, jnp.int32)
    count, _, kept = jax.lax.while_loop(cond, body, (jnp.int32(0), alive, kept))
    return kept, jnp.arange(max_outputs) < count


def select_proposals(boxes, scores, valid, pre_nms_top_k: int, iou_threshold: float, post_nms_top_k: int):
    """One image's proposals: the pre_nms_top_k best-scoring valid boxes, then class-agnostic NMS,
    keeping post_nms_top_k -> (boxes [post, 4], scores [post], valid [post], indices [post] into
    the inputs, -1 for padding), score descending; padded rows hold zeros. vmap over a batch."""
    boxes = _check_boxes("boxes", boxes, rank=2)
    n = jnp.shape(boxes)[0]
    pre = min(_check_int("pre_nms_top_k", pre_nms_top_k, 1), n)
    post = _check_int("post_nms_top_k", post_nms_top_k, 1)
    if jnp.shape(scores) != (n,) or jnp.shape(valid) != (n,):
        raise ValueError(f"scores and valid must be [N] = [{n}], got {jnp.shape(scores)} and {jnp.shape(valid)}")
    scores, valid = jnp.asarray(scores), jnp.asarray(valid, bool)
    top = jnp.lexsort((jnp.arange(n), -scores, ~valid))[:pre]
    keep, ok = batched_nms(boxes[top], scores[top], jnp.zeros((pre,), jnp.int32), valid[top], iou_threshold, post)
    index = jnp.where(ok, top[jnp.maximum(keep, 0)], -1)
    safe = jnp.maximum(index, 0)
    return (jnp.where(ok[:, None], boxes[safe], 0), jnp.where(ok, scores[safe], 0), ok, index)
