"""ViLD's CLIP-on-crops baseline: a ViLD run's proposals classified by the teacher CLIP directly, no detector head.

    python -m clip_jax.evaluate.crops_baseline --workdir=VILD_RUN --teacher=EXPORT --data=SPLIT \
        [--templates='a photo of a {}.|...'] [--objectness[=both]] [--max_regions=N] [--limit=N] [--out=DIR]

Per test record: the run's proposals and their crop embeddings exactly as `python -m clip_jax.embed regions`
makes them (clip_jax.input.region_embeds.embed_regions: the best max_regions proposals, the teacher's embeddings
of the 1x and 1.5x crops summed and normalized). Each proposal's class probabilities are p = softmax over the C
classes of T * cos(crop embedding, class text embedding) (T = 100; the text embeddings the teacher's, prompt
ensembles of config.vild.templates or --templates), optionally times the proposal's objectness (the RPN's score);
every (proposal, class) pair is a detection scored so, per-class NMS at 0.5 (box_ops.batched_nms), the best 100
per image kept. AP comes from the detection task's own code on the same records (the 'boxes/LABELS' evaluation
feature, read_boxes, truth_json, COCOeval): keys detection/DATASET.SPLIT/{AP, AP50, ..., AP50_base, AP50_novel},
the objectness variant's under DATASET.SPLIT.objectness.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

TEMPERATURE = 100.0
NMS = 0.5
MAX_DETECTIONS = 100
OBJECTNESS_TAG = "objectness"


# -- scoring ---------------------------------------------------------------------------------------
def _detect_fn(temperature: float, nms: float, max_detections: int, objectness: bool):
    import jax
    import jax.numpy as jnp

    from clip_jax.models import box_ops

    def fn(boxes, embeds, scores, valid, class_embeds):
        p = jax.nn.softmax(temperature * jnp.einsum("pe,ce->pc", embeds, class_embeds), -1)
        if objectness:
            p = p * scores[:, None]
        c = class_embeds.shape[0]
        flat = p.reshape(-1)  # pair i: region i // C, class i % C
        region, cls = jnp.arange(flat.shape[0]) // c, jnp.arange(flat.shape[0]) % c
        keep, kept = box_ops.batched_nms(boxes[region], flat, cls, valid[region], nms, max_detections)
        safe = jnp.maximum(keep, 0)
        return {"boxes": jnp.where(kept[:, None], boxes[region[safe]], 0.0), "scores": jnp.where(kept, flat[safe], 0.0),
                "classes": jnp.where(kept, cls[safe], 0).astype(jnp.int32), "valid": kept}

    return jax.jit(fn)


class CropDetector:
    """Regions of one image (boxes [k, 4] in any frame, unit embeddings [k, E], objectness [k]) and the classes'
    unit text embeddings [C, E] -> the 'detect' interface's {boxes [K, 4], scores [K], classes [K], valid [K]}
    (K = max_detections), regions padded to `max_regions` so one compilation serves every image."""

    def __init__(self, class_embeds: np.ndarray, max_regions: int, *, objectness: bool = False,
                 temperature: float = TEMPERATURE, nms: float = NMS, max_detections: int = MAX_DETECTIONS):
        self.class_embeds = np.asarray(class_embeds, np.float32)
        self.max_regions = int(max_regions)
        self._fn = _detect_fn(float(temperature), float(nms), int(max_detections), bool(objectness))

    def __call__(self, boxes, embeds, scores) -> dict:
        k, m = len(boxes), self.max_regions
        if k > m:
            raise ValueError(f"{k} regions but the detector pads to max_regions={m}")
        pad = lambda a, shape: np.concatenate([np.asarray(a, np.float32).reshape((k,) + shape),  # noqa: E731
                                               np.zeros((m - k,) + shape, np.float32)])
        e = self.class_embeds.shape[1]
        out = self._fn(pad(boxes, (4,)), pad(embeds, (e,)), pad(scores, ()), np.arange(m) < k, self.class_embeds)
        return {name: np.asarray(v) for name, v in out.items()}


# -- truth: the detection task's evaluation features of each raw record ---------------------------------
class Truth:
    """A raw record -> (its 'boxes/LABELS' as read_boxes gives it, its (height, width), its key), through the
    same record features (parse and prepare) the detection task's evaluation batches read."""

    def __init__(self, spec: str, labels: str, config=None):
        from clip_jax.input import detection, reader  # noqa: F401  (detection registers the box features)
        from clip_jax.input.features import FEATURES, Reading
        from clip_jax.input.pipeline import parse_spec
        from clip_jax.input.settings import data_settings

        self.config = data_settings(config)
        self.names = (f"boxes/{labels}", "image/size", "key")
        self.features = {n: FEATURES.get(n) for n in self.names}
        self.reading = Reading(parse_spec(spec), self.config)
        self.spec = reader.example_spec(("image",) + self.names, self.reading)

    def __call__(self, raw: bytes):
        from clip_jax.input import reader
        from clip_jax.input.detection import read_boxes

        ex = reader.parse_example(raw, ("image",) + self.names, self.reading, self.spec)
        got = {n: (f.prepare(ex[n], ex["image"], None, self.config) if f.prepare else ex[n])
               for n, f in self.features.items()}
        key = got["key"].numpy()
        return (read_boxes(got[self.names[0]].numpy()), [int(v) for v in got["image/size"].numpy()],
                key.decode() if isinstance(key, bytes) else str(key))


