"""What the data conversion scripts share: pair validation, atomic shard output, the
worker pool and the report.

A pair is written only if its image decodes and its caption is non-empty UTF-8; every
other pair is skipped and counted under one reason (the ``SKIP_*`` names below). Problems
with an input itself (a tar that cannot be opened, a broken tar member) are "problems":
reported with the path, never fatal.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from PIL import Image

# Skip reasons, as printed in the report.
SKIP_MISSING_IMAGE = "missing_image"
SKIP_CORRUPT_IMAGE = "corrupt_image"
SKIP_UNSUPPORTED_FORMAT = "unsupported_format"
SKIP_MISSING_CAPTION = "missing_caption"
SKIP_EMPTY_CAPTION = "empty_caption"
SKIP_BAD_UTF8 = "bad_utf8_caption"
SKIP_UNREADABLE = "unreadable_file"
SKIP_BROKEN_MEMBER = "broken_member"

# File extensions taken as images (lower case, no dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Stored formats: records.py's JPEG and PNG, and WebP, which img2dataset can write and the
# input pipeline's tf.io.decode_image reads. GIF/BMP/TIFF decode in PIL but are refused.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


def import_records():
    """Import clip_jax.input.records, also when the package is not installed (the scripts run
    as ``python data/script.py`` from a checkout)."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    from clip_jax.input import records

    return records


# ---------------------------------------------------------------- validation


def image_problem(data: bytes) -> Optional[str]:
    """The skip reason for encoded image bytes, or None if they decode to a usable image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.verify()
        # verify() checks the structure but does not decode the pixels, so a JPEG cut
        # short passes it; a full decode (a few ms at dataset image sizes) catches that.
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # PIL signals bad data with many types (OSError, SyntaxError, ValueError, ...)
        return SKIP_CORRUPT_IMAGE
    if image_format not in ACCEPTED_FORMATS:
        return SKIP_UNSUPPORTED_FORMAT
    return None


def check_pair(image: Optional[bytes], caption: Optional[bytes]) -> Tuple[Optional[str], Optional[str]]:
    """Validate one pair: (caption text, None) if it can be written, else (None, skip reason)."""
    if image is None:
        return None, SKIP_MISSING_IMAGE
    if caption is None:
        return None, SKIP_MISSING_CAPTION
    # The caption first: it is cheap to check, the image needs a decode.
    try:
        text = caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, SKIP_BAD_UTF8
    if not text:
        return None, SKIP_EMPTY_CAPTION
    reason = image_problem(image)
    if reason:
        return None, reason
    return text, None


# ---------------------------------------------------------------- per-shard result


@dataclass
class ShardResult:
    """What one worker did: the counts for one output shard set, and the problems met."""

    source: str
    outputs: List[str] = field(default_factory=list)
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    problems: List[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def line(self) -> str:
        """The one report line of this shard."""
        target = ", ".join(self.outputs) if self.outputs else "no output"
        return (
            f"{self.source}: wrote {self.written}, skipped {sum(self.skipped.values())}"
            f"{format_reasons(self.skipped)} -> {target}"
        )


def format_reasons(counts: Counter) -> str:
    """' (reason=n, ...)' sorted by reason, or '' when nothing was skipped."""
    if not counts:
        return ""
    return " (" + ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items())) + ")"


# ---------------------------------------------------------------- output


class AtomicShards:
    """A records.ShardWriter whose files appear under their final names only on success.

    The shards are written into a hidden temporary folder beside them and moved into place
    at the end, so an interrupted run never leaves a partial shard that looks complete, nor
    one that a glob of the output folder (``DIR/*.tfrecord``) picks up. On an error the
    temporary files are removed.
    """

    def __init__(self, final_paths: Sequence[str], compressed: bool):
        records = import_records()
        self.final_paths = list(final_paths)
        self.temp_dir = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(self.final_paths[0]) or ".")
        try:
            self.writer = records.ShardWriter(os.path.join(self.temp_dir, "part"), len(final_paths), compressed)
        except BaseException:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        self.serialize = records.serialize_example

    def write(self, image: bytes, caption: str, key: str) -> None:
        self.writer.write(self.serialize(image, caption, key))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.writer.close()
        if exc_type is None:
            for temp, final in zip(self.writer.paths, self.final_paths):
                os.replace(temp, final)  # atomic within one file system
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# ---------------------------------------------------------------- running and reporting


def run_jobs(worker: Callable, jobs: Sequence, processes: Optional[int]) -> Iterator[ShardResult]:
    """Run ``worker`` on every job, in a process pool when more than one process is asked
    for; results come back in job order, so the report is deterministic."""
    processes = min(processes or os.cpu_count() or 1, len(jobs))
    if processes <= 1:
        yield from map(worker, jobs)
        return
    # The parent has imported neither TensorFlow nor JAX at this point, so forking is safe;
    # each worker imports them once, on its first job.
    with multiprocessing.Pool(processes) as pool:
        yield from pool.imap(worker, jobs)


def report(results: Iterable[ShardResult]) -> None:
    """Print a line per shard (problems before it, on stderr), then the totals."""
    written, skipped, problems = 0, Counter(), 0
    for result in results:
        for message in result.problems:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        print(result.line(), flush=True)
        written += result.written
        skipped.update(result.skipped)
        problems += len(result.problems)
    print(f"written: {written} skipped: {sum(skipped.values())}{format_reasons(skipped)}")
    if problems:
        print(f"problems: {problems} (unreadable inputs or broken tar members, see the warnings)")


def positive_int(text: str) -> int:
    """argparse type of the counts (shards, processes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def fail(message: str) -> None:
    """Exit with a usage error."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
