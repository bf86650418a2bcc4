"""detection=DATA: open-vocabulary object detection of a split's images against prompt-ensembled class
embeddings, scored by COCO's box AP (pycocotools' COCOeval: clip_jax.evaluate.detection_metrics).

Options: labels=shape|color|combo (the boxes' label set, feature 'boxes/LABELS'; default shape) or labels=record
with classes=FILE.json (the record's own class indices 0..C-1, its names in that order: {"classnames",
"templates"} or convert_detection's classes JSON); novel=NAME,NAME (the open-vocabulary protocol's novel classes;
default the label set's, clip_jax.input.detection.novel_classes, or the classes file's "novel"; novel= with no
name: none); max_detections=N (the highest-scoring detections kept per image, COCO's 100, also COCOeval's
maxDets); min_score=X (detections scoring below it are dropped; default 0); predictions=DIR writes
DIR/detection/DATASET.SPLIT/detections.json (COCO's results format: image_id, category_id, bbox [x, y, width,
height] in the record's pixels, score), images.json ([{id, key, width, height}], key the record's), categories.json
([{id, name, novel}]) and picture.png (the first images with their true and predicted boxes).

The detector is the method's prediction 'detect' (clip_jax.methods.base.Prediction):
fn(variables, images [N, S, S, 3] as the towers take them, class_embeds [C, E] unit rows of the foreground classes
in the task's order, novel [C] bool) -> {"boxes": float [N, K, 4] (x1, y1, x2, y2) in pixels of the S x S input,
"scores": float [N, K], "classes": int [N, K] (index into class_embeds), "valid": bool [N, K]}, K the detector's
fixed count. It runs on the whole record image resized to the model's size ('image/whole'); its boxes are clipped
to that input and scaled to each record's own size (x * W / S, y * H / S), where COCOeval scores them against the
record's uncropped boxes ('boxes/LABELS': crowd boxes iscrowd=1, area the box's). A method without 'detect' (CLIP
has none) is refused before anything runs. Metrics: detection/DATASET.SPLIT/{AP, AP50, AP75, AP_small, AP_medium,
AP_large} over every class, {AP, AP50}_base and _novel with COCOeval's categories restricted to those classes
(novel ones only where there are novel classes); a figure COCOeval cannot score (no truth in that class set or
area range) is left out. Details: per-class AP and AP50, box counts."""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from clip_jax.evaluate import detection_metrics
from clip_jax.evaluate.tasks.base import TASKS, Read, Task

LABEL_SETS = ("shape", "color", "combo", "record")
BATCH = 64  # images per detector call (rounded to the mesh)
PICTURE_IMAGES = 8
PICTURE_SCORE = 0.3  # predictions drawn in the picture: at least this score, the best PICTURE_BOXES of an image
PICTURE_BOXES = 5
OUTPUTS = {"boxes": ("floating", 3), "scores": ("floating", 2), "classes": ("integer", 2), "valid": ("bool", 2)}