# -- the baseline ----------------------------------------------------------------------------------
def class_setup(run_config, templates: Optional[Sequence[str]] = None):
    """(label set, class names in label order, novel [C] bool, templates) of a ViLD run's config."""
    from clip_jax.input import detection, segmentation
    from clip_jax.methods.vild import class_list

    s = run_config.vild
    labels = s.labels
    own = list(class_list(s))
    if labels == detection.RECORD:
        names, novel = own, set(s.novel)
    else:
        names = segmentation.class_names(labels)[1:]
        if sorted(names) != sorted(own):
            raise ValueError(f"config.vild.classes {own} are not the classes of labels={labels!r} {names}: the "
                             "truth's labels index the label set's list")
        novel = set(detection.novel_classes(labels))
    templates = list(templates or s.templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates {templates}: give one or more, each with a '{{}}' for the class name")
    return labels, list(names), np.asarray([n in novel for n in names], bool), templates


def evaluate_crops(records: Iterable[dict], truth_of: Callable, detectors: dict, num_classes: int,
                   max_detections: int = MAX_DETECTIONS, log=print) -> tuple[dict, list, list, int]:
    """Records from embed_regions ('raw', 'regions/bbox' [k, 4] normalized, 'regions/embeds', 'regions/scores')
    -> ({variant: COCO results list}, images [{id, key, width, height}], truth [read_boxes' dicts], records
    skipped for boxes the detection task's features refuse)."""
    from clip_jax.evaluate.tasks.detection import results
    from clip_jax.input import region_embeds, regions
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    listed = {name: [] for name in detectors}
    images, truth, skipped = [], [], 0
    for rec in records:
        try:
            own, (h, w), key = truth_of(rec["raw"])
        except tf.errors.InvalidArgumentError as e:  # the evaluation reader skips such a record: so does this
            skipped += 1
            log(f"record {rec.get('number')}: skipped, its boxes fail the detection task's reading ({e.message[:200]})")
            continue
        bad = (own["labels"] < 0) | (own["labels"] >= num_classes)
        if bad.any():
            raise ValueError(f"record {key or rec.get('number')!r} holds class index {int(own['labels'][bad][0])}, "
                             f"outside the {num_classes} classes: the run's label set is not the records'")
        row = len(images)
        images.append({"id": row + 1, "key": key or f"{row:06d}", "width": w, "height": h})
        truth.append(own)
        b = np.asarray(rec[regions.BBOX], np.float64).reshape(-1, 4)
        xyxy = b[:, [1, 0, 3, 2]]  # normalized (x1, y1, x2, y2): results() scales a frame of size 1 to (H, W)
        for name, detect in detectors.items():
            out = detect(xyxy, rec[regions.EMBEDS], rec[region_embeds.SCORES])
            found, _, _ = results({k: v[None] for k, v in out.items()}, np.asarray([[h, w]]), 1.0, max_detections,
                                  0.0, num_classes)
            listed[name] += [{**d, "image_id": row + 1} for d in found]
        if len(images) % 100 == 0:
            log(f"scored {len(images)} records")
    return listed, images, truth, skipped


def main(argv=None) -> dict:
    """python -m clip_jax.evaluate.crops_baseline ...: the CLIP-on-crops baseline's AP, as JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clip_jax.evaluate.crops_baseline", description=main.__doc__)
    parser.add_argument("--workdir", required=True, help="the ViLD run whose 'proposals' prediction proposes")
    parser.add_argument("--step", type=int, default=None, help="its checkpoint (default: the latest)")
    parser.add_argument("--teacher", required=True, help="the teacher CLIP (an export, weights or model directory)")
    parser.add_argument("--teacher_model", default=None, help="its model name or config JSON (default: beside it)")
    parser.add_argument("--data", required=True, help="the records: a data spec of TFRecords with boxes (an "
                        "embedded dataset's split, tfrecord:GLOB)")
    parser.add_argument("--templates", default=None,
                        help="'|'-separated class templates (default: the run's config.vild.templates)")
    parser.add_argument("--objectness", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                        help="scores times the RPN's objectness (on), not (off, the default), or both variants")
    parser.add_argument("--max_regions", type=int, default=0,
                        help="proposals per image, best first (default: all the run's test_rpn_post_nms)")
    parser.add_argument("--max_detections", type=int, default=MAX_DETECTIONS)
    parser.add_argument("--limit", type=int, default=0, help="only the first N records (0: all)")
    parser.add_argument("--batch_size", type=int, default=16, help="records per proposal batch")
    parser.add_argument("--crop_batch", type=int, default=64, help="crops per teacher batch")
    parser.add_argument("--out", default=None, help="a directory for metrics.json and each variant's predictions")
    args = parser.parse_args(argv)
    if args.max_regions < 0 or args.max_detections < 1 or args.limit < 0:
        parser.error("--max_regions >= 0 (0: all proposals), --max_detections >= 1 and --limit >= 0")
    templates = [t for t in args.templates.split("|")] if args.templates else None

    import jax

    from clip_jax.evaluate import zero_shot
    from clip_jax.evaluate.detection_metrics import truth_json
    from clip_jax.evaluate.region_models import load_proposal_stage, load_teacher
    from clip_jax.evaluate.tasks.detection import score, write_predictions
    from clip_jax.input import region_embeds
    from clip_jax.input.eval_data import metric_name
    from clip_jax.input.pipeline import parse_spec
    from clip_jax.parallel import sharding

    if jax.process_count() != 1:
        raise ValueError("python -m clip_jax.evaluate.crops_baseline runs as one process")
    mesh = sharding.make_mesh({"data": -1})
    teacher = load_teacher(args.teacher, args.teacher_model, mesh)
    stage = load_proposal_stage(args.workdir, args.step, args.batch_size, mesh, teacher.width, args.teacher)
    run_config = stage.config
    if run_config is None or run_config.method != "vild":
        raise ValueError(f"--workdir={args.workdir!r} is not a ViLD run: the baseline reads its config.vild classes")
    labels, names, novel, templates = class_setup(run_config, templates)
    max_regions = args.max_regions or int(run_config.vild.test_rpn_post_nms)
    class_embeds = zero_shot.classifier_weights(teacher.model, None, [[t.format(n) for t in templates] for n in names],
                                                embed_texts=teacher.encoder.embed_texts)
    variants = {"off": (False,), "on": (True,), "both": (False, True)}[args.objectness]
    detectors = {(OBJECTNESS_TAG if o else ""): CropDetector(class_embeds, max_regions, objectness=o,
                                                              max_detections=args.max_detections) for o in variants}
    _, raw = region_embeds.read_records(args.data, stage.data_config, args.limit)
    records = region_embeds.embed_regions(raw, stage.source, teacher.embed_crops, teacher.image_size,
                                          max_regions=max_regions, batch_size=stage.batch_size,
                                          crop_batch=teacher.encoder.round_batch(args.crop_batch),
                                          embed_dim=teacher.width, config=stage.data_config)
    listed, images, truth, skipped = evaluate_crops(records, Truth(args.data, labels, stage.data_config), detectors,
                                                    len(names), args.max_detections)
    categories = [{"id": k + 1, "name": n, "novel": bool(v)} for k, (n, v) in enumerate(zip(names, novel))]
    gt = truth_json(images, truth, categories)
    base = metric_name(parse_spec(args.data))
    metrics, details = {}, {}
    for tag, detections in listed.items():
        name = f"{base}.{tag}" if tag else base
        figures, scored = score(gt, detections, args.max_detections, novel)
        metrics.update({f"detection/{name}/{k}": v for k, v in figures.items() if v is not None})
        details[name] = {"AP50": {n: scored["per_class"][k + 1]["AP50"] for k, n in enumerate(names)},
                         "detections": len(detections)}
        if args.out:
            write_predictions(os.path.join(args.out, "detection", name), detections, images, categories)
    report = {"metrics": metrics, "details": details,
              "settings": {"workdir": args.workdir, "step": stage.step, "teacher": teacher.what, "data": args.data,
                           "examples": len(images), "skipped": skipped, "classes": names,
                           "novel": [n for n, v in zip(names, novel) if v], "templates": templates,
                           "max_regions": max_regions, "temperature": TEMPERATURE, "nms": NMS,
                           "max_detections": args.max_detections, "objectness": args.objectness}}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
