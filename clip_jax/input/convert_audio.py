"""Sound classification folders (ESC-50, UrbanSound8K) -> TFRecords of clips, one file per fold.

    python -m clip_jax.input.convert_audio --meta=meta/esc50.csv --audio_dir=audio --out=DIR [--layout=esc50]
    python -m clip_jax.input.convert_audio --meta=metadata/UrbanSound8K.csv --audio_dir=audio --out=DIR --layout=us8k

Layouts: esc50 (columns filename, fold, target, category; files in audio_dir) and us8k (slice_file_name,
fold, classID, class; files in audio_dir/fold<k>/). Writes DIR/fold<k>-00000-of-00001.tfrecord and
DIR/dataset_info.json ({layout, classes: names by index, folds: {k: records}, skipped: [files]}). Each
record holds ``audio`` (the file's bytes as they are), ``label`` (the class index), ``caption`` (the
class name, '_' as a space), ``fold`` and ``key`` (the file name). A file the audio op cannot decode
(clip_jax.input.audio: no WAV of a supported format, no samples, NaN samples) is named in a warning,
counted and left out; a file the CSV names that is not there stops the conversion.

Read the folds as ``tfrecord:DIR/fold1-*.tfrecord`` (test) and the others (train) with the batch key
``BatchInput("audio", "audio", ("audio",), (("rate", 44100), ("samples", 220500), ("channels", 1)))`` and
``data.label_keys=("label",)``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import sys
from typing import Optional, Sequence

from clip_jax.input import records

LAYOUTS = {  # columns: file, fold, class index, class name; and the file's folder under audio_dir
    "esc50": ("filename", "fold", "target", "category", lambda fold: ""),
    "us8k": ("slice_file_name", "fold", "classID", "class", lambda fold: f"fold{fold}"),
}


def read_meta(meta: str, layout: str) -> list:
    """[(file relative to audio_dir, fold, class index, class name)] of a meta CSV, in its order."""
    file_col, fold_col, index_col, name_col, folder = LAYOUTS[layout]
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in (file_col, fold_col, index_col, name_col) if rows and c not in rows[0]]
    if missing or not rows:
        raise ValueError(f"{meta}: {'no rows' if not rows else f'no columns {missing}'} for --layout={layout} "
                         f"(it expects {file_col}, {fold_col}, {index_col}, {name_col}): pick the other layout")
    return [(os.path.join(folder(int(r[fold_col])), r[file_col]), int(r[fold_col]), int(r[index_col]),
             r[name_col]) for r in rows]


def class_names(rows: list) -> list:
    """Class names by index, each index once with one name."""
    names: dict = {}
    for path, _, index, name in rows:
        if names.setdefault(index, name) != name:
            raise ValueError(f"class index {index} is named both {names[index]!r} and {name!r} (at {path}): the meta "
                             "CSV must give each index one name")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"class indices {sorted(names)} are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def caption(name: str) -> str:
    return name.replace("_", " ").strip()


def decodable(data: bytes) -> Optional[str]:
    """None if the audio op reads the clip, else what is wrong with it."""
    from clip_jax.input import audio
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    info = audio.wav_info(tf.constant(data))
    if not bool(info["ok"]):
        return "no WAV of 8/16/24/32-bit integer or 32/64-bit float PCM"
    if int(info["frames"]) == 0:
        return "no samples"
    if bool(audio.nonfinite(tf.constant(data), info)):
        return "NaN or Inf samples"
    return None


def serialize(data: bytes, index: int, name: str, fold: int, key: str) -> bytes:
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    def strs(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {"audio": strs(data), records.LABEL: ints(index), records.CAPTION: strs(caption(name).encode("utf-8")),
               "fold": ints(fold), records.KEY: strs(key.encode("utf-8"))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def convert(meta: str, audio_dir: str, out: str, layout: str = "esc50", log=None) -> dict:
    """Writes the folds' shards and dataset_info.json; returns the info. log: where warnings go (stderr)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    if layout not in LAYOUTS:
        raise ValueError(f"unknown --layout={layout!r}: use {' or '.join(LAYOUTS)}")
    rows = read_meta(meta, layout)
    classes = class_names(rows)
    absent = [p for p, *_ in rows if not os.path.exists(os.path.join(audio_dir, p))]
    if absent:
        raise FileNotFoundError(f"{len(absent)} files of {meta} are not under {audio_dir} (the first: {absent[0]!r}): "
                                "point --audio_dir at the folder that holds them")
    os.makedirs(out, exist_ok=True)
    by_fold = collections.defaultdict(list)
    for row in rows:
        by_fold[row[1]].append(row)
    written, skipped = {}, []
    for fold in sorted(by_fold):
        with records.ShardWriter(os.path.join(out, f"fold{fold}"), 1) as writer:
            for path, _, index, name in by_fold[fold]:
                with open(os.path.join(audio_dir, path), "rb") as f:
                    data = f.read()
                problem = decodable(data)
                if problem:
                    log(f"warning: {os.path.join(audio_dir, path)}: {problem}; left out")
                    skipped.append(path)
                    continue
                writer.write(serialize(data, index, name, fold, os.path.basename(path)))
        written[str(fold)] = writer.written
    info = {"layout": layout, "classes": classes, "captions": [caption(c) for c in classes], "folds": written,
            "records": sum(written.values()), "skipped": skipped}
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meta", required=True, help="the meta CSV (ESC-50's meta/esc50.csv, UrbanSound8K.csv)")
    p.add_argument("--audio_dir", required=True, help="the folder of its clips (us8k: holding fold1..fold10)")
    p.add_argument("--out", required=True, help="output folder: fold<k>-00000-of-00001.tfrecord, dataset_info.json")
    p.add_argument("--layout", default="esc50", choices=sorted(LAYOUTS))
    args = p.parse_args(argv)
    info = convert(args.meta, args.audio_dir, args.out, args.layout)
    print(f"wrote {info['records']} clips of {len(info['classes'])} classes in {len(info['folds'])} folds to "
          f"{args.out} ({len(info['skipped'])} left out): read a fold as tfrecord:{args.out}/fold1-*.tfrecord with "
          "label_keys=('label',)")


if __name__ == "__main__":
    main()
