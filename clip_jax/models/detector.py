"""The parts of a two-stage detector (Faster R-CNN with FPN) on a CLIP image tower, static in every shape.

Modules: `SimplePyramid` (a ViT's last patch map resampled to strides 4 to 32, ViTDet's simple feature
pyramid), `FPN` (lateral 1x1 convs, top-down sum, 3x3 outputs, an extra level by stride-2 subsampling
of the coarsest, as Mask R-CNN's P6), `RPNHead` (a shared 3x3 conv, then per anchor an objectness logit
and 4 box deltas) and `BoxHead` (convs then fully connected layers on each region's RoIAlign features).
Functions: the anchors of a pyramid, anchor and region matching with fixed-size random sampling (the
targets, built under jit), multi-level RoIAlign and the smooth L1 loss. Everything vmaps over images and
runs sharded on the batch; the box arithmetic is clip_jax.models.box_ops.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import box_ops

BACKGROUND, IGNORE = 0, -1  # match labels: 0 background, -1 neither (left out of the loss), k >= 1 a class


class SimplePyramid(nn.Module):
    """One map at `stride` -> maps at `strides` (each a power-of-two multiple or fraction of it): transposed
    2x2 convs (stride 2, with a LayerNorm and GELU between two of them) to go finer, max pooling to go coarser,
    each then a 1x1 conv to `width` (ViTDet's simple feature pyramid, its convs without the norms)."""

    stride: int
    strides: Sequence[int] = (4, 8, 16, 32)
    width: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        outs = []
        for level, target in enumerate(self.strides):
            factor = self.stride / target
            y = x
            if factor > 1:
                steps = int(round(math.log2(factor)))
                if 2 ** steps != factor:
                    raise ValueError(f"a pyramid level of stride {target} is not a power-of-two resampling of the "
                                     f"patch stride {self.stride}")
                for i in range(steps):
                    y = nn.ConvTranspose(y.shape[-1] // 2, (2, 2), (2, 2), dtype=self.dtype, name=f"up{level}_{i}")(y)
                    if i + 1 < steps:
                        y = nn.gelu(nn.LayerNorm(dtype=self.dtype, name=f"up{level}_{i}_norm")(y))
            elif factor < 1:
                k = int(round(1 / factor))
                y = nn.max_pool(y, (k, k), (k, k))
            outs.append(nn.Conv(self.width, (1, 1), dtype=self.dtype, name=f"out{level}")(y))
        return outs


class FPN(nn.Module):
    """Feature pyramid (Lin et al. 2017): maps shallow to deep (each half the size of the one before) ->
    `width`-channel maps at the same strides, plus `extra` levels, each the previous one subsampled by 2."""

    width: int = 256
    extra: int = 1
    dtype: jnp.dtype = jnp.float32
    extra_convs: bool = False  # RetinaNet's P6, P7 (ATSS, GLIP): 3x3 stride-2 convs, a ReLU between them

    @nn.compact
    def __call__(self, maps):
        laterals = [nn.Conv(self.width, (1, 1), dtype=self.dtype, name=f"lateral{i}")(m) for i, m in enumerate(maps)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            top = merged[0]
            up = jnp.repeat(jnp.repeat(top, lateral.shape[1] // top.shape[1], 1), lateral.shape[2] // top.shape[2], 2)
            merged.insert(0, lateral + up)
        outs = [nn.Conv(self.width, (3, 3), dtype=self.dtype, name=f"output{i}")(m) for i, m in enumerate(merged)]
        for i in range(self.extra):
            if self.extra_convs:
                x = outs[-1] if i == 0 else nn.relu(outs[-1])
                outs.append(nn.Conv(self.width, (3, 3), (2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                    name=f"extra{i}")(x))
            else:  # Mask R-CNN's P6: max pooling of kernel 1, stride 2
                outs.append(outs[-1][:, ::2, ::2])
        return outs


class RPNHead(nn.Module):
    """Shared over levels: 3x3 conv + ReLU, then per cell and anchor an objectness logit and 4 deltas ->
    (logits [N, A_total], deltas [N, A_total, 4]) in box_ops.anchors' order (level, row, column, anchor)."""

    anchors_per_cell: int
    width: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, maps):
        conv = nn.Conv(self.width, (3, 3), dtype=self.dtype, name="conv")
        score = nn.Conv(self.anchors_per_cell, (1, 1), dtype=self.dtype, name="objectness",
                        kernel_init=nn.initializers.normal(0.01))
        delta = nn.Conv(4 * self.anchors_per_cell, (1, 1), dtype=self.dtype, name="deltas",
                        kernel_init=nn.initializers.normal(0.01))
        logits, deltas = [], []
        for m in maps:
            h = nn.relu(conv(m))
            n = h.shape[0]
            logits.append(score(h).reshape(n, -1))
            deltas.append(delta(h).reshape(n, -1, 4))
        return jnp.concatenate(logits, 1).astype(jnp.float32), jnp.concatenate(deltas, 1).astype(jnp.float32)


class BoxHead(nn.Module):
    """Region features [R, s, s, C] -> [R, fc_dim]: `convs` 3x3 convs + ReLU, flattened, `fcs` dense layers + ReLU
    (ViLD's Fast R-CNN head: 4 convs, 2 fully connected layers of 1024)."""

    convs: int = 4
    conv_dim: int = 256
    fcs: int = 2
    fc_dim: int = 1024
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.convs):
            x = nn.relu(nn.Conv(self.conv_dim, (3, 3), dtype=self.dtype, name=f"conv{i}")(x))
        x = x.reshape(x.shape[0], -1)
        for i in range(self.fcs):
            x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, name=f"fc{i}")(x))
        return x


# -- anchors and targets -----------------------------------------------------------------------------
def level_size(image_size: int, level: int) -> int:
    """The side of pyramid level `level`'s map: the backbone's stage (image_size // 2**level) up to P5; above it
    each level is a stride-2 conv or pool of padding 1 (kernel 3) or 0 (kernel 1) on the one below, so
    ceil(previous / 2): P6 and P7 of a 800 px image are 13 and 7, not 12 and 6."""
    if level <= 5:
        return max(image_size // 2 ** level, 1)
    return -(-level_size(image_size, level - 1) // 2)


def pyramid_anchors(image_size: int, levels: Sequence[int], anchor_scale: float, aspect_ratios: Sequence[float]):
    """[A_total, 4] anchors of pyramid levels `levels` (level l has stride 2**l and one anchor size,
    anchor_scale * 2**l, per aspect ratio), in RPNHead's order."""
    sizes = [(level_size(image_size, level),) * 2 for level in levels]
    return box_ops.anchors(sizes, [2 ** level for level in levels], [(anchor_scale * 2 ** level,) for level in levels],
                           list(aspect_ratios))


def match(candidates, gt, gt_valid, fg_iou: float, bg_iou: float, low_quality: bool = False):
    """Each candidate box [K, 4] against the true boxes [M, 4] -> (index [K] of its best true box, label [K]:
    1 where its IoU >= fg_iou, 0 (background) where < bg_iou, -1 between). low_quality: a true box's best
    candidates (every one tied at its highest IoU > 0) are foreground too (the RPN's rule)."""
    iou = jnp.where(gt_valid[None, :], box_ops.box_iou(candidates, gt), -1.0)
    best, index = iou.max(1), iou.argmax(1)
    label = jnp.where(best >= fg_iou, 1, jnp.where(best < bg_iou, BACKGROUND, IGNORE))
    if low_quality:  # torchvision's Matcher: such a candidate keeps its own best true box as its match
        top = iou.max(0)  # [M]
        tied = (iou == top[None, :]) & (top[None, :] > 0) & gt_valid[None, :]
        label = jnp.where(tied.any(1), 1, label)
    return index, label


def sample(rng, label, num: int, fg_fraction: float):
    """A fixed-size random subset of the candidates: (indices [num] into them, picked [num] bool), at most
    round(num * fg_fraction) foreground (label >= 1), background (label 0) for the rest; -1 labels never.
    Fewer than `num` eligible: the picked mask is False on the rest."""
    k = label.shape[0]
    num = min(num, k)
    fg_max = int(num * fg_fraction)  # torchvision's BalancedPositiveNegativeSampler truncates
    noise = jax.random.uniform(rng, (k,))
    fg, bg = label >= 1, label == BACKGROUND
    # foreground first (random order among them), capped; then background
    fg_rank = jnp.argsort(jnp.where(fg, noise, 2.0))
    fg_count = jnp.minimum(fg.sum(), fg_max)
    bg_rank = jnp.argsort(jnp.where(bg, noise, 2.0))
    slot = jnp.arange(num)
    index = jnp.where(slot < fg_count, fg_rank[jnp.minimum(slot, k - 1)],
                      bg_rank[jnp.clip(slot - fg_count, 0, k - 1)])
    picked = jnp.where(slot < fg_count, True, slot - fg_count < bg.sum())
    return index, picked


# -- region features ---------------------------------------------------------------------------------
def roi_levels(boxes, levels: Sequence[int], canonical_size: float, canonical_level: int):
    """The pyramid level of each box [R, 4] (FPN's rule: floor(canonical_level + log2(sqrt(area) /
    canonical_size) + 1e-6), clamped to the levels: torchvision's LevelMapper)."""
    area = jnp.maximum(box_ops.box_area(boxes), 1e-6)
    level = jnp.floor(canonical_level + jnp.log2(jnp.sqrt(area) / canonical_size) + 1e-6)  # torchvision's eps
    return jnp.clip(level, min(levels), max(levels)).astype(jnp.int32)


def multilevel_roi_align(maps, levels: Sequence[int], boxes, image_index, output_size: int, canonical_size: float,
                         canonical_level: int = 4, sampling_ratio: int = 2, aligned: bool = True):
    """RoIAlign (`sampling_ratio` samples per bin axis; aligned: half-pixel centres, Detectron2's ROIAlignV2) of
    each box [R, 4] (image pixels) on its FPN level -> [R, s, s, C] (torchvision's MultiScaleRoIAlign with
    aligned=False). Every level is pooled for every box and the box's own level selected: static
    shapes, at levels-times the pooling work of a gather by level."""
    which = roi_levels(boxes, levels, canonical_size, canonical_level)
    out = 0.0
    for level, m in zip(levels, maps):
        pooled = box_ops.roi_align(m, boxes, image_index, output_size, spatial_scale=1.0 / 2 ** level,
                                   sampling_ratio=sampling_ratio, aligned=aligned)
        out = out + jnp.where((which == level)[:, None, None, None], pooled, 0.0)
    return out


def smooth_l1(x, beta: float):
    """Elementwise smooth L1 (Huber / beta): 0.5 x^2 / beta below beta, |x| - 0.5 beta above; beta 0 is L1."""
    a = jnp.abs(x)
    if beta <= 0:
        return a
    return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)