@TASKS.register("detection")
class Detection(Task):
    options = frozenset({"limit", "labels", "classes", "novel", "max_detections", "min_score", "predictions"})
    predictions = ("detect", "image_embeds", "text_embeds")

    def __init__(self, spec, data_config, log=print):
        super().__init__(spec, data_config, log)
        self.labels = spec.get("labels", "shape")
        if self.labels not in LABEL_SETS:
            raise ValueError(f"{spec}: labels={self.labels!r} is not one of {LABEL_SETS}")
        if self.labels == "record" and not spec.get("classes"):
            raise ValueError(f"{spec}: labels=record reads the record's own class indices (objects/label): pass "
                             "classes=FILE.json naming classes 0..C-1 in index order (convert_detection writes one)")
        if self.labels != "record" and spec.get("classes"):
            raise ValueError(f"{spec}: classes= names the classes of labels=record; labels={self.labels} has its own")
        self.max_detections = _number(spec, "max_detections", "100", int, "an int >= 1 (detections per image)")
        if self.max_detections < 1:
            raise ValueError(f"{spec}: max_detections={self.max_detections} must be >= 1 (detections per image)")
        self.min_score = _number(spec, "min_score", "0", float, "a number (the lowest score kept)")
        self.names, self.prompts, self.novel = None, None, None

    @property
    def box_feature(self) -> str:
        return f"boxes/{self.labels}"  # uncropped, in the record's own pixels (clip_jax.input.detection)

    def reads(self):
        from clip_jax.input.features import FEATURES

        extra = ("key",) if "key" in FEATURES else ()  # names the images in images.json where records carry one
        # image_embeds: a prediction every method offers (the pass needs one); the detector runs in evaluate on
        # the whole image at the model's size
        return {"data": Read(self.spec.data, self.limit, predictions=("image_embeds",),
                             features=("image/whole", self.box_feature, "image/size") + extra)}

    def prepare(self, infos):
        super().prepare(infos)
        if self.labels == "record":
            from clip_jax.input import catalog

            classes = catalog.from_file(self.spec.get("classes"))
            self.names, self.prompts, default = list(classes.names), list(classes.prompts), list(classes.novel)
        else:
            from clip_jax.input import detection, segmentation

            self.names = segmentation.class_names(self.labels)[1:]  # no background: boxes are of objects
            self.prompts, default = segmentation.class_prompts(self.labels), detection.novel_classes(self.labels)
        given = self.spec.get("novel")
        novel = default if given is None else [n.strip() for n in given.split(",") if n.strip()]
        unknown = [n for n in novel if n not in self.names]
        if unknown:
            raise ValueError(f"{self.spec}: novel= names {unknown}, not among the classes {self.names}: name novel "
                             "classes as the class list spells them, comma-separated (novel= alone: none)")
        self.novel = np.asarray([n in novel for n in self.names], bool)

    # -- running -------------------------------------------------------------------------------------
    def detector(self, encoder):
        """The method's 'detect' Prediction; a clear error where the method has none."""
        detect = encoder.predictions.get("detect")
        if detect is None:
            offers = sorted(encoder.predictions)
            raise ValueError(f"{self.spec}: the method offers no detector (its predictions {offers} have no "
                             "'detect'; two-tower CLIP has none): evaluate a detection method's run (ViLD) or drop "
                             "this spec")
        return detect

    def class_embeds(self, encoder) -> np.ndarray:
        """Unit rows [C, E] of the classes: the method's own templates where its detector names them, else the
        dataset's prompt ensembles."""
        from clip_jax.evaluate import zero_shot

        own = getattr(self.detector(encoder), "templates", None)
        prompts = [[t.format(n) for t in own] for n in self.names] if own else self.prompts
        return zero_shot.classifier_weights(encoder.model, None, prompts, embed_texts=encoder.embed_texts)

    def evaluate(self, features, encoder):
        from clip_jax.input.detection import read_boxes

        info, feats = self.infos["data"], features["data"]
        detect = self.detector(encoder)
        images, sizes = feats["image/whole"], np.asarray(feats["image/size"]).reshape(-1, 2)
        keys = [_text(k) for k in feats["key"]] if "key" in feats else [f"{i:06d}" for i in range(len(images))]
        truth = [read_boxes(b) for b in feats[self.box_feature]]
        if not len(truth) == len(images) == len(sizes):
            raise ValueError(f"{self.spec}: {len(truth)} box lists and {len(sizes)} image sizes for {len(images)} "
                             "images")
        for row, own in enumerate(truth):
            bad = (own["labels"] < 0) | (own["labels"] >= len(self.names))
            if bad.any():
                raise ValueError(f"{self.spec}: the boxes of example {keys[row]!r} hold class index "
                                 f"{int(own['labels'][bad][0])}, outside the {len(self.names)} classes {self.names}: "
                                 "pick the label set (labels=) or the classes file (classes=) the records were made "
                                 "with")
        size = encoder.model.config.vision.image_size
        run = DetectorRun(encoder, detect.fn, size, str(self.spec))
        own = getattr(detect, "class_inputs", None)  # a detector that reads its classes its own way (GLIP: a prompt)
        classes = dict(own(self.names)) if own else self.class_embeds(encoder)
        prompt = classes.pop("prompt", None) if own else None
        out = run(images, classes, self.novel)
        detections, kept, dropped = results(out, sizes, size, self.max_detections, self.min_score, len(self.names),
                                            str(self.spec))
        image_list = [{"id": row + 1, "key": keys[row], "width": int(w), "height": int(h)}
                      for row, (h, w) in enumerate(sizes)]
        categories = [{"id": k + 1, "name": n, "novel": bool(v)} for k, (n, v) in enumerate(zip(self.names,
                                                                                                  self.novel))]
        truth_json = detection_metrics.truth_json(image_list, truth, categories)
        figures, scored = score(truth_json, detections, self.max_detections, self.novel)
        name = self.named(info.name)
        metrics = {f"detection/{name}/{k}": v for k, v in figures.items() if v is not None}
        labels = np.concatenate([t["labels"][~t["crowd"]] for t in truth]) if truth else np.zeros(0, int)
        per_class = scored["per_class"]
        details = {"examples": len(images), "classes": self.names,
                   "novel": [n for n, v in zip(self.names, self.novel) if v], "figures": figures,
                   "AP": {n: per_class[k + 1]["AP"] for k, n in enumerate(self.names)},
                   "AP50": {n: per_class[k + 1]["AP50"] for k, n in enumerate(self.names)},
                   "truth_boxes": {n: int((labels == k).sum()) for k, n in enumerate(self.names)},
                   "crowd_boxes": int(sum(int(t["crowd"].sum()) for t in truth)), "detections": len(detections),
                   "dropped": dropped, "max_detections": self.max_detections, "min_score": self.min_score,
                   **({"prompt": prompt} if prompt is not None else {})}
        if dropped:
            self.log(f"  {self.spec}: {dropped} valid detections with a non-finite or empty box or score dropped")
        if self.spec.get("predictions"):
            import jax

            if jax.process_index() == 0:
                directory = os.path.join(self.spec.get("predictions"), "detection", name)
                write_predictions(directory, detections, image_list, categories)
                picture(os.path.join(directory, "picture.png"), images[:PICTURE_IMAGES], truth[:PICTURE_IMAGES],
                        kept[:PICTURE_IMAGES], sizes[:PICTURE_IMAGES], self.names, self.novel, prompt=prompt)
                details["predictions"] = directory
        return metrics, details


