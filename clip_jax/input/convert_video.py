"""Video files (mp4, webm, avi, ...: anything PyAV decodes) plus a captions or labels file -> TFRecords of clips.

    python -m clip_jax.input.convert_video --layout=msrvtt --meta=MSRVTT_data.json --video_dir=videos --out=DIR
    python -m clip_jax.input.convert_video --layout=msrvtt --meta=MSRVTT_data.json --video_dir=videos --out=DIR \\
        --split_csv=MSRVTT_train.9k.csv --split_name=train
    python -m clip_jax.input.convert_video --layout=kinetics --meta=kinetics400/train.csv --video_dir=train --out=DIR

Layouts:
- msrvtt: the MSR-VTT JSON ({"videos": [{"video_id": "video0", "split": "train" | "validate" | "test", ...}],
  "sentences": [{"video_id": "video0", "caption": "...", "sen_id": 0}, ...]}), files VIDEO_DIR/{video_id}.mp4.
  One record per video holding all its captions (about 20): training draws one per epoch, retrieval reads them
  all. Splits: the JSON's, or with --split_csv (a CSV with a video_id column: CLIP4Clip's MSRVTT_train.9k.csv,
  MSRVTT_JSFUSION_test.csv) only its videos, as split --split_name.
- kinetics: the Kinetics CSV (label, youtube_id, time_start, time_end, split), files
  VIDEO_DIR/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4 or the same under VIDEO_DIR/{label}/ (also with '_'
  for spaces). label = the class's index among the CSV's labels sorted (or in --classes, a JSON list of names, to
  index several CSVs alike), caption = the class name.

Each record holds ``frames`` (JPEG, quality --quality), ``frames/count``, ``frames/time`` (seconds),
``caption``, ``key`` (the video's id) and, for kinetics, ``label`` (records.serialize_clip; clip_jax.input.video
reads it). Frames:
--frames N at the centres of N equal parts of the video (default 12), or with --fps F one at the centre of each
1/F s; each the decoded frame nearest that time, resized (bicubic) so that its short side is --short_side
(default 256; a smaller frame is kept as it is). Writes DIR/SPLIT-0000k-of-0000n.tfrecord and DIR/dataset_info.json
({layout, frames or fps, short_side, splits: {split: records}, classes, skipped: [{file, reason}]}; a later
conversion into DIR adds its splits). A file that is missing or that PyAV cannot decode (or that holds no video
frame) is named in a warning, counted and left out.

Read a split as ``tfrecord:DIR/train-*.tfrecord`` with the batch key ``BatchInput("frames", "frames",
("frames",), (("frames", 12),))`` (and ``data.label_keys=("label",)`` for kinetics).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import math
import os
import sys
from typing import Optional, Sequence

from clip_jax.input import records

LAYOUTS = ("msrvtt", "kinetics")
EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv")  # tried in order where a layout's file name has none


# -- reading a video ---------------------------------------------------------------------------------
def targets(first: float, end: float, frames: int = 12, fps: float = 0.0) -> list:
    """The timestamps (s) to sample in [first, end): the centres of `frames` equal parts, or with fps > 0 of each
    1/fps s."""
    span = max(end - first, 0.0)
    if fps > 0:
        return [first + (j + 0.5) / fps for j in range(max(1, int(math.floor(span * fps))))]
    return [first + (k + 0.5) * span / frames for k in range(frames)]


def nearest(times: Sequence[float], wanted: Sequence[float]) -> list:
    """For each wanted time the index of the nearest of the sorted `times` (the earlier on a tie)."""
    import bisect

    out = []
    for t in wanted:
        i = bisect.bisect_left(times, t)
        if i == len(times) or (i > 0 and t - times[i - 1] <= times[i] - t):
            i -= 1
        out.append(max(i, 0))
    return out


def read_frames(path: str, frames: int = 12, fps: float = 0.0, short_side: int = 256, quality: int = 90) -> tuple:
    """(JPEG bytes of each sampled frame, their timestamps in s) of a video file. Raises (av's errors, ValueError)
    where the file does not decode or holds no video frame."""
    import av
    from PIL import Image

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        base = float(stream.time_base)
        # the frames' timestamps from the packets (no decode); output order is presentation order
        stamps = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
    if not stamps:
        raise ValueError("no video frame")
    times = [s * base for s in stamps]
    step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
    picks = nearest(times, targets(times[0], times[-1] + step, frames, fps))
    wanted = collections.defaultdict(list)
    for k, i in enumerate(picks):
        wanted[i].append(k)
    out: list = [None] * len(picks)
    last = None
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                last = _jpeg(frame.to_image(), short_side, quality, Image)
                for k in wanted[i]:
                    out[k] = last
            if i >= picks[-1] and all(o is not None for o in out):
                break
    if last is None:
        raise ValueError("no video frame decodes")
    # a stream that decoded fewer frames than it has packets: its last decoded pick stands in for the rest
    filled = [o if o is not None else last for o in out]
    return filled, [times[i] for i in picks]


def _jpeg(image, short_side: int, quality: int, Image) -> bytes:
    w, h = image.size
    if min(w, h) > short_side:
        scale = short_side / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# -- the layouts ----------------------------------------------------------------------------------------
def msrvtt_items(meta: str, split_csv: str = "", split_name: str = "") -> list:
    """[(split, video id, [file names to try], captions, label None)] of an MSR-VTT JSON, in its videos' order."""
    with open(meta) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "sentences" not in data or ("videos" not in data and not split_csv):
        raise ValueError(f"{meta}: no MSR-VTT JSON (it needs 'videos' [{{video_id, split}}] and 'sentences' "
                         "[{video_id, caption}]): pick --layout=kinetics for a CSV")
    captions = collections.defaultdict(list)
    for s in data["sentences"]:
        captions[s["video_id"]].append(s["caption"])
    if split_csv:
        with open(split_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "video_id" not in rows[0]:
            raise ValueError(f"{split_csv}: no video_id column: --split_csv lists a split's videos by video_id")
        name = split_name or os.path.splitext(os.path.basename(split_csv))[0]
        videos = list(dict.fromkeys((name, r["video_id"]) for r in rows))
    else:
        videos = [(v["split"], v["video_id"]) for v in data["videos"]]
    return [(split, vid, [vid + e for e in EXTENSIONS], captions.get(vid, []), None) for split, vid in videos]


def kinetics_items(meta: str, classes: Optional[list] = None) -> tuple:
    """([(split, id, [relative paths to try], [class name], label)], class names) of a Kinetics CSV."""
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ("label", "youtube_id", "time_start", "time_end", "split")
    missing = [c for c in need if rows and c not in rows[0]]
    if missing or not rows:
        raise ValueError(f"{meta}: {'no rows' if not rows else f'no columns {missing}'} for --layout=kinetics (it "
                         f"expects {', '.join(need)})")
    names = list(classes) if classes else sorted({r["label"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({r["label"] for r in rows} - set(index))
    if unknown:
        raise ValueError(f"{meta}: labels {unknown[:5]} are not in --classes: list every class of the CSVs")
    items = []
    for r in rows:
        stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        folders = ["", r["label"], r["label"].replace(" ", "_")]
        tries = [os.path.join(d, stem + e) for e in EXTENSIONS for d in dict.fromkeys(folders)]
        items.append((r["split"], stem, tries, [r["label"]], index[r["label"]]))
    return items, names


# -- the conversion -------------------------------------------------------------------------------------
def convert(items: list, video_dir: str, out: str, *, layout: str, frames: int = 12, fps: float = 0.0,
            short_side: int = 256, quality: int = 90, classes: Optional[list] = None, per_shard: int = 1000,
            log=print) -> dict:
    """Writes the records of `items` (msrvtt_items', kinetics_items') and dataset_info.json; returns its dict."""
    os.makedirs(out, exist_ok=True)
    by_split = collections.defaultdict(list)
    for item in items:
        by_split[item[0]].append(item)
    written, skipped = {}, []
    for split, rows in by_split.items():
        shards = max(1, math.ceil(len(rows) / per_shard))
        with records.ShardWriter(os.path.join(out, split), shards) as writer:
            for _, key, tries, captions, label in rows:
                path = next((os.path.join(video_dir, t) for t in tries if os.path.exists(os.path.join(video_dir, t))),
                            None)
                if path is None:
                    skipped.append({"file": os.path.join(video_dir, tries[0]), "reason": "not found"})
                    log(f"warning: skipped {os.path.join(video_dir, tries[0])}: not found", file=sys.stderr)
                    continue
                try:
                    jpegs, times = read_frames(path, frames, fps, short_side, quality)
                except Exception as e:  # noqa: BLE001  (av.error.*, a broken container: the file is skipped)
                    skipped.append({"file": path, "reason": f"{type(e).__name__}: {e}"})
                    log(f"warning: skipped {path}: it does not decode ({type(e).__name__}: {e})", file=sys.stderr)
                    continue
                writer.write(records.serialize_clip(jpegs, captions, key, label, times=times))
        written[split] = writer.written
    info_path = os.path.join(out, "dataset_info.json")
    info = {}
    if os.path.exists(info_path):  # another split of the same dataset converted before: add to it
        with open(info_path) as f:
            info = json.load(f)
        if info.get("layout") != layout:
            raise ValueError(f"{info_path} describes a {info.get('layout')!r} conversion: write --layout={layout} "
                             "into another --out")
    info.update(layout=layout, frames=None if fps > 0 else frames, fps=fps or None, short_side=short_side,
                format="jpeg", splits={**info.get("splits", {}), **written},
                skipped=info.get("skipped", []) + skipped)
    if classes is not None:
        info["classes"] = list(classes)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    log(f"{out}: {written} records; {len(skipped)} files skipped" + (" (dataset_info.json names them)"
                                                                       if skipped else ""))
    return info


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    p.add_argument("--meta", required=True, help="msrvtt: the JSON of videos and sentences; kinetics: the CSV")
    p.add_argument("--video_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=12, help="frames per clip, at the centres of equal parts")
    p.add_argument("--fps", type=float, default=0.0, help="> 0: one frame each 1/fps s instead of --frames")
    p.add_argument("--short_side", type=int, default=256)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--split_csv", default="", help="msrvtt: only the videos of this CSV's video_id column")
    p.add_argument("--split_name", default="", help="msrvtt with --split_csv: their split (default: the CSV's name)")
    p.add_argument("--classes", default="", help="kinetics: a JSON list of the class names, in label order")
    p.add_argument("--per_shard", type=int, default=1000, help="records per shard")
    args = p.parse_args(argv)
    for name, value, least in (("frames", args.frames, 1), ("short_side", args.short_side, 1),
                               ("per_shard", args.per_shard, 1)):
        if value < least:
            p.error(f"--{name}={value}: it must be >= {least}")
    if not 1 <= args.quality <= 100:
        p.error(f"--quality={args.quality}: a JPEG quality is 1..100")
    classes = None
    if args.layout == "msrvtt":
        items = msrvtt_items(args.meta, args.split_csv, args.split_name)
    else:
        given = None
        if args.classes:
            with open(args.classes) as f:
                given = json.load(f)
        items, classes = kinetics_items(args.meta, given)
    convert(items, args.video_dir, args.out, layout=args.layout, frames=args.frames, fps=args.fps,
            short_side=args.short_side, quality=args.quality, classes=classes, per_shard=args.per_shard)


if __name__ == "__main__":
    main()
