"""Flickr30k-Entities-style phrase grounding annotations -> TFRecords of captions with a phrase span per box.

    python -m clip_jax.input.convert_grounding --sentences=Sentences --annotations=Annotations \
        --images=flickr30k-images --out=DIR [--ids=test.txt] [--name=flickr30k_test] [--shards=N]

Input, per image ID: ``Sentences/ID.txt``, one sentence a line with its phrases marked
``[/EN#ENTITY/TYPE[/TYPE...] words of the phrase]``; ``Annotations/ID.xml`` (PASCAL VOC style), its ``size`` and
per ``object`` one or more ``name`` (entity ids) with a ``bndbox`` (xmin, ymin, xmax, ymax) or ``nobndbox``
(``scene`` 1 for a scene entity); the image ``ID.jpg`` (or .jpeg, .png) in --images. ``--ids`` lists the IDs to
convert, one a line (the dataset's train.txt / val.txt / test.txt); without it every Sentences file.

Output: DIR/NAME-NNNNN-of-NNNNN.tfrecord, one record per sentence (the evaluation protocol scores the phrases of
each sentence), with the features shapes_scenes uses for captions, boxes and phrase spans: ``image`` (the file's
bytes), ``key`` (ID_SENTENCE), ``image/id``, ``caption`` (the sentence's words joined by one space, as the
dataset's own reader gives it), and one row per (phrase, box) pair: ``objects/bbox`` [ymin, xmin, ymax, xmax] in
[0, 1] of the image, ``objects/phrase_span`` [start, end) of the phrase's characters in the caption,
``objects/entity`` the entity id. A phrase with several boxes has several rows of one span. Corners are the
dataset reader's (flickr30k_entities_utils.get_annotations: each VOC coordinate minus 1, as MDETR evaluates),
divided by the image's size. A phrase whose entity has no box (``nobndbox``, scene, the non-visual entity 0, or
no object in the XML) gets no row: it is counted in DIR/NAME.summary.json by reason, with the other counts. A
missing annotation or image, an image whose size differs from the XML's, or a sentence whose markup does not
close stops the conversion with an error naming it.

Read the output as ``tfrecord:DIR/NAME-*.tfrecord`` (``grounding=tfrecord:DIR/NAME-*.tfrecord``; the metric keys
then read grounding/NAME/...).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import xml.etree.ElementTree as ET
from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from clip_jax.input import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NON_VISUAL = "0"  # the entity id Flickr30k Entities gives non-visual phrases


class Phrase(NamedTuple):
    text: str
    entity: str
    types: tuple
    span: tuple  # [start, end) in the sentence


def parse_sentence(line: str, where: str = "sentence") -> tuple[str, list]:
    """(the sentence's words joined by one space, its phrases) of one marked-up line, as the dataset's
    get_sentence_data reads it, with each phrase's character span in that text."""
    words, phrases, pos = [], [], 0
    current: Optional[dict] = None
    for token in line.split():
        if current is None and token.startswith("["):
            parts = token[1:].split("/")
            if len(parts) < 3 or not parts[1].startswith("EN#"):
                raise ValueError(f"{where}: {token!r} does not open a phrase as [/EN#ENTITY/TYPE words...]")
            current = {"entity": parts[1][3:], "types": tuple(parts[2:]), "words": [], "start": None}
            continue
        closing = current is not None and token.endswith("]")
        word = token[:-1] if closing else token
        start = pos + (1 if words else 0)
        words.append(word)
        pos = start + len(word)
        if current is not None:
            if current["start"] is None:
                current["start"] = start
            current["words"].append(word)
            if closing:
                phrases.append(Phrase(" ".join(current["words"]), current["entity"], current["types"],
                                      (current["start"], pos)))
                current = None
    if current is not None:
        raise ValueError(f"{where}: the phrase of entity {current['entity']} is not closed by ']' in {line!r}")
    return " ".join(words), phrases


def parse_annotation(path: str) -> dict:
    """{width, height (None where the XML has no size), boxes {entity: [[x1, y1, x2, y2] ...]}, nobox [entity],
    scene [entity]}, as the dataset's get_annotations (coordinates minus 1)."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    out = {"width": None, "height": None, "boxes": collections.defaultdict(list), "nobox": [], "scene": []}
    if size is not None:
        out["width"], out["height"] = int(size.findtext("width")), int(size.findtext("height"))
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        for name in obj.findall("name"):
            entity = name.text.strip()
            if box is not None:
                out["boxes"][entity].append([float(box.findtext(k)) - 1 for k in ("xmin", "ymin", "xmax", "ymax")])
            else:
                if int(obj.findtext("nobndbox", "0")) > 0:
                    out["nobox"].append(entity)
                if int(obj.findtext("scene", "0")) > 0:
                    out["scene"].append(entity)
    out["boxes"] = dict(out["boxes"])
    return out


def serialize(image_bytes: bytes, image_id: str, index: int, caption: str, rows: list, width: int,
              height: int) -> bytes:
    """One record of a sentence; rows: (span, entity, [x1, y1, x2, y2] in pixels)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))

    def strs(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    bbox = [[y1 / height, x1 / width, y2 / height, x2 / width] for _, _, (x1, y1, x2, y2) in rows]
    feature = {
        records.IMAGE: strs(image_bytes), records.KEY: strs(f"{image_id}_{index}".encode()),
        records.CAPTION: strs(caption.encode("utf-8")),
        "objects/bbox": tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(bbox).tolist())),
        "objects/phrase_span": ints(np.ravel([span for span, _, _ in rows]).tolist()),
        "objects/entity": ints([int(e) if e.isdigit() else -1 for _, e, _ in rows]),
    }
    if image_id.isdigit():
        feature["image/id"] = ints([int(image_id)])
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _image_path(images: str, image_id: str) -> Optional[str]:
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(images, image_id + ext)
        if os.path.exists(path):
            return path
    return None


