"""ViLD-image's offline step: proposals of each record's image, the teacher's embeddings of their crops,
written as new TFRecord shards (the record format: clip_jax.input.regions).

Per record, at the record's own resolution: the proposals (a detector's, run on the image at its
input size and mapped back to the record's pixels; or the record's own boxes, a stand-in), the best
max_regions of them; per proposal and scale s (1x and 1.5x), the box of s times its width and height
around its centre, clipped to the image, resized to the teacher's input size (clip_jax.input.crop_resize:
PIL's resize of that box, bicubic by default); the teacher's image embeddings of the crops, summed over
the scales and L2-normalized. Crops of many records go through one jitted call and the teacher in fixed
batches, so the result does not depend on how records fall into batches beyond the teacher's own
arithmetic.

    embed_regions(records, proposal_fn, teacher_embed_fn, teacher_size, proposal_size=S)  # -> records with
    write_regions(spec, config, out, ...)                                                  # regions/* added
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from clip_jax.input import crop_resize, regions
from clip_jax.preprocessing import MEAN, STD

SCALES = (1.0, 1.5)  # ViLD's crops: the proposal and 1.5x around its centre
SCORES = "regions/scores"  # embed_regions' proposal scores (objectness), beside the record format's keys; not written


class BoxProposals:
    """The records' own boxes (objects/bbox) and `copies` jittered copies of each (centre moved by up to
    `jitter` of the box's size, width and height scaled by exp(+-jitter)), deterministic per (seed, record
    number): a stand-in for a trained proposal stage, for tests and for data with boxes."""

    needs = ("objects/bbox",)

    def __init__(self, copies: int = 2, jitter: float = 0.1, seed: int = 0):
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
            raise ValueError(f"box proposals: copies must be an int >= 0 (jittered copies per box), got {copies!r}")
        if not 0.0 <= float(jitter) < 1.0:
            raise ValueError(f"box proposals: jitter must be in [0, 1) (a share of the box's size), got {jitter!r}")
        self.copies, self.jitter, self.seed = copies, float(jitter), int(seed)

    def describe(self) -> dict:
        return {"source": "boxes", "copies": self.copies, "jitter": self.jitter, "seed": self.seed}

    def __call__(self, batch: list, images: list) -> list:
        out = []
        for rec, image in zip(batch, images):
            h, w = image.shape[:2]
            if "objects/bbox" not in rec:
                raise ValueError("--proposals=boxes reads each record's objects/bbox; this record has none: use "
                                 "records with boxes, or a trained proposal stage (--workdir)")
            b = np.asarray(rec["objects/bbox"], np.float64).reshape(-1, 4)
            boxes = [np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], -1)]
            rng = np.random.default_rng([self.seed, int(rec["number"])])
            for _ in range(self.copies):
                base = boxes[0]
                size = base[:, 2:] - base[:, :2]
                centre = (base[:, :2] + base[:, 2:]) / 2 + rng.uniform(-self.jitter, self.jitter, size.shape) * size
                half = size * np.exp(rng.uniform(-self.jitter, self.jitter, size.shape)) / 2
                boxes.append(np.concatenate([centre - half, centre + half], -1))
            boxes = np.concatenate(boxes)
            out.append((boxes, np.ones(len(boxes), bool), np.repeat(np.arange(1 + self.copies, 0, -1.0), len(b))))
        return out


class ModelProposals:
    """A trained proposal stage: fn(images [N, S, S, 3] uint8, the records' evaluation crop at the model's size)
    -> {"boxes" [N, P, 4] (x1, y1, x2, y2) in those pixels, "valid" [N, P] bool, "scores" [N, P]} (a method's
    Prediction 'proposals' on its variables), mapped back to each record's pixels."""

    needs = ()

    def __init__(self, fn: Callable, image_size: int, batch_size: int, config=None, describe: Optional[dict] = None):
        from clip_jax.input.settings import data_settings

        self.fn, self.image_size, self.batch_size = fn, int(image_size), int(batch_size)
        self.config = data_settings(config)
        self._describe = dict(describe or {})

    def describe(self) -> dict:
        return {"source": "model", "image_size": self.image_size, **self._describe}

    def __call__(self, batch: list, images: list) -> list:
        from clip_jax.input import detection
        from clip_jax.input.transforms import crop_pixels

        tf = regions._tf()
        n = len(batch)
        inputs = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.uint8)
        frames = []
        for i, rec in enumerate(batch):
            image = tf.constant(rec["image"])
            inputs[i] = np.round(crop_pixels(image, self.image_size, False, None, self.config).numpy()).astype(np.uint8)
            frames.append([float(v) for v in detection.geometry(image, self.image_size, False, None, self.config)[:4]])
        got = self.fn(inputs)
        if not isinstance(got, dict) or not {"boxes", "valid", "scores"} <= set(got):
            raise ValueError("the proposals prediction must return {'boxes': [N, P, 4], 'valid': [N, P], 'scores': "
                             f"[N, P]}}, got {type(got).__name__} {sorted(got) if isinstance(got, dict) else ''}")
        boxes, valid, scores = (np.asarray(got[k]) for k in ("boxes", "valid", "scores"))
        p = boxes.shape[1] if boxes.ndim == 3 else -1
        if boxes.shape != (self.batch_size, p, 4) or valid.shape != (self.batch_size, p) or scores.shape != valid.shape:
            raise ValueError(f"the proposals prediction gave boxes {boxes.shape}, valid {valid.shape}, scores "
                             f"{scores.shape} for {self.batch_size} images: want [N, P, 4], [N, P], [N, P]")
        self.count = p
        out = []
        for i in range(n):
            sy, sx, top, left = frames[i]
            b = boxes[i].astype(np.float64)
            rec_boxes = np.stack([(b[:, 0] + left) / sx, (b[:, 1] + top) / sy, (b[:, 2] + left) / sx,
                                  (b[:, 3] + top) / sy], -1)
            out.append((rec_boxes, valid[i].astype(bool), scores[i].astype(np.float64)))
        return out


