"""COCO-format detection annotations (COCO or LVIS instances JSON + image folder) -> TFRecords.

    python -m clip_jax.input.convert_detection --annotations=instances_val2017.json --images=DIR --out=PREFIX
        [--shards=N]

Writes PREFIX-NNNNN-of-NNNNN.tfrecord and PREFIX.classes.json. Each record holds ``image`` (the file's
bytes as they are), ``key`` (the image id as text), ``image/id``, and per object, in the JSON's order:
``objects/bbox`` [ymin, xmin, ymax, xmax] in [0, 1] of the image (COCO's [x, y, width, height] in pixels
divided by the image's size: the convention of shapes records and tfds ``coco``), ``objects/label`` (the
class's contiguous index: categories sorted by id, 0-based) and ``objects/is_crowd`` (COCO's ``iscrowd``:
crowd boxes are kept and flagged; the training op drops them where it reads the flag). LVIS (no
``file_name``: the image is the last part of its ``coco_url``) also gets ``lvis/not_exhaustive`` and
``lvis/neg``, its ``not_exhaustive_category_ids`` and ``neg_category_ids`` as contiguous indices.
Images without annotations are written with no objects. The classes JSON is a list of {``index``,
``id``, ``name``} (LVIS adds ``frequency``). A missing image, an image whose size differs from the
JSON's, or an annotation of an unknown category stops the conversion with an error naming it; boxes
are written as the JSON has them (the op's rules drop the bad ones and count them).

Read the output as ``tfrecord:PREFIX-*.tfrecord`` with the batch key
``BatchInput("boxes", "boxes", ("objects/bbox", "objects/label", "objects/is_crowd"),
(("labels", "record"), ("num_classes", C)))`` (clip_jax.input.detection), C = the classes JSON's length.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
from typing import Optional, Sequence

from PIL import Image

from clip_jax.input import records


def categories(data: dict) -> list:
    """The classes, sorted by category id: [{index, id, name[, frequency]}]."""
    out = []
    for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"])):
        entry = {"index": i, "id": int(c["id"]), "name": c["name"]}
        if "frequency" in c:  # LVIS: r(are), c(ommon), f(requent)
            entry["frequency"] = c["frequency"]
        out.append(entry)
    return out


def file_name(image: dict) -> str:
    """The image's file in the folder: COCO's file_name, or the last part of LVIS's coco_url."""
    if image.get("file_name"):
        return image["file_name"]
    if image.get("coco_url"):
        return image["coco_url"].rstrip("/").rsplit("/", 1)[-1]
    raise ValueError(f"image id {image.get('id')!r} has neither file_name nor coco_url: the JSON is not COCO or LVIS "
                     "instances")


def serialize(image_bytes: bytes, image: dict, annotations: list, index: dict) -> bytes:
    """One record of an image and its annotations; `index`: category id -> contiguous index."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    w, h = float(image["width"]), float(image["height"])
    boxes, labels, crowd = [], [], []
    for a in annotations:
        x, y, bw, bh = (float(v) for v in a["bbox"])
        boxes += [y / h, x / w, (y + bh) / h, (x + bw) / w]
        labels.append(index[a["category_id"]])
        crowd.append(int(bool(a.get("iscrowd", 0))))

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    def strs(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {
        records.IMAGE: strs(image_bytes), records.KEY: strs(str(image["id"]).encode()), "image/id": ints([image["id"]]),
        "objects/bbox": tf.train.Feature(float_list=tf.train.FloatList(value=boxes)),
        "objects/label": ints(labels), "objects/is_crowd": ints(crowd),
    }
    for name, field in (("lvis/not_exhaustive", "not_exhaustive_category_ids"), ("lvis/neg", "neg_category_ids")):
        if field in image:
            feature[name] = ints([index[c] for c in image[field] if c in index])
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def convert(annotations: str, images: str, out: str, shards: int = 1) -> list:
    """Writes the shards and the classes JSON; returns the shards' paths."""
    with open(annotations) as f:
        data = json.load(f)
    classes = categories(data)
    index = {c["id"]: c["index"] for c in classes}
    by_image = collections.defaultdict(list)
    for a in data.get("annotations", []):
        if a["category_id"] not in index:
            raise ValueError(f"{annotations}: annotation {a.get('id')!r} names category {a['category_id']!r}, which "
                             "is not in the JSON's categories: fix or drop it")
        by_image[a["image_id"]].append(a)
    found = sorted(data["images"], key=lambda im: im["id"])
    missing = [file_name(im) for im in found if not os.path.exists(os.path.join(images, file_name(im)))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {annotations} are not in {images} (the first: "
                                f"{missing[0]!r}): point --images at the folder that holds them")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with records.ShardWriter(out, shards) as writer:
        for image in found:
            path = os.path.join(images, file_name(image))
            with open(path, "rb") as f:
                image_bytes = f.read()
            size = Image.open(io.BytesIO(image_bytes)).size
            if size != (image["width"], image["height"]):
                raise ValueError(f"{path}: {size[0]}x{size[1]} px, but {annotations} says {image['width']}x"
                                 f"{image['height']}: the boxes are normalized by the JSON's size, so the two must "
                                 "agree (the wrong image, or a resized one)")
            writer.write(serialize(image_bytes, image, by_image.get(image["id"], []), index))
    with open(f"{out}.classes.json", "w") as f:
        json.dump(classes, f, indent=1)
    return writer.paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--annotations", required=True, help="COCO or LVIS instances JSON")
    p.add_argument("--images", required=True, help="the folder of its images")
    p.add_argument("--out", required=True, help="output prefix: PREFIX-NNNNN-of-NNNNN.tfrecord, PREFIX.classes.json")
    p.add_argument("--shards", type=int, default=1)
    args = p.parse_args(argv)
    paths = convert(args.annotations, args.images, args.out, args.shards)
    with open(f"{args.out}.classes.json") as f:
        n = len(json.load(f))
    print(f"wrote {len(paths)} shards and {args.out}.classes.json ({n} classes): read them as "
          f"tfrecord:{args.out}-*.tfrecord with labels='record', num_classes={n}")


if __name__ == "__main__":
    main()