def convert(sentences: str, annotations: str, images: str, out: str, ids: Optional[str] = None,
            name: str = "flickr30k", shards: int = 1) -> dict:
    """Writes the shards and the summary; returns the summary (counts and the shards' paths)."""
    if ids:
        with open(ids) as f:
            wanted = [line.strip() for line in f if line.strip()]
    else:
        wanted = sorted(os.path.splitext(n)[0] for n in os.listdir(sentences) if n.endswith(".txt"))
    if not wanted:
        raise ValueError(f"no image ids to convert: {ids or sentences} lists none (Sentences/ID.txt files)")
    missing = []
    for image_id in wanted:
        for what, path in (("sentences", os.path.join(sentences, f"{image_id}.txt")),
                           ("annotation", os.path.join(annotations, f"{image_id}.xml"))):
            if not os.path.exists(path):
                missing.append(f"{what} {path}")
        if _image_path(images, image_id) is None:
            missing.append(f"image {os.path.join(images, image_id)}{{{','.join(IMAGE_EXTENSIONS)}}}")
    if missing:
        raise FileNotFoundError(f"{len(missing)} files of the {len(wanted)} ids are missing (the first: {missing[0]}):"
                                " point --sentences, --annotations and --images at the dataset's folders")
    counts = collections.Counter()
    os.makedirs(out, exist_ok=True)
    with records.ShardWriter(os.path.join(out, name), shards) as writer:
        for image_id in wanted:
            with open(_image_path(images, image_id), "rb") as f:
                image_bytes = f.read()
            width, height = Image.open(io.BytesIO(image_bytes)).size
            xml = os.path.join(annotations, f"{image_id}.xml")
            boxes = parse_annotation(xml)
            if boxes["width"] is not None and (boxes["width"], boxes["height"]) != (width, height):
                raise ValueError(f"{_image_path(images, image_id)}: {width}x{height} px, but {xml} says "
                                 f"{boxes['width']}x{boxes['height']}: the boxes are in the annotation's pixels, so "
                                 "the two must agree (the wrong image, or a resized one)")
            counts["images"] += 1
            with open(os.path.join(sentences, f"{image_id}.txt"), encoding="utf-8") as f:
                lines = [line for line in f.read().split("\n") if line.strip()]
            for index, line in enumerate(lines):
                caption, phrases = parse_sentence(line, f"{sentences}/{image_id}.txt line {index + 1}")
                rows = []
                for p in phrases:
                    own = boxes["boxes"].get(p.entity, [])
                    if not own:
                        reason = ("non_visual" if p.entity == NON_VISUAL else "scene" if p.entity in boxes["scene"]
                                  else "no_box" if p.entity in boxes["nobox"] else "not_annotated")
                        counts[f"phrases_without_box/{reason}"] += 1
                        continue
                    counts["phrases"] += 1
                    rows += [(p.span, p.entity, b) for b in own]
                counts["sentences"] += 1
                counts["boxes"] += len(rows)
                writer.write(serialize(image_bytes, image_id, index, caption, rows, width, height))
    summary = {"name": name, **dict(sorted(counts.items())), "files": writer.paths}
    with open(os.path.join(out, f"{name}.summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", required=True, help="the Sentences folder (ID.txt)")
    p.add_argument("--annotations", required=True, help="the Annotations folder (ID.xml)")
    p.add_argument("--images", required=True, help="the folder of the images (ID.jpg)")
    p.add_argument("--out", required=True, help="output folder: NAME-NNNNN-of-NNNNN.tfrecord, NAME.summary.json")
    p.add_argument("--ids", default=None, help="a file of the ids to convert, one a line (default: every sentence "
                                               "file)")
    p.add_argument("--name", default="flickr30k", help="the files' prefix, which names the metric keys")
    p.add_argument("--shards", type=int, default=1)
    args = p.parse_args(argv)
    summary = convert(args.sentences, args.annotations, args.images, args.out, args.ids, args.name, args.shards)
    skipped = sum(v for k, v in summary.items() if k.startswith("phrases_without_box/"))
    print(f"wrote {summary.get('sentences', 0)} sentences of {summary.get('images', 0)} images, "
          f"{summary.get('phrases', 0)} phrases with {summary.get('boxes', 0)} boxes ({skipped} phrases without a "
          f"box left out) to {len(summary['files'])} shards: read them as "
          f"tfrecord:{os.path.join(args.out, args.name)}-*.tfrecord")


if __name__ == "__main__":
    main()