def score(truth_json: dict, detections: list, max_detections: int, novel: np.ndarray) -> tuple[dict, dict]:
    """(the task's figures: STATS over every class, {AP, AP50}_base and _novel; COCOeval's scoring over every class,
    with 'per_class') of `detections` against `truth_json`, categories 1..C with novel [C] bool."""
    scored = detection_metrics.coco_ap(truth_json, detections, max_detections)
    figures = {k: scored[k] for k in detection_metrics.STATS}
    novel = np.asarray(novel, bool)
    ids = np.arange(1, len(novel) + 1)
    if novel.any():
        for part, which in (("base", ~novel), ("novel", novel)):
            if which.any():
                split = detection_metrics.coco_ap(truth_json, detections, max_detections, ids[which])
                figures.update({f"AP_{part}": split["AP"], f"AP50_{part}": split["AP50"]})
    else:  # every class is a base class
        figures.update({"AP_base": scored["AP"], "AP50_base": scored["AP50"]})
    return figures, scored


def _number(spec, key: str, default: str, kind, what: str):
    try:
        return kind(spec.get(key, default))
    except ValueError:
        raise ValueError(f"{spec}: {key}={spec.get(key)!r} is not {what}") from None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DetectorRun:
    """A detector over host images: rows split over the encoder's mesh, outputs gathered on every process; its
    output structure is checked (jax.eval_shape) before anything compiles."""

    def __init__(self, encoder, detect: Callable, size: int, what: str = "detection"):
        import jax

        from clip_jax.parallel import distributed
        from clip_jax.preprocessing import model_images

        self.encoder, self.detect, self.size, self.what = encoder, detect, size, what
        self.replicated = jax.sharding.NamedSharding(encoder.mesh, jax.sharding.PartitionSpec())
        self._fn = lambda variables, images, class_embeds, novel: detect(variables, model_images(images),
                                                                         class_embeds, novel)
        self._step = distributed.compile_together(jax.jit(self._fn, out_shardings=encoder.sharding), "detect_task")

    def check(self, shape, dtype, class_embeds, novel: np.ndarray) -> None:
        """An error naming what the detector returns where it is not the 'detect' interface's dict for `shape`."""
        import jax
        import jax.numpy as jnp

        spec = lambda s, d: jax.ShapeDtypeStruct(s, d)  # noqa: E731
        out = jax.eval_shape(self._fn, self.encoder.variables, spec(shape, dtype),
                             jax.tree.map(lambda a: spec(a.shape, a.dtype), class_embeds), spec(novel.shape, np.bool_))
        n = shape[0]
        problem = None
        if not isinstance(out, dict) or set(out) != set(OUTPUTS):
            problem = f"{type(out).__name__} {sorted(out) if isinstance(out, dict) else ''}"
        else:
            k = out["scores"].shape[1] if out["scores"].ndim == 2 else None
            for name, (kind, _) in OUTPUTS.items():
                want = (n, k, 4) if name == "boxes" else (n, k)
                got = out[name]
                if k is None or got.shape != want or not jnp.issubdtype(got.dtype, getattr(jnp, kind)):
                    problem = f"{name!r} {got.dtype} {list(got.shape)}"
                    break
        if problem:
            raise ValueError(f"{self.what}: the method's 'detect' returned {problem} for {n} images; it must return "
                             "{'boxes': float [N, K, 4], 'scores': float [N, K], 'classes': int [N, K], 'valid': "
                             "bool [N, K]} (clip_jax.evaluate.tasks.detection): fix the method's detector")

    def __call__(self, images: np.ndarray, class_embeds, novel: np.ndarray) -> dict:
        """{boxes [n, K, 4], scores, classes, valid [n, K]} of every row, as numpy on every process. class_embeds:
        unit rows [C, E], or the detector's own class inputs (Prediction.class_inputs: a tree of arrays)."""
        import jax

        from clip_jax.evaluate.features import host_copy

        encoder = self.encoder
        batch = encoder.round_batch(min(BATCH, max(len(images), 1)))
        if isinstance(class_embeds, dict):
            class_embeds = jax.tree.map(np.asarray, class_embeds)
        else:
            class_embeds = np.asarray(class_embeds, np.float32)
        novel = np.asarray(novel, bool)
        self.check((batch,) + images.shape[1:], images.dtype, class_embeds, novel)
        embeds = jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, self.replicated, lambda idx: a[idx]),
                              class_embeds)
        flags = jax.make_array_from_callback(novel.shape, self.replicated, lambda idx: novel[idx])
        parts = []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            n = len(chunk)
            if n < batch:  # padding rows: their detections are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)])
            array = jax.make_array_from_callback(chunk.shape, encoder.sharding, lambda idx, a=chunk: a[idx])
            out = host_copy(self._step(encoder.variables, array, embeds, flags))
            parts.append({k: np.asarray(v)[:n] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}


def results(out: dict, sizes: np.ndarray, size: int, max_detections: int, min_score: float, num_classes: int,
            what: str = "detection"):
    """(COCO's results list with image_id = row + 1 and category_id = class + 1, boxes in each record's pixels;
    per row the kept detections {boxes, classes, scores}; the count of valid detections dropped for a non-finite
    box or score or an empty box). Boxes are clipped to the S x S input, then scaled to the record's (H, W);
    per image the `max_detections` best scores at least `min_score` are kept (ties: the detector's order)."""
    listed, kept, dropped = [], [], 0
    for row, (height, width) in enumerate(np.asarray(sizes)):
        valid = np.asarray(out["valid"][row], bool)
        classes = np.asarray(out["classes"][row]).astype(np.int64)
        bad = valid & ((classes < 0) | (classes >= num_classes))
        if bad.any():
            raise ValueError(f"{what}: the detector gave row {row} class {int(classes[bad][0])}, outside the "
                             f"{num_classes} classes it was given: its classes must index class_embeds")
        scores = np.asarray(out["scores"][row], np.float64)
        boxes = np.asarray(out["boxes"][row], np.float64)
        finite = np.isfinite(boxes).all(-1) & np.isfinite(scores)
        boxes = np.clip(np.where(finite[:, None], boxes, 0.0), 0.0, size)
        boxes = boxes * np.asarray([width, height, width, height], np.float64) / size
        usable = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        dropped += int((valid & ~usable).sum())
        index = np.flatnonzero(valid & usable & (scores >= min_score))
        index = index[np.argsort(-scores[index], kind="stable")][:max_detections]
        kept.append({"boxes": boxes[index], "classes": classes[index], "scores": scores[index]})
        listed += [{"image_id": row + 1, "category_id": int(classes[i]) + 1,
                    "bbox": detection_metrics.xywh(boxes[i]), "score": float(scores[i])} for i in index]
    return listed, kept, dropped


# -- predictions and picture --------------------------------------------------------------------------
def write_predictions(directory: str, detections: list, images: list, categories: list) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, value in (("detections", detections), ("images", images), ("categories", categories)):
        with open(os.path.join(directory, f"{name}.json"), "w") as f:
            json.dump(value, f)


def picture(path: str, images: np.ndarray, truth: list, kept: list, sizes: np.ndarray, names, novel,
            scale: int = 3, prompt: str | None = None):
    """Rows of (the image with its true boxes, the image with its best predicted boxes: score >= PICTURE_SCORE,
    at most PICTURE_BOXES) with class names, and a legend of the class colours (novel classes marked), as a PNG.
    `prompt`: the text a detector read its classes from (GLIP), written above the rows, each box labelled with its
    words."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from clip_jax.evaluate.tasks.segmentation import palette, pixels

    colours = [tuple(int(c) for c in rgb) for rgb in palette(len(names) + 1)[1:]]  # no background colour
    size = images.shape[1] if len(images) else 32
    side = min(max(size * scale, 160), 320)
    font = ImageFont.load_default()
    legend = 14 * len(names) + 12
    width = 2 * (side + 6) + 6
    lines = textwrap.wrap(f"prompt: {prompt}", max(width // 6 - 2, 20)) if prompt is not None else []
    top = 18 + 12 * len(lines)
    canvas = Image.new("RGB", (width, top + len(images) * (side + 6) + legend), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(("true", f"predicted (score >= {PICTURE_SCORE})")):
        draw.text((6 + j * (side + 6), 3), title, fill="black", font=font)
    for j, line in enumerate(lines):
        draw.text((6, 15 + 12 * j), line, fill="black", font=font)

    def tile(image, boxes, classes, scores, height, width):
        out = Image.fromarray(pixels(image)).resize((side, side), Image.BILINEAR)
        pen = ImageDraw.Draw(out)
        factor = np.asarray([side / width, side / height, side / width, side / height])
        for box, cls, score in zip(boxes, classes, scores):
            x1, y1, x2, y2 = (float(v) for v in np.asarray(box) * factor)
            colour = colours[int(cls)]
            pen.rectangle((x1, y1, x2, y2), outline=colour, width=2)
            text = names[int(cls)] + ("" if score is None else f" {score:.2f}")
            top = max(y1 - 11, 0)
            pen.rectangle((x1, top, x1 + 6 * len(text) + 2, top + 10), fill=colour)
            pen.text((x1 + 1, top - 1), text, fill="black", font=font)
        return out

    for i in range(len(images)):
        y = top + i * (side + 6)
        height, width = (int(v) for v in sizes[i])
        real = ~truth[i]["crowd"]
        canvas.paste(tile(images[i], truth[i]["boxes"][real], truth[i]["labels"][real],
                          [None] * int(real.sum()), height, width), (6, y))
        best = np.flatnonzero(kept[i]["scores"] >= PICTURE_SCORE)[:PICTURE_BOXES]  # kept is in score order
        canvas.paste(tile(images[i], kept[i]["boxes"][best], kept[i]["classes"][best], kept[i]["scores"][best],
                          height, width), (12 + side, y))
    y = top + len(images) * (side + 6) + 6
    for k, name in enumerate(names):
        draw.rectangle((6, y + 14 * k, 16, y + 14 * k + 10), fill=colours[k])
        draw.text((22, y + 14 * k), name + (" (novel)" if novel[k] else ""), fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


__all__ = ["Detection", "DetectorRun", "results", "score"]
