"""Phrase grounding Recall@k at an IoU threshold, by Flickr30k-Entities' protocol (as MDETR's flickr_eval).

"Any box": a phrase is found at k when one of its k best-scored candidate boxes overlaps any of its true boxes at
IoU >= the threshold. "Merged": the phrase's true boxes are replaced by the one box enclosing them all. A phrase
with no true box cannot be scored: it is left out of every figure and counted.

    ranks = hit_ranks(boxes [Q, K, 4], scores [Q, K], truth [Q arrays [t, 4]])  # first hit's rank, or -1
    figures = recall(ranks, ks=(1, 5, 10), k_max=K)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IOU_THRESHOLD = 0.5
KS = (1, 5, 10)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [n, m] of boxes (x1, y1, x2, y2); an empty or inverted box overlaps nothing (IoU 0), a non-finite one
    gives NaN (no comparison holds)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.where(np.isnan(union), np.nan, 0.0))


def merged(truth: np.ndarray) -> np.ndarray:
    """[1, 4]: the box enclosing every box of [t >= 1, 4]."""
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    return np.concatenate([truth[:, :2].min(0), truth[:, 2:].max(0)])[None]


def order(scores: np.ndarray) -> np.ndarray:
    """Candidates best first: by score, descending (a non-finite score last; ties in the given order)."""
    scores = np.asarray(scores, np.float64)
    return np.argsort(-np.where(np.isfinite(scores), scores, -np.inf), kind="stable")


def hit_ranks(boxes: np.ndarray, scores: np.ndarray, truth: Sequence[np.ndarray],
              threshold: float = IOU_THRESHOLD, merge: bool = False) -> np.ndarray:
    """int64 [Q]: per phrase the 0-based rank (by score) of its first candidate at IoU >= threshold with a true box
    (merge: with the box enclosing them), -1 where none is, -2 where the phrase has no true box."""
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    out = np.full(len(truth), -1, np.int64)
    for q, own in enumerate(truth):
        own = np.asarray(own, np.float64).reshape(-1, 4)
        if not len(own):
            out[q] = -2
            continue
        ranked = boxes[q][order(scores[q])]
        with np.errstate(invalid="ignore"):
            hit = (box_iou(ranked, merged(own) if merge else own) >= threshold).any(1)
        if hit.any():
            out[q] = int(np.argmax(hit))
    return out


def recall(ranks: np.ndarray, k_max: int, ks: Sequence[int] = KS, prefix: str = "R") -> dict:
    """{R1, R5, R10 (k <= k_max only): the share of the scored phrases (rank != -2) found within k}; None where no
    phrase has a true box."""
    ranks = np.asarray(ranks)
    scored = ranks[ranks != -2]
    return {f"{prefix}{k}": (float(np.mean((scored >= 0) & (scored < k))) if len(scored) else None)
            for k in ks if k <= k_max}