def select(boxes: np.ndarray, valid: np.ndarray, scores: np.ndarray, h: int, w: int, max_regions: int) -> np.ndarray:
    """The best `max_regions` proposals (valid, finite, of positive area once clipped to the image), by score
    (ties: proposal order), as float64 [k, 4] (x1, y1, x2, y2) clipped to the image."""
    return select_scored(boxes, valid, scores, h, w, max_regions)[0]


def select_scored(boxes, valid, scores, h: int, w: int, max_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """select's boxes [k, 4] and their scores [k] (float64)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    finite = np.isfinite(boxes).all(-1) & np.isfinite(scores)
    c = np.clip(np.where(finite[:, None], boxes, 0.0), 0.0, [w, h, w, h])
    ok = np.asarray(valid, bool) & finite & (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    order = np.argsort(-np.where(ok, scores, -np.inf), kind="stable")
    top = order[: min(int(ok.sum()), max_regions)]
    return c[top], scores[top]


def crop_boxes(boxes: np.ndarray, scale: float, h: int, w: int) -> np.ndarray:
    """Each box (x1, y1, x2, y2) scaled `scale` times around its centre, clipped to the image."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    return np.clip(np.concatenate([centre - half, centre + half], -1), 0.0, [w, h, w, h])


def _decode(image_bytes: bytes) -> np.ndarray:
    tf = regions._tf()
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False).numpy()


def _normalized_crops():
    """The jitted crop of many boxes of a batch of images, normalized as the model's input."""
    import jax
    import jax.numpy as jnp

    def fn(images, index, kx, ky):
        pixels = crop_resize.resample(images, index, kx, ky)
        return (pixels / 255.0 - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)

    return jax.jit(fn)


def embed_regions(records: Iterable[dict], proposal_fn, teacher_embed_fn: Callable, teacher_size: int,
                  scales: Sequence[float] = SCALES, max_regions: int = regions.MAX_REGIONS, *,
                  proposal_size: Optional[int] = None, batch_size: int = 16, crop_batch: int = 64,
                  resample: str = "bicubic", embed_dim: Optional[int] = None, config=None) -> Iterator[dict]:
    """Each record ({"image": encoded bytes, "objects/bbox" for box proposals, any other keys}) again, in order,
    with "regions/bbox" float32 [k, 4] ([ymin, xmin, ymax, xmax] in [0, 1]), "regions/embeds" float32 [k, E]
    (unit rows) and "regions/scores" float32 [k] (the proposals' scores, best first) added, k <= max_regions.

    proposal_fn: a BoxProposals, or the proposal stage's fn(images [N, S, S, 3] uint8) -> {"boxes", "valid",
    "scores"} with proposal_size=S (N = batch_size). teacher_embed_fn: crops [crop_batch, T, T, 3] float32,
    normalized as the model's input (T = teacher_size) -> image embeddings [crop_batch, E] (unit rows).
    embed_dim: the width the embeddings must have (the student's), checked on the teacher's first batch."""
    _check_settings(scales, max_regions, batch_size, crop_batch, resample, teacher_size)
    if isinstance(proposal_fn, (BoxProposals, ModelProposals)):
        source = proposal_fn
    else:
        if not proposal_size:
            raise ValueError("embed_regions: a proposal function needs proposal_size, the input size it takes")
        source = ModelProposals(proposal_fn, proposal_size, batch_size, config)
    crops = _normalized_crops()
    state = {"width": embed_dim}  # the teacher's width, once known
    batch: list = []
    for number, rec in enumerate(records):
        batch.append({"number": number, **rec})  # box proposals' jitter is keyed by it
        if len(batch) == batch_size:
            yield from _embed_batch(batch, source, crops, teacher_embed_fn, teacher_size, scales, max_regions,
                                    crop_batch, resample, state)
            batch = []
    if batch:
        yield from _embed_batch(batch, source, crops, teacher_embed_fn, teacher_size, scales, max_regions, crop_batch,
                                resample, state)


