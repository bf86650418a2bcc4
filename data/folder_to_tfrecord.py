"""Convert image-caption pairs listed in a CSV/TSV file, or lying in a folder, to clip_jax
TFRecord shards.

    python data/folder_to_tfrecord.py --csv=pairs.csv --output=tfrecords \
        [--image_column=filepath] [--caption_column=title] [--delimiter=,] \
        [--num_shards=1] [--processes=N] [--compress] [--prefix=data]
    python data/folder_to_tfrecord.py --folder=images --output=tfrecords [...same options]

CSV mode: one pair per row; image paths are relative to the CSV's folder (or absolute);
the delimiter is a tab for .tsv files and a comma otherwise, unless --delimiter is given.
Folder mode: every image ``x.jpg`` (.jpeg/.png/.webp) with a caption file ``x.txt``
beside it, in the folder and its sub-folders; a .txt without an image is a skipped pair.

The output shards ``PREFIX-{i:05d}-of-{N:05d}.tfrecord[.gz]`` are split into one
contiguous range per process. Listed pair j belongs to the process owning shard
j % N; each process streams through the listing, reads and checks only its own pairs,
and spreads the valid ones round-robin over its shards. So the listing is read once per
process (not once per shard), nothing is held in memory, and the output depends only on
the listing, N and the number of processes. Images are stored as they are (no re-encoding) once they decode;
skipped pairs are counted per reason. Exit status 0 unless there is no pair at all.
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import _convert_common as common


@dataclass(frozen=True)
class Source:
    """Where the pairs are listed: a CSV file or a folder, with the CSV's settings."""

    csv: Optional[str]
    folder: Optional[str]
    image_column: str
    caption_column: str
    delimiter: str


@dataclass(frozen=True)
class Item:
    """One listed pair, not yet read. The caption is given inline (CSV) or as a file (folder)."""

    key: str
    image_path: Optional[str]  # None: no image
    caption: Optional[bytes] = None
    caption_path: Optional[str] = None


@dataclass(frozen=True)
class Job:
    """Output shards first..last-1 of num_shards: the listed pairs j with j % num_shards
    in that range."""

    source: Source
    first: int
    last: int
    num_shards: int
    output: str
    prefix: str
    compressed: bool


# ---------------------------------------------------------------- listing


