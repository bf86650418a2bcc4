"""Convert img2dataset WebDataset tar shards to clip_jax TFRecord shards.

    python data/webdataset_to_tfrecord.py --input='shards/*.tar' --output=tfrecords \
        [--shards_per_file=1] [--processes=N] [--compress] [--prefix=data]

Each input tar holds samples as members grouped by key: ``KEY.jpg`` (or .jpeg/.png/.webp)
and ``KEY.txt``, optionally ``KEY.json`` (ignored). Every tar becomes ``--shards_per_file``
output shards; with T input tars (sorted by path) the i-th one is written to
``PREFIX-{i*S+j:05d}-of-{T*S:05d}.tfrecord[.gz]``, j < S, so the output set is the usual
``PREFIX-*`` sharded dataset and the same input gives the same names.

Images are stored as they come (no re-encoding) once they decode. Skipped pairs are
counted per reason; a tar that cannot be opened or breaks partway is reported and the
run goes on (a broken tar keeps what came before the break). Exit status 0 unless the
glob matches no file.
"""

from __future__ import annotations

import argparse
import glob
import lzma
import os
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import _convert_common as common

# What a damaged or cut archive raises while being streamed (bad headers, data cut short,
# a broken gzip/bzip2/xz stream).
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Job:
    """One input tar: the i-th of the sorted inputs, and where its shards go."""

    tar_path: str
    index: int
    num_inputs: int
    output: str
    prefix: str
    shards_per_file: int
    compressed: bool

    def output_paths(self):
        """The names described in the module docstring (computed in the worker, which
        imports clip_jax; the parent stays light)."""
        records = common.import_records()
        s, total = self.shards_per_file, self.num_inputs * self.shards_per_file
        names = [records.shard_name(self.prefix, self.index * s + j, total, self.compressed) for j in range(s)]
        return [os.path.join(self.output, name) for name in names]


def split_name(name: str) -> Tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the base name,
    the extension (lower-cased) is the rest: 'a/0001.jpg' -> ('a/0001', 'jpg')."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def iter_samples(tar: tarfile.TarFile, tar_path: str, result: common.ShardResult) -> Iterator[Tuple[str, Dict]]:
    """Yield (key, {extension: bytes}) per sample of an open tar stream.

    Members of a sample are consecutive in a WebDataset tar, so a sample is complete when
    the key changes. A broken member ends the tar (a stream cannot be resynchronized): its
    sample is dropped and counted, the samples before it are kept.
    """
    key, members = None, {}
    while True:
        member = None
        try:
            member = tar.next()
            if member is None:
                break
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
        except ARCHIVE_ERRORS as e:
            where = member.name if member is not None else "(member header)"
            result.problem(f"{tar_path}: {where}: {e}; rest of the tar skipped")
            if member is not None:
                # The broken member's sample is lost, with whatever of it came before.
                result.skip(common.SKIP_BROKEN_MEMBER)
                if split_name(member.name)[0] == key:
                    members = {}
            break
        member_key, ext = split_name(member.name)
        if member_key != key:
            if members:
                yield key, members
            key, members = member_key, {}
        members[ext] = data
    if members:
        yield key, members


def image_of(members: Dict[str, bytes]) -> Optional[bytes]:
    """The sample's image bytes, the first of the image extensions present."""
    for ext in common.IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    return None


def convert_tar(job: Job) -> common.ShardResult:
    """Write the valid pairs of one tar to its output shards."""
    result = common.ShardResult(source=job.tar_path)
    try:
        # "r|*": a forward-only stream, with any compression, so a file cut short still
        # gives every member before the cut.
        tar = tarfile.open(job.tar_path, "r|*")
    except ARCHIVE_ERRORS as e:
        result.problem(f"{job.tar_path}: cannot open: {e}")
        return result
    output_paths = job.output_paths()
    with tar, common.AtomicShards(output_paths, job.compressed) as out:
        for key, members in iter_samples(tar, job.tar_path, result):
            image = image_of(members)
            caption, reason = common.check_pair(image, members.get("txt"))
            if reason:
                result.skip(reason)
                continue
            out.write(image, caption, key)
            result.written += 1
    result.outputs = output_paths
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="glob of the input .tar files (quote it)")
    parser.add_argument("--output", required=True, help="folder of the TFRecord shards (created)")
    parser.add_argument(
        "--shards_per_file", type=common.positive_int, default=1, help="output shards per input tar"
    )
    parser.add_argument("--processes", type=common.positive_int, help="default: min(CPUs, input tars)")
    parser.add_argument("--compress", action="store_true", help="GZIP the shards (.tfrecord.gz)")
    parser.add_argument("--prefix", default="data", help="output shard name prefix")
    args = parser.parse_args(argv)

    tar_paths = sorted(p for p in glob.glob(args.input, recursive=True) if os.path.isfile(p))
    if not tar_paths:
        common.fail(f"no input file matches --input={args.input!r}")
    os.makedirs(args.output, exist_ok=True)
    jobs = [
        Job(path, i, len(tar_paths), args.output, args.prefix, args.shards_per_file, args.compress)
        for i, path in enumerate(tar_paths)
    ]
    common.report(common.run_jobs(convert_tar, jobs, args.processes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
