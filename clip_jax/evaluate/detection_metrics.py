"""COCO's box AP: pycocotools' COCOeval (iouType 'bbox') on ground truth and detections held in memory, in the
JSON forms COCO files have (so the figures equal COCOeval run on the files the detection task writes).

    truth = truth_json(images, boxes, categories)   # COCO's instances dict
    stats = coco_ap(truth, detections, max_detections=100, cat_ids=None)
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Optional, Sequence

import numpy as np

# COCOeval.stats[0:6], in order: AP at IoU .50:.05:.95, at .50, at .75, and by area (small, medium, large)
STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("the detection task scores boxes with pycocotools' COCOeval: pip install pycocotools "
                          "(or clip_jax's 'data' extra)") from e
    return COCO, COCOeval


def xywh(box) -> list:
    """(x1, y1, x2, y2) -> COCO's [x, y, width, height], as Python floats."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def truth_json(images: Sequence[dict], boxes: Sequence[dict], categories: Sequence[dict]) -> dict:
    """COCO's instances dict: `images` [{id, width, height, ...}], `boxes` one {boxes [k, 4] (x1, y1, x2, y2) in
    the image's pixels, labels [k] (index into `categories`), crowd [k] bool} per image, `categories` [{id, name,
    ...}]. Annotation ids count from 1 (COCOeval reads id 0 as 'unmatched'); a crowd box is iscrowd=1; area is the
    box's area."""
    annotations = []
    for image, own in zip(images, boxes):
        for box, label, crowd in zip(own["boxes"], own["labels"], own["crowd"]):
            bbox = xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"],
                                "category_id": categories[int(label)]["id"], "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": int(bool(crowd))})
    return {"images": [dict(i) for i in images], "annotations": annotations,
            "categories": [dict(c) for c in categories]}


def coco_ap(truth: dict, detections: Sequence[dict], max_detections: int = 100,
            cat_ids: Optional[Sequence[int]] = None) -> dict:
    """COCOeval's figures of `detections` (COCO's results list: image_id, category_id, bbox [x, y, w, h], score)
    against `truth` (truth_json), over the categories `cat_ids` (default all): {STATS name: float in [0, 1], None
    where COCOeval has no truth to score (its -1)}, and 'per_class' {category id: {AP, AP50}} (None likewise)."""
    COCO, COCOeval = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = copy.deepcopy(truth)
        gt.createIndex()
        if detections:
            dt = gt.loadRes(copy.deepcopy(list(detections)))  # loadRes adds ids and areas to the dicts it gets
        else:  # loadRes refuses an empty list: no detection scores 0 wherever there is truth
            dt = COCO()
            dt.dataset = {"images": copy.deepcopy(truth["images"]), "categories": copy.deepcopy(truth["categories"]),
                          "annotations": []}
            dt.createIndex()
        run = COCOeval(gt, dt, "bbox")
        run.params.maxDets = [1, 10, int(max_detections)]  # summarize's AP figures read the last one
        if cat_ids is not None:
            run.params.catIds = sorted(int(c) for c in cat_ids)
        run.evaluate()
        run.accumulate()
        run.summarize()
    out = {name: (None if value < 0 else float(value)) for name, value in zip(STATS, run.stats[: len(STATS)])}
    precision = run.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max detections]
    per_class = {}
    for k, cat in enumerate(run.params.catIds):
        every, at50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        per_class[int(cat)] = {"AP": _mean(every), "AP50": _mean(at50)}
    out["per_class"] = per_class
    return out


def _mean(values: np.ndarray) -> Optional[float]:
    """COCOeval's average: over the entries it scored (-1: no truth of that category)."""
    scored = values[values > -1]
    return float(np.mean(scored)) if scored.size else None
