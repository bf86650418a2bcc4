"""Image folder + PNG masks -> TFRecords with ``image``, ``segmentation_mask`` and ``key``.

    python -m clip_jax.input.convert_segmentation --images=DIR --masks=DIR --out=DIR [--layout=voc|ade20k]
        [--num_shards=N]

Each image (``.jpg``, ``.jpeg``, ``.png``) pairs with the mask of the same stem (``NAME.png``) in
--masks. Layouts: ``voc`` (PASCAL VOC's SegmentationClass: palette or grey PNGs of class indices,
0 = background, 255 = ignore), kept as they are; ``ade20k`` (ADEChallengeData2016's annotations: 0 =
"other", k = the k-th class), written as 255 for 0 and k - 1 for k, so class 0 is the first real class.
Images are stored as they are (JPEG stays JPEG); masks as 8-bit grey PNGs of class ids (a palette PNG
would decode to colours). A pair whose sizes differ, a missing mask, or a mask that holds colours or ids
past 255 stops the conversion with an error naming the file. Read the output as
``tfrecord:OUT/segmentation-*.tfrecord`` with the batch key
``BatchInput("mask", "mask", ("segmentation_mask",), (("labels", "record"),))`` (clip_jax.input.segmentation).
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from clip_jax.input import records

LAYOUTS = ("voc", "ade20k")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def class_ids(mask: Image.Image, layout: str, path: str) -> np.ndarray:
    """uint8 [H, W] class ids (255 = ignore) of a mask file in a layout."""
    if mask.mode not in ("P", "L", "I", "I;16"):
        raise ValueError(f"{path}: mask mode {mask.mode!r} holds colours, not class indices: save each pixel's class "
                         "index as a grey or palette PNG")
    ids = np.asarray(mask).astype(np.int64)
    if ids.max(initial=0) > 255:
        raise ValueError(f"{path}: class id {int(ids.max())} does not fit 8 bits: map the classes to 0..254 "
                         "(255 = ignore) first")
    if layout == "ade20k":
        ids = np.where(ids == 0, 255, ids - 1)
    elif layout != "voc":
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return ids.astype(np.uint8)


def serialize(image: bytes, mask_png: bytes, key: str) -> bytes:
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()

    def strs(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {records.IMAGE: strs(image), "segmentation_mask": strs(mask_png), records.KEY: strs(key.encode())}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def pairs(images: str, masks: str) -> list:
    """[(key, image path, mask path)] sorted by key; an error naming the images without a mask."""
    found, missing = [], []
    for name in sorted(os.listdir(images)):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = os.path.join(masks, stem + ".png")
        (found if os.path.exists(mask) else missing).append((stem, os.path.join(images, name), mask))
    if missing:
        raise FileNotFoundError(f"{len(missing)} images have no mask (the first: {missing[0][2]!r}): each image "
                                "NAME.jpg needs --masks/NAME.png (or remove the image)")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    return found


def convert(images: str, masks: str, out: str, layout: str = "voc", num_shards: int = 1) -> list:
    """Writes the shards; returns their paths."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    found = pairs(images, masks)
    os.makedirs(out, exist_ok=True)
    with records.ShardWriter(os.path.join(out, "segmentation"), num_shards) as writer:
        for key, image_path, mask_path in found:
            with open(image_path, "rb") as f:
                image = f.read()
            size = Image.open(io.BytesIO(image)).size
            mask = Image.open(mask_path)
            if mask.size != size:
                raise ValueError(f"{mask_path}: mask of {mask.size[0]}x{mask.size[1]} px for image {image_path} of "
                                 f"{size[0]}x{size[1]} px: write each mask at its image's size")
            buf = io.BytesIO()
            Image.fromarray(class_ids(mask, layout, mask_path), "L").save(buf, format="PNG")
            writer.write(serialize(image, buf.getvalue(), key))
    return writer.paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="folder of images (.jpg, .jpeg, .png)")
    p.add_argument("--masks", required=True, help="folder of PNG masks, one NAME.png per image NAME.*")
    p.add_argument("--out", required=True, help="output folder: segmentation-NNNNN-of-NNNNN.tfrecord")
    p.add_argument("--layout", choices=LAYOUTS, default="voc", help="voc: ids as they are (255 = ignore); "
                   "ade20k: 0 ('other') -> 255, k -> k - 1")
    p.add_argument("--num_shards", type=int, default=1)
    args = p.parse_args(argv)
    paths = convert(args.images, args.masks, args.out, args.layout, args.num_shards)
    print(f"wrote {len(paths)} shards: read them as tfrecord:{os.path.join(args.out, 'segmentation-*.tfrecord')}")


if __name__ == "__main__":
    main()
