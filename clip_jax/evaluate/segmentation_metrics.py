"""Semantic-segmentation scores by mmsegmentation's convention (its ``IoUMetric``).

A confusion matrix over the whole split: pixels whose true label is the ignore index (255) are
dropped, every other pixel counts once at (true class, predicted class). Per class, intersection =
the diagonal, union = predicted + true - intersection; IoU = intersection / union, NaN where the
class is absent from both truth and prediction (union 0), so mIoU is the mean over the classes
present in either. Pixel accuracy = the diagonal's sum / all counted pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """confusion[true, predicted] pixel counts (int64) of `num_classes` classes, accumulated batch by batch."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if not 0 < num_classes <= 256:
            raise ValueError(f"num_classes must be in [1, 256] (8-bit class maps), got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, predicted, target, what: str = "") -> "ConfusionMatrix":
        """predicted, target: integer class maps of one shape ([N, H, W] or [H, W]); target's ignore index is
        dropped. A class id outside [0, num_classes) (other than the ignore index) is an error naming it."""
        predicted, target = np.asarray(predicted), np.asarray(target)
        if predicted.shape != target.shape:
            raise ValueError(f"{what or 'segmentation'}: predicted map {predicted.shape} and true map {target.shape} "
                             "differ in shape: resize the prediction to the mask's size (nearest for class maps)")
        keep = target != self.ignore_index
        true, pred = target[keep].astype(np.int64), predicted[keep].astype(np.int64)
        for name, ids in (("true", true), ("predicted", pred)):
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
                bad = ids[(ids < 0) | (ids >= self.num_classes)][0]
                raise ValueError(f"{what or 'segmentation'}: {name} class id {bad} is outside the {self.num_classes} "
                                 f"classes (and is not the ignore index {self.ignore_index}): pass a label set that "
                                 "names every class of the masks")
        self.matrix += np.bincount(true * self.num_classes + pred,
                                   minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        return self

    def allreduce(self) -> "ConfusionMatrix":
        """The sum of every process's matrix, on every process (clip_jax.parallel.distributed.allgather)."""
        import jax

        if jax.process_count() > 1:
            from clip_jax.parallel import distributed

            gathered = distributed.allgather(self.matrix[None])  # [processes, C, C]
            self.matrix = np.asarray(gathered).reshape(-1, self.num_classes, self.num_classes).sum(0)
        return self

    def scores(self, names: Sequence[str] = ()) -> dict:
        """{'miou', 'pixel_acc' (fractions), 'iou': per-class [C] (NaN: absent from truth and prediction),
        'iou_by_name' where names are given}."""
        return scores(self.matrix, names)


def scores(matrix: np.ndarray, names: Sequence[str] = ()) -> dict:
    matrix = np.asarray(matrix, np.float64)
    intersection = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
    total = matrix.sum()
    out = {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
           "pixel_acc": float(intersection.sum() / total) if total else float("nan"), "iou": iou}
    if names:
        if len(names) != len(iou):
            raise ValueError(f"{len(names)} class names for {len(iou)} classes")
        out["iou_by_name"] = dict(zip(names, (float(v) for v in iou)))
    return out