def _check_settings(scales, max_regions, batch_size, crop_batch, resample, teacher_size) -> None:
    if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
        raise ValueError(f"max_regions={max_regions!r}: regions per record must be an int >= 1")
    if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"scales={tuple(scales)!r}: give one or more crop scales > 0 (ViLD's: 1.0, 1.5)")
    for name, v in (("batch_size", batch_size), ("crop_batch", crop_batch), ("teacher_size", teacher_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if resample not in crop_resize.RESAMPLE:
        raise ValueError(f"resample={resample!r}: use one of {', '.join(crop_resize.RESAMPLE)}")


def _embed_batch(batch, source, crops_fn, teacher_embed_fn, size, scales, max_regions, crop_batch, resample, state):
    images = [_decode(rec["image"]) for rec in batch]
    proposals = source(batch, images)
    if isinstance(source, ModelProposals) and max_regions > source.count:
        raise ValueError(f"max_regions={max_regions} but the proposal stage gives {source.count} proposals per "
                         f"image: pass max_regions <= {source.count}")
    chosen = [select_scored(b, v, s, im.shape[0], im.shape[1], max_regions) for (b, v, s), im in zip(proposals, images)]
    kept = [boxes for boxes, _ in chosen]
    # every crop of the batch: (record, region, the box at each scale)
    jobs = [(i, r, crop_boxes(boxes[r : r + 1], s, *images[i].shape[:2])[0])
            for i, boxes in enumerate(kept) for r in range(len(boxes)) for s in scales]
    hp = -(-max(im.shape[0] for im in images) // 32) * 32  # padded to a few shapes: few compilations
    wp = -(-max(im.shape[1] for im in images) // 32) * 32
    stack = np.zeros((len(batch), hp, wp, 3), np.uint8)
    for i, im in enumerate(images):
        stack[i, : im.shape[0], : im.shape[1]] = im
    embeds = []
    chunks = [jobs[start : start + crop_batch] for start in range(0, len(jobs), crop_batch)]
    if not chunks and state["width"] is None:
        chunks = [[]]  # no region yet: the teacher's width from one batch of blank crops
    for chunk in chunks:
        index = np.zeros(crop_batch, np.int32)
        kx = np.zeros((crop_batch, size, wp), np.float32)
        ky = np.zeros((crop_batch, size, hp), np.float32)
        for q, (i, _, box) in enumerate(chunk):
            h, w = images[i].shape[:2]
            index[q] = i
            kx[q] = crop_resize.coefficients(w, box[0], box[2], size, resample, wp)[0]
            ky[q] = crop_resize.coefficients(h, box[1], box[3], size, resample, hp)[0]
        got = np.asarray(teacher_embed_fn(crops_fn(stack, index, kx, ky)), np.float32)
        if got.ndim != 2 or got.shape[0] != crop_batch:
            raise ValueError(f"the teacher's image embeddings of {crop_batch} crops came as {got.shape}: want "
                             f"[{crop_batch}, E]")
        if state["width"] is not None and got.shape[1] != state["width"]:
            raise ValueError(f"the teacher's image embeddings have width {got.shape[1]}, but the region embeddings "
                             f"must have width {state['width']} (the student's): use a teacher of embedding width "
                             f"{state['width']}")
        state["width"] = got.shape[1]
        embeds.append(got[: len(chunk)])
    sums = [np.zeros((len(b), state["width"]), np.float32) for b in kept]
    for (i, r, _), e in zip(jobs, np.concatenate(embeds) if jobs else []):
        sums[i][r] += e
    for rec, (boxes, scores), total, im in zip(batch, chosen, sums, images):
        h, w = im.shape[:2]
        norm = np.linalg.norm(total, axis=-1, keepdims=True)
        unit = (total / np.maximum(norm, 1e-12)).astype(np.float32)
        bbox = np.stack([boxes[:, 1] / h, boxes[:, 0] / w, boxes[:, 3] / h, boxes[:, 2] / w], -1).astype(np.float32)
        yield {**rec, regions.BBOX: bbox.reshape(-1, 4), regions.EMBEDS: unit, SCORES: scores.astype(np.float32)}


# -- the writer ----------------------------------------------------------------------------------------------
def read_records(spec: str, config=None, limit: int = 0, needs: Sequence[str] = ()) -> tuple[list, Iterator[dict]]:
    """(the split's TFRecord files, its records in file order: {"shard": file index, "number": record number,
    "raw": serialized example, "image": encoded bytes, and `needs` as arrays}) for any TFRecord-backed data spec
    (tfrecord:GLOB, shapes_scenes:SPLIT, shapes:SPLIT)."""
    from clip_jax.input.pipeline import embedded_files, list_files, parse_spec
    from clip_jax.input.settings import data_settings

    config = data_settings(config)
    source = parse_spec(spec)
    if source.kind == "tfds":
        raise ValueError(f"--data={spec!r}: region embeddings are written beside a copy of each record, so the data "
                         "must be TFRecords: convert it first (python -m clip_jax.input.convert_detection for COCO / "
                         "LVIS) and pass tfrecord:GLOB")
    files = embedded_files(source, config) or list_files(source.name)

    def records():
        tf = regions._tf()
        number = 0
        for shard, path in enumerate(files):
            ds = tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
            for raw in ds.as_numpy_iterator():
                if limit and number >= limit:
                    return
                feature = tf.train.Example.FromString(raw).features.feature
                if "image" not in feature or not feature["image"].bytes_list.value:
                    raise ValueError(f"record {number} of {path} has no image feature: every record needs one")
                rec = {"shard": shard, "number": number, "raw": raw, "image": feature["image"].bytes_list.value[0]}
                for name in needs:
                    if name in feature:
                        rec[name] = np.asarray(feature[name].float_list.value, np.float32)
                yield rec
                number += 1

    return files, records()


def write_regions(spec: str, out: str, proposal_fn, teacher_embed_fn: Callable, teacher_size: int, *,
                  config=None, limit: int = 0, describe: Optional[dict] = None, log=print, **options) -> dict:
    """Write the records of `spec` with their regions (embed_regions; `options` are its keyword arguments) to
    out/regions-NNNNN-of-NNNNN.tfrecord, one shard per input file that gave a record, then out/regions.json;
    returns the manifest."""
    tf = regions._tf()
    files, records = read_records(spec, config, limit, getattr(proposal_fn, "needs", ()))
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, regions.MANIFEST)):
        os.remove(os.path.join(out, regions.MANIFEST))  # a half-rewritten directory has none
    writers: dict = {}
    counts = {"records": 0, "regions": 0, "records_without_regions": 0}
    width = None
    start = time.perf_counter()
    for rec in embed_regions(records, proposal_fn, teacher_embed_fn, teacher_size, config=config, **options):
        if rec["shard"] not in writers:
            writers[rec["shard"]] = tf.io.TFRecordWriter(os.path.join(out, f".part-{rec['shard']:05d}"))
        writers[rec["shard"]].write(regions.serialize(rec["raw"], rec[regions.BBOX], rec[regions.EMBEDS]))
        k = len(rec[regions.BBOX])
        width = rec[regions.EMBEDS].shape[1]
        counts["records"] += 1
        counts["regions"] += k
        counts["records_without_regions"] += int(k == 0)
        if counts["records"] % 1000 == 0:
            log(f"embedded the regions of {counts['records']} records "
                f"({counts['records'] / (time.perf_counter() - start):.1f} records/s)")
    shards = []
    for n, shard in enumerate(sorted(writers)):
        writers[shard].close()
        name = f"regions-{n:05d}-of-{len(writers):05d}.tfrecord"
        os.replace(os.path.join(out, f".part-{shard:05d}"), os.path.join(out, name))
        shards.append(name)
    manifest = {"format": "clip_jax regions", "version": 1, "data": spec, "input_files": len(files),
                "proposals": proposal_fn.describe() if hasattr(proposal_fn, "describe") else {"source": "model"},
                "teacher_size": int(teacher_size), "embed_dim": width,
                "max_regions": int(options.get("max_regions", regions.MAX_REGIONS)),
                "scales": [float(s) for s in options.get("scales", SCALES)],
                "resample": options.get("resample", "bicubic"), "limit": int(limit), **counts, "shards": shards,
                "read_with": f"data.train='tfrecord:{os.path.join(out, '*')}'", **(describe or {})}
    with open(os.path.join(out, regions.MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