def iter_csv(source: Source) -> Iterator[Item]:
    """The rows of the CSV as Items, streamed."""
    base = os.path.dirname(os.path.abspath(source.csv))
    # surrogateescape: a caption with invalid UTF-8 must not stop the reading; it is
    # turned back into its bytes and skipped as bad_utf8 by the validation.
    with open(source.csv, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        for row_number, row in enumerate(csv.DictReader(f, delimiter=source.delimiter), start=2):
            path = (row.get(source.image_column) or "").strip()
            caption = row.get(source.caption_column)
            yield Item(
                key=path or f"row {row_number}",
                image_path=os.path.join(base, path) if path else None,
                caption=None if caption is None else caption.encode("utf-8", "surrogateescape"),
            )


def iter_folder(folder: str) -> Iterator[Item]:
    """Every image and every orphan caption file under ``folder`` as Items, in sorted order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()  # os.walk descends in this order: sorted makes the listing deterministic
        stems = {}
        for name in files:
            stem, ext = os.path.splitext(name)
            stems.setdefault(stem, set()).add(ext)
        for stem in sorted(stems):
            exts = stems[stem]
            txt = next((e for e in exts if e.lower() == ".txt"), None)
            caption_path = os.path.join(root, stem + txt) if txt else None
            images = sorted(e for e in exts if e[1:].lower() in common.IMAGE_EXTENSIONS)
            for ext in images:
                path = os.path.join(root, stem + ext)
                yield Item(os.path.relpath(path, folder), path, caption_path=caption_path)
            if caption_path and not images:
                yield Item(os.path.relpath(caption_path, folder), None, caption_path=caption_path)


def iter_items(source: Source) -> Iterator[Item]:
    return iter_csv(source) if source.csv else iter_folder(source.folder)


# ---------------------------------------------------------------- conversion


def read_item(item: Item) -> Tuple[Optional[bytes], Optional[bytes], Optional[str]]:
    """(image bytes, caption bytes, None), with None for what does not exist, or a skip
    reason if a file exists but cannot be read."""
    try:
        image = None
        if item.image_path and os.path.isfile(item.image_path):
            with open(item.image_path, "rb") as f:
                image = f.read()
        caption = item.caption
        if item.caption_path:
            with open(item.caption_path, "rb") as f:
                caption = f.read()
    except OSError:
        return None, None, common.SKIP_UNREADABLE
    return image, caption, None


def convert_shards(job: Job) -> common.ShardResult:
    """Write output shards job.first..job.last-1 from their share of the listing."""
    records = common.import_records()
    names = [records.shard_name(job.prefix, i, job.num_shards, job.compressed) for i in range(job.first, job.last)]
    paths = [os.path.join(job.output, name) for name in names]
    name = f"shard {job.first}" if len(paths) == 1 else f"shards {job.first}-{job.last - 1}"
    result = common.ShardResult(source=name, outputs=paths)
    with common.AtomicShards(paths, job.compressed) as out:
        for j, item in enumerate(iter_items(job.source)):
            if not job.first <= j % job.num_shards < job.last:
                continue  # another process's pair: not even read
            image, caption, reason = read_item(item)
            if not reason:
                caption, reason = common.check_pair(image, caption)
            if reason:
                result.skip(reason)
                continue
            out.write(image, caption, item.key)
            result.written += 1
    return result


def split_range(n: int, parts: int):
    """[0, n) as ``parts`` contiguous (first, last) ranges whose sizes differ by at most one."""
    bounds = [n * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------- command line


def source_from_args(args) -> Source:
    """Check the input given on the command line; exit with a message if it is unusable."""
    if args.folder:
        if not os.path.isdir(args.folder):
            common.fail(f"--folder={args.folder!r} is not a folder")
        return Source(None, args.folder, "", "", "")
    if not os.path.isfile(args.csv):
        common.fail(f"--csv={args.csv!r} is not a file")
    delimiter = args.delimiter or ("\t" if args.csv.lower().endswith(".tsv") else ",")
    delimiter = {"\\t": "\t"}.get(delimiter, delimiter)  # --delimiter='\t' as typed in a shell
    with open(args.csv, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    missing = [c for c in (args.image_column, args.caption_column) if c not in header]
    if missing:
        common.fail(f"{args.csv}: no column {', '.join(map(repr, missing))} in the header {header}")
    return Source(args.csv, None, args.image_column, args.caption_column, delimiter)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--csv", help="CSV/TSV file of image paths and captions")
    inputs.add_argument("--folder", help="folder of images with a .txt caption beside each")
    parser.add_argument("--image_column", default="filepath", help="CSV column of the image paths")
    parser.add_argument("--caption_column", default="title", help="CSV column of the captions")
    parser.add_argument("--delimiter", help=r"CSV delimiter, e.g. '\t' (default: tab for .tsv, else comma)")
    parser.add_argument("--output", required=True, help="folder of the TFRecord shards (created)")
    parser.add_argument("--num_shards", type=common.positive_int, default=1, help="number of output shards")
    parser.add_argument("--processes", type=common.positive_int, help="default: min(CPUs, num_shards)")
    parser.add_argument("--compress", action="store_true", help="GZIP the shards (.tfrecord.gz)")
    parser.add_argument("--prefix", default="data", help="output shard name prefix")
    args = parser.parse_args(argv)

    source = source_from_args(args)
    if next(iter_items(source), None) is None:
        common.fail(f"no image-caption pair in {args.csv or args.folder}")
    os.makedirs(args.output, exist_ok=True)
    processes = min(args.processes or os.cpu_count() or 1, args.num_shards)
    jobs = [
        Job(source, first, last, args.num_shards, args.output, args.prefix, args.compress)
        for first, last in split_range(args.num_shards, processes)
    ]
    common.report(common.run_jobs(convert_shards, jobs, processes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
