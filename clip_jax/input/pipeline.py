"""tf.data input pipeline: image-text pairs from TFRecords, tfds or the embedded 'shapes' dataset.

Per host, one pass over its share of the data looks like this:

  files of this host (order shuffled per epoch from (seed, epoch, process))
    -> interleave the records (deterministic), a sentinel after each file
    -> byte accounting: a file that stops short of its size is an unreadable shard:
       reported with its path, its readable records kept
    -> shuffle buffer (seeded per epoch) -> enumerate: every raw record gets its position
    -> skip(position) on resume: raw bytes are skipped, nothing is decoded
    -> an end-of-epoch marker after each epoch's records
    -> parse the record features the batch keys read (one spec: clip_jax.input.reader) into
       {name: raw value}; each feature picks its value (one caption of several) and flags its
       bad kinds (missing image, empty or non-UTF-8 caption) -> cumulative counters
       (tf.data scan, so they describe exactly what was consumed)
    -> the record ops on the good records (decode + crop + normalize, SimCLR views:
       clip_jax.input.ops; parallel, deterministic); an image that fails to decode drops its
       record (counted on the host as 'undecodable')
    -> the stop (a second scan, over what decoded, sentinels and markers): a whole pass over
       the stream's files without one usable example, or data.max_bad_in_a_row bad records in
       a row, ends the stream with an in-graph error carrying the counts, which the host turns
       into NoUsableData naming the files (a finite stream's end travels the same way)
    -> drop bad records -> batch (host batch = global batch / processes) -> the batch ops
       (tokenize) -> prefetch

Which batch keys, from which features, by which ops: the `inputs` a method declares
(clip_jax.methods.base.BatchInput), resolved through clip_jax.input.ops and .features.

Streams: the data is read as `streams` independent streams (config `data.streams`;
default one per process), stream s reading whole files files[s::streams] (or the s-th
tfds.even_splits slice) with its own seeds, and contributing global_batch / streams rows
to every global batch, in stream order. Each process runs a contiguous block of streams.
So the global batches depend on the stream count, not on the process count: a job with
4 streams sees the same data on 1, 2 or 4 processes, and can resume on any of them.

Resumption is deterministic by construction: the state is a few integers (epoch,
position of the next raw record, counters); a resumed run builds the same stream and skips
to the position, so it sees exactly the batches an uninterrupted run would have seen.
Per-example randomness (crop boxes, caption choice) derives from (seed, epoch, position).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import queue
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from clip_jax.input import ops, reader, records
from clip_jax.input.features import Reading, resolve
from clip_jax.input.settings import data_settings
from clip_jax.registry import Registry

# A record's status is the first kind it is (1-based, _check), but records that do not parse are
# counted per file (not_an_example, on the file's sentinel).
BAD_KINDS = ("missing_image", "empty_caption", "invalid_utf8_caption", "unreadable_shard", "not_an_example",
             "missing_mask", "bad_mask",  # the masks': clip_jax.input.segmentation
             "bad_boxes",  # the boxes': clip_jax.input.detection
             "bad_regions",  # the region embeddings': clip_jax.input.regions
             "missing_audio", "bad_audio", "empty_audio", "nonfinite_audio",  # the clips': clip_jax.input.audio
             "missing_frames", "bad_frames")  # the video clips': clip_jax.input.video
COUNTED_KINDS = BAD_KINDS + ("undecodable",)  # undecodable: seen, neither flagged nor usable (the host's count)
END_OF_STREAM = 3  # the stop of a finite stream (num_epochs) at its last marker: not an error
STOP_REASONS = {1: "a whole pass over its files without one usable example",
                2: "data.max_bad_in_a_row bad records in a row"}
_MASK31 = (1 << 31) - 1
PICK_SALT = 4  # the per-example seed of a feature's pick (one caption of several)


class NoUsableData(ValueError):
    """A data stream that yields nothing usable: stopped rather than read forever."""


# -- sources ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # 'tfrecord' | 'tfds' | 'shapes' | 'shapes_scenes' | 'shapes_video'
    name: str = ""  # tfds name[/config]; tfrecord glob(s)
    split: str = "train"
    lang: str = "en"  # shapes: the language of its captions ('shapes:SPLIT|lang=zh')
    caption_feature: str = records.CAPTION  # the record feature holding its captions (shapes: per language)


# Data source kinds: 'KIND[:REST]' -> Source, by the parser registered for KIND.
SOURCES: Registry = Registry("data source")
_SPEC_FORMS = ("'shapes[:SPLIT][|lang=zh]', 'shapes_video[:SPLIT]', 'tfds:NAME[/CONFIG][:SPLIT]' or "
               "'tfrecord:GLOB[,GLOB...]'")


@SOURCES.register("shapes")
def _shapes_source(rest: str) -> Source:
    from clip_jax.input import shapes

    split, lang = shapes.parse_source(rest)
    return Source("shapes", split=split, lang=lang, caption_feature=shapes.caption_feature(lang))


@SOURCES.register("shapes_scenes")
def _scenes_source(rest: str) -> Source:
    from clip_jax.input import shapes, shapes_scenes

    split, lang = shapes_scenes.parse_source(rest)
    return Source("shapes_scenes", split=split, lang=lang, caption_feature=shapes.caption_feature(lang))


@SOURCES.register("shapes_video")
def _video_source(rest: str) -> Source:
    from clip_jax.input import shapes_video

    return Source("shapes_video", split=shapes_video.parse_source(rest))


@SOURCES.register("tfds")
def _tfds_source(rest: str) -> Source:
    name, _, split = rest.partition(":")  # the split may hold ':' itself (train[:10%])
    if not name:
        raise ValueError(f"no dataset name in 'tfds:{rest}': expected tfds:NAME[/CONFIG][:SPLIT]")
    return Source("tfds", name, split or "train")


@SOURCES.register("tfrecord")
def _tfrecord_source(rest: str) -> Source:
    if not rest:
        raise ValueError("no files in 'tfrecord:': expected tfrecord:GLOB[,GLOB...]")
    return Source("tfrecord", rest)


def parse_spec(spec: str) -> Source:
    """'tfds:NAME[/CONFIG][:SPLIT]', 'tfrecord:GLOB[,GLOB...]', 'shapes[:SPLIT][|lang=zh]'."""
    if not spec or not isinstance(spec, str):
        raise ValueError(f"empty data spec {spec!r}: use {_SPEC_FORMS}")
    kind, _, rest = spec.partition(":")
    if kind not in SOURCES:
        raise ValueError(f"unknown data spec {spec!r}: use {_SPEC_FORMS} (sources: {', '.join(SOURCES)})")
    return SOURCES.get(kind)(rest)


def list_files(patterns: str) -> list[str]:
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    files, by = [], {}
    for pattern in patterns.split(","):
        # a dataset's JSON beside its shards (regions.json, the converters' classes) is no shard of 'DIR/*'
        matched = sorted(p for p in tf.io.gfile.glob(pattern.strip()) if not p.endswith(".json"))
        if not matched:
            raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
        for path in matched:  # read twice a pass, a shard would silently weigh double
            if path in by:
                raise ValueError(f"{path} is matched twice (by {by[path]!r} and {pattern.strip()!r}): list each shard "
                                 "once")
            by[path] = pattern.strip()
        files += matched
    return files


def embedded_files(source: Source, config) -> Optional[list[str]]:
    """The shards of an embedded dataset's split (shapes, shapes_scenes, shapes_video), made on first use; None for
    other kinds."""
    if source.kind == "shapes_video":
        from clip_jax.input.shapes_video import video_files

        return video_files(source.split, config)
    if source.kind == "shapes_scenes":
        from clip_jax.input.shapes_scenes import scenes_files

        return scenes_files(source.split, config)
    return shapes_files(source.split, config) if source.kind == "shapes" else None


def shapes_files(split: str, config) -> list[str]:
    from clip_jax.input import shapes

    config = data_settings(config)

    paths = shapes.ensure_shapes_dataset(
        cache_dir=config["cache_dir"] or os.path.join(os.path.expanduser("~"), ".cache", "clip_jax"),
        seed=config["shapes_seed"],
        image_size=config["shapes_image_size"],
        sizes=dict(config["shapes_sizes"]),
        num_shards=dict(config["shapes_shards"]) or None,
    )
    return list(paths[split])


# -- state --------------------------------------------------------------------------
@dataclasses.dataclass
class InputState:
    """Where one stream is: the next raw record (epoch, position), and counters."""

    epoch: int = 0
    position: int = 0
    examples: int = 0
    bad: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(COUNTED_KINDS, 0))
    # the ops' per-record counts over the records yielded (ops.Op.tallies: boxes dropped, by rule)
    tallies: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputState":
        bad = dict.fromkeys(COUNTED_KINDS, 0)
        bad.update({k: int(v) for k, v in d["bad"].items()})
        tallies = {k: int(v) for k, v in d.get("tallies", {}).items()}
        return cls(int(d["epoch"]), int(d["position"]), int(d["examples"]), bad, tallies)


def _mix(*ints: int) -> int:
    """A 31-bit seed from several integers (stable across runs and machines)."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(1)[0]) & _MASK31


def stream_count(config, global_batch_size: int, process_count: int) -> int:
    """The job's number of data streams (config 'streams'; 0 = one per process), checked."""
    config = data_settings(config)
    streams = int(config["streams"] or process_count)
    if streams % process_count:
        raise ValueError(
            f"data.streams={streams} does not divide over {process_count} processes: "
            f"use a multiple of {process_count} (or 0 for one stream per process)"
        )
    if global_batch_size % streams:
        raise ValueError(
            f"global batch {global_batch_size} does not divide over {streams} data streams "
            f"({process_count} processes): use a multiple of {streams}"
        )
    return streams


class _Stream:
    """One stream: files[index::count] (or a tfds slice), its own seeds and state, `batch_size` rows per batch."""

    def __init__(self, source: Source, files: Optional[list[str]], config, *, batch_size: int, image_size: int,
                 train: bool, seed: int, index: int, count: int, context_length: int, tokenizer,
                 state: Optional[InputState], num_epochs: Optional[int], inputs: list):
        self.source = source
        self.inputs = inputs  # [(ops.Wanted, ops.Op)]: the batch keys and what makes them
        self.features = ops.features_read(inputs)  # the raw record features they read
        caption_key = source.caption_feature if source.kind != "tfds" else (config["caption_key"] or "caption")
        self.reading = Reading(source, config, caption_key, tuple(config["label_keys"]))
        self.config = config
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.index = index
        self.count = count
        self.context_length = context_length
        self.num_epochs = num_epochs
        self.tokenizer = tokenizer
        self._state = state or InputState()
        self._files = files
        self._iterator = None
        self._ended: Optional[BaseException] = None  # how the stream ended (its error, or StopIteration)

    # -- the raw stream of one epoch (built in-graph: `epoch` is a tensor) --------------
    def _seed(self, salt: int, epoch):
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        return tf.stack([tf.constant(_mix(self.seed, self.index, salt), tf.int64), tf.cast(epoch, tf.int64)])

    def _example_seed(self, salt: int, epoch, position):
        """Stateless seed of one example: from (seed, stream, salt), its epoch and its raw position."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        return tf.stack([tf.constant(_mix(self.seed, self.index, salt), tf.int64) + epoch, position])

    def _tfrecord_epoch(self, epoch):
        """{features: {name: raw value}, sentinel, short (the shard read short), unparsed (records of the
        file that did not parse, on its sentinel)} of this stream's files."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        files = tf.constant(self._files)
        n = len(self._files)
        order = tf.range(n, dtype=tf.int64)
        if self.train:
            order = tf.random.experimental.stateless_shuffle(order, seed=self._seed(1, epoch))
        compressed = any(f.endswith(".gz") for f in self._files)
        sizes = tf.constant([tf.io.gfile.stat(f).length for f in self._files], tf.int64)

        def read(i):
            body = tf.data.TFRecordDataset(tf.gather(files, i), compression_type="GZIP" if compressed else "")
            body = body.ignore_errors()  # a corrupt shard ends early; `account` reports it
            body = body.map(_plain(lambda r: (i, r, False)))
            return body.concatenate(tf.data.Dataset.from_tensors((i, tf.constant(b""), True)))

        ds = tf.data.Dataset.from_tensor_slices(order).interleave(
            _plain(read), cycle_length=min(16, n), block_length=1, deterministic=True,
            num_parallel_calls=tf.data.AUTOTUNE
        )

        def account(read, element):
            read_bytes, read_records = read
            i, record, sentinel = element
            # TFRecord framing: 8-byte length, 4-byte CRC, data, 4-byte CRC.
            read_bytes = tf.tensor_scatter_nd_add(read_bytes, [[i]],
                                                  [tf.cast(tf.strings.length(record), tf.int64) + 16])
            read_records = tf.tensor_scatter_nd_add(read_records, [[i]], [1 - tf.cast(sentinel, tf.int64)])
            short = tf.logical_and(sentinel, tf.gather(read_bytes, i) - 16 < tf.gather(sizes, i))
            if compressed:  # sizes are of the compressed files: no byte accounting
                short = tf.constant(False)
            else:
                tf.cond(short,
                        lambda: _report_short(tf.gather(files, i), tf.gather(read_bytes, i) - 16, tf.gather(sizes, i)),
                        tf.no_op)
            return (read_bytes, read_records), (i, record, sentinel, short, tf.gather(read_records, i))

        zeros = tf.zeros([n], tf.int64)
        ds = ds.scan((zeros, zeros), _plain(account))
        spec = reader.example_spec(self.features, self.reading)

        def parse(i, record, sentinel, short, records_of_file):
            raw = reader.parse_example(tf.where(sentinel, tf.constant(b""), record), self.features, self.reading, spec)
            return i, raw, sentinel, short, records_of_file

        def tally(parsed, element):
            """A file's sentinel carries how many of its records did not parse: read minus parsed."""
            i, raw, sentinel, short, records_of_file = element
            parsed = tf.tensor_scatter_nd_add(parsed, [[i]], [1 - tf.cast(sentinel, tf.int64)])
            unparsed = tf.where(sentinel, records_of_file - tf.gather(parsed, i), tf.constant(0, tf.int64))
            return parsed, {"features": raw, "sentinel": sentinel, "short": short, "unparsed": unparsed}

        # Records whose bytes are no tf.train.Example (or hold a feature of another type) fail to
        # parse and are dropped here; `tally` counts them per file, in order, before the shuffle.
        ds = ds.map(_plain(parse), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
        return ds.scan(zeros, _plain(tally))

    def _tfds_epoch(self, epoch):
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        import tensorflow_datasets as tfds

        builder = tfds.builder(self.source.name, data_dir=self.config["data_dir"] or None)
        split = tfds.even_splits(self.source.split, n=self.count, drop_remainder=False)[self.index]
        decoders = reader.tfds_decoders(self.features, self.reading)
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)

        def select(ex):
            return {"features": reader.from_tfds(ex, self.features, self.reading), "sentinel": tf.constant(False),
                    "short": tf.constant(False), "unparsed": tf.constant(0, tf.int64)}

        return ds.map(_plain(select), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _epoch(self, epoch, skip: int = 0):
        """One epoch as {epoch, position, features, sentinel, short, unparsed}, skipping `skip` raw records,
        then an end-of-epoch marker (a sentinel at position -1)."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        epoch = tf.cast(epoch, tf.int64)
        ds = self._tfds_epoch(epoch) if self.source.kind == "tfds" else self._tfrecord_epoch(epoch)
        if self.train:
            seed = tf.constant(_mix(self.seed, self.index, 2), tf.int64) + epoch * 1_000_003
            ds = ds.shuffle(self.config["shuffle_buffer"], seed=seed, reshuffle_each_iteration=False)
        ds = ds.enumerate().map(_plain(lambda pos, x: dict(x, epoch=epoch, position=pos)))
        if skip:
            ds = ds.skip(skip)
        # The epoch's end, as a sentinel: even an epoch with no record (or none that decodes) is seen.
        marker = {"features": reader.empty(self.features, self.reading), "sentinel": tf.constant(True),
                  "short": tf.constant(False), "unparsed": tf.constant(0, tf.int64), "epoch": epoch,
                  "position": tf.constant(-1, tf.int64)}
        return ds.concatenate(tf.data.Dataset.from_tensors(marker))

    # -- the whole stream ---------------------------------------------------------------
    def _build(self):
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        start = self._state
        # Later epochs: a tensor epoch through flat_map, so one pipeline runs across epochs.
        last = start.epoch + self.num_epochs if self.num_epochs else 2**62
        ds = self._epoch(start.epoch, start.position)
        if start.epoch + 1 < last:
            ds = ds.concatenate(tf.data.Dataset.range(start.epoch + 1, last).flat_map(_plain(self._epoch)))
        ds = ds.map(_plain(self._check), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.scan(tf.zeros([len(BAD_KINDS) + 1], tf.int64), _plain(_count))  # in order: exact counters
        # Bad records, sentinels and markers pass the decode untouched: the stop sees every epoch.
        ds = ds.map(_plain(self._decode), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
        whole_from = start.epoch if start.position == 0 else start.epoch + 1  # a resumed epoch is not a pass
        stop = functools.partial(_stop, whole_from=whole_from, max_bad_in_a_row=int(self.config["max_bad_in_a_row"]),
                                 last_epoch=last - 1 if self.num_epochs else -1)
        zero = tf.constant(0, tf.int64)
        ds = ds.scan((tf.constant(start.epoch - 1, tf.int64), zero, zero), _plain(stop))
        ds = ds.filter(_plain(lambda ex: tf.equal(ex["status"], 0)))
        ds = ds.batch(self.batch_size, drop_remainder=True)
        ds = ds.map(_plain(self._batch_ops), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        options = tf.data.Options()
        options.deterministic = True
        if self.config["threads"]:
            options.threading.private_threadpool_size = int(self.config["threads"])
        return ds.with_options(options).prefetch(self.config["prefetch"])

    def _context(self, ex=None) -> ops.OpContext:
        """What the ops work with; for one record (`ex`), its stateless seeds."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        dtype = {"float32": tf.float32, "bfloat16": tf.bfloat16, "uint8": tf.uint8}[self.config["image_dtype"]]
        seed = None if ex is None else (lambda salt: self._example_seed(salt, ex["epoch"], ex["position"]))
        return ops.OpContext(self.image_size, self.train, self.config, dtype, seed, self.tokenizer,
                             self.context_length)

    def _check(self, ex):
        """Picks each feature's value of the example (one caption of several), then its status: 0 = good;
        1.. = BAD_KINDS (the first the features flag, in that order); -1 = a file-end sentinel or an
        end-of-epoch marker (dropped, not counted)."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        seed = self._example_seed(PICK_SALT, ex["epoch"], ex["position"])
        picked, flags = {}, []
        for name, feature in resolve(self.features):
            value = ex["features"][name]
            picked[name] = value = feature.pick(value, seed, self.train) if feature.pick else value
            flags += [(BAD_KINDS.index(kind) + 1, bad(value)) for kind, bad in feature.checks]
        for w, op in self.inputs:  # checks across a key's features (a mask against its image)
            flags += [(BAD_KINDS.index(kind) + 1, bad(picked, w)) for kind, bad in op.checks]
        cases = [(ex["short"], lambda: tf.constant(4, tf.int64)), (ex["sentinel"], lambda: tf.constant(-1, tf.int64))]
        flags.sort(key=lambda flag: flag[0])
        cases += [(bad, lambda status=status: tf.constant(status, tf.int64)) for status, bad in flags]
        status = tf.case(cases, default=lambda: tf.constant(0, tf.int64), exclusive=False)
        return {"epoch": ex["epoch"], "position": ex["position"], "features": picked, "status": status,
                "unparsed": ex["unparsed"]}

    def _decode(self, ex):
        """The record ops on a good record (decode, crop, SimCLR views: an image that fails to decode
        raises, and ignore_errors drops the record); any other gets their blanks. Features that batch ops
        read travel on as `carry`."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        ctx = self._context(ex)
        features = ex["features"]
        decoding = [(w, op) for w, op in self.inputs if op.stage == "record" and op.blank is not None]
        keys = {}
        for w, op in self.inputs:
            if op.stage == "record" and op.blank is None:
                keys.update(op.made(w, op.make(ctx, features, w)))
        if decoding:
            good = tf.equal(ex["status"], 0)
            made = tf.cond(good, lambda: [op.make(ctx, features, w) for w, op in decoding],
                           lambda: [op.blank(ctx, w) for w, op in decoding])
            for (w, op), value in zip(decoding, made):
                keys.update(op.made(w, value))
        carry = {name: features[name] for w, op in self.inputs if op.stage == "batch" for name in w.reads}
        return {"epoch": ex["epoch"], "position": ex["position"], "status": ex["status"], "counts": ex["counts"],
                "keys": keys, "carry": carry}

    def _batch_ops(self, batch):
        """The batch ops (tokenize), then one flat dict: the batch keys beside the bookkeeping."""
        ctx = self._context()
        keys = dict(batch["keys"])
        for w, op in self.inputs:
            if op.stage == "batch":
                keys[w.key] = op.make(ctx, batch["carry"], w)
        return {"epoch": batch["epoch"], "position": batch["position"], "status": batch["status"],
                "counts": batch["counts"], **keys}

    # -- iteration ------------------------------------------------------------------
    def __next__(self) -> dict[str, Any]:
        if self._ended is not None:
            raise self._ended
        if self._iterator is None:
            self._base = InputState.from_dict(self._state.to_dict())
            self._iterator = iter(self._build())
        failed = None
        try:
            batch = next(self._iterator)
        except BaseException as e:  # noqa: BLE001  (every end stops the stream's readers before it is raised)
            failed = e
        if failed is not None:  # raised outside the except: the stop's tf error is not kept as its context
            self._ended = self._end_of(failed)
            traceback.clear_frames(failed.__traceback__)  # its finished frames would hold the iterator alive
            self.close()
            raise self._ended
        out = {k: v.numpy() for k, v in batch.items()}
        del out["status"]
        self._update_state(out)
        return out

    def _end_of(self, error: BaseException) -> BaseException:
        """What the stream raises for the error its iterator raised: the in-graph stop (_stop) becomes
        NoUsableData, or StopIteration at a finite stream's end; any other error is itself."""
        from clip_jax.input.tf_runtime import import_tensorflow

        if not isinstance(error, import_tensorflow().errors.InvalidArgumentError):
            return error
        stopped = _STOPPED.search(error.message)
        if stopped is None:
            return error
        counts, epoch, reason, usable = (np.array(stopped[i].split(), np.int64) for i in (1, 2, 3, 4))
        if int(reason[0]) == END_OF_STREAM:  # a finite stream's end: its final counts, then the end
            self._state.bad = self._bad(counts, int(usable[0]))
            return StopIteration()
        return self._no_usable_data(counts, epoch, reason, int(usable[0]))

    def _no_usable_data(self, counts, epoch, reason, usable: int) -> NoUsableData:
        bad = self._bad(counts, usable)
        reason = STOP_REASONS[int(reason[0])]
        where = (f"{self.source.kind}:{self.source.name or self.source.split}" if self._files is None
                 else list_paths(self._files))
        kinds = ", ".join(f"{k}={v}" for k, v in bad.items() if v) or "none of the known kinds"
        n = int(counts[-1])
        return NoUsableData(
            f"data stream {self.index} of {self.count} read {reason} and stopped, {n} record{'s' if n != 1 else ''} "
            f"read (epoch {int(epoch[0])}), {usable} usable; bad records: "
            f"{kinds}. Files: {where}. Training reads TFRecords of tf.train.Example with an encoded image "
            f"under '{records.IMAGE}' and a caption under '{records.CAPTION}' (data/*_to_tfrecord.py writes them)")

    def _update_state(self, batch):
        base = self._base
        counts = batch["counts"][-1]  # cumulative since this pipeline was built, as of the last example
        self._state.epoch = int(batch["epoch"][-1])
        self._state.position = int(batch["position"][-1]) + 1
        self._state.examples += len(batch["epoch"])
        self._state.bad = self._bad(counts, self._state.examples - base.examples)
        for w, op in self.inputs:
            for key, names in (op.tallies(w) if op.tallies is not None else {}).items():
                for name, n in zip(names, np.asarray(batch[key]).sum(0)):
                    self._state.tallies[name] = self._state.tallies.get(name, 0) + int(n)

    def _bad(self, counts, usable: int) -> dict:
        """Bad-record counts from this pipeline's in-graph counters (as of one record) and the usable
        records up to it: the undecodable ones are those seen, neither flagged nor usable."""
        base = self._base
        bad = {kind: base.bad[kind] + int(counts[i]) for i, kind in enumerate(BAD_KINDS)}
        flagged = int(sum(counts[: len(BAD_KINDS)]))
        bad["undecodable"] = base.bad["undecodable"] + max(0, int(counts[-1]) - flagged - usable)
        return bad

    def state(self) -> InputState:
        return InputState.from_dict(self._state.to_dict())

    def close(self) -> None:
        """Ends the stream's tf.data iterator, whose destruction stops and joins its reader threads: nothing
        they run (an unreadable shard's warning) prints after this returns. A later next() raises how the
        stream ended, or that it was closed."""
        if self._ended is None:
            self._ended = ValueError(f"data stream {self.index} of {self.count} was closed")
        self._iterator = None



class InputPipeline:
    """Iterates host-local batches {'image': [b, S, S, 3], 'tokens': [b, ctx] int32, ...} forever.

    The host batch is the rows of this process's streams, in stream order. ``state()``
    after a batch (one InputState per stream of this process) is what to checkpoint;
    ``InputPipeline(..., state=states)`` resumes right after the last batch taken, where
    `states` holds either this process's streams or all streams of the job.
    """

    def __init__(
        self,
        spec: str,
        config,
        *,
        global_batch_size: int,
        image_size: int,
        train: bool,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        context_length: int = 77,
        tokenizer=None,
        state: Optional[Sequence[InputState]] = None,
        num_epochs: Optional[int] = None,
        inputs: Optional[Sequence[Any]] = None,
    ):
        """inputs: the batch keys to make, as a method declares them (clip_jax.methods.base.BatchInput:
        key, op, reads, options; resolved by clip_jax.input.ops); None: ops.DEFAULT_INPUTS."""
        config = data_settings(config)
        resolved = ops.resolve(inputs)
        if not resolved:
            raise ValueError("no batch keys to make (inputs=()): declare at least one BatchInput, or pass inputs=None "
                             "for the default keys")
        if ops.store_of(resolved) is not None:
            raise ValueError(f"batch keys {[w.key for w, _ in resolved]} come from a store, not from records: open "
                             "them with clip_jax.input.training.training_batches")
        streams = stream_count(config, global_batch_size, process_count)
        self.source = parse_spec(spec)
        self.streams = streams
        self.process_index = process_index
        self.process_count = process_count
        self.batch_size = global_batch_size // process_count
        per_process = streams // process_count
        self.stream_ids = list(range(process_index * per_process, (process_index + 1) * per_process))
        if state is not None:
            state = list(state)
            if len(state) == streams:
                state = [state[s] for s in self.stream_ids]
            elif len(state) != per_process:
                raise ValueError(
                    f"the saved input position has {len(state)} streams; this job reads {streams} "
                    f"(data.streams): resume with the stream count the run started with"
                )
        if tokenizer is None:
            from clip_jax.tokenizers import get_tokenizer

            tokenizer = get_tokenizer()
        all_files = self._all_files(config)  # fails early on a bad spec / missing data
        for w, op in resolved:
            if op.probe is not None:
                op.probe(all_files, w)
        self._streams = [
            _Stream(self.source, all_files[s::streams] if all_files is not None else None, config,
                    batch_size=global_batch_size // streams, image_size=image_size, train=train, seed=seed,
                    index=s, count=streams, context_length=context_length, tokenizer=tokenizer,
                    state=state[k] if state is not None else None, num_epochs=num_epochs, inputs=resolved)
            for k, s in enumerate(self.stream_ids)
        ]
        self._ended: Optional[BaseException] = None  # how the pipeline ended (a stream's error or end), or closed

    def _all_files(self, config) -> Optional[list[str]]:
        kind = self.source.kind
        if kind == "tfds":
            return None
        files = embedded_files(self.source, config) or list_files(self.source.name)
        if len(files) < self.streams:
            raise ValueError(
                f"{len(files)} files for {self.streams} data streams ({self.process_count} processes): each stream "
                f"reads whole files, so write at least {self.streams} shards (data/*_to_tfrecord.py --num_shards) "
                f"or set data.streams lower"
            )
        return files

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._ended is not None:
            raise self._ended
        try:
            parts = [next(s) for s in self._streams]
        except BaseException as e:  # one stream's end or error ends them all: the others' readers stop before it shows
            self._ended = e
            self.close()
            raise
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def state(self) -> list[InputState]:
        return [s.state() for s in self._streams]

    def bad_records(self) -> dict:
        """Bad-record counts of this process's streams, summed by kind."""
        out: dict = {}
        for s in self._streams:
            for k, v in s.state().bad.items():
                out[k] = out.get(k, 0) + v
        return out

    def tallies(self) -> dict:
        """The ops' per-record counts (ops.Op.tallies: boxes dropped, by rule) over this process's streams,
        summed by name."""
        out: dict = {}
        for s in self._streams:
            for k, v in s.state().tallies.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        """Stops every stream's readers (joined: nothing of theirs prints after this returns); a later
        next() raises how the pipeline ended, or that it was closed."""
        if self._ended is None:
            self._ended = ValueError(f"the input pipeline of {self.source.kind}:{self.source.name or self.source.split}"
                                     " was closed")
        for s in self._streams:
            s.close()


# -- in-graph helpers ------------------------------------------------------------------
def _plain(fn):
    """A tf.data function traced as written: no autograph rewrite (the control flow here is
    explicit tf.cond / tf.case), which takes seconds per pipeline build otherwise."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    return tf.autograph.experimental.do_not_convert(fn)


def _report_short(path, read, size):
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    tf.print("clip_jax input: unreadable shard", path, "- read", read, "of", size,
             "bytes; the records after the damage are skipped", output_stream=sys.stderr)
    return tf.no_op()


def _count(counts, ex):
    """counts[:-1]: BAD_KINDS so far; counts[-1]: raw records seen (sentinels and markers excluded)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    status = ex["status"]
    unparsed = ex.pop("unparsed")
    bad = tf.one_hot(status - 1, len(BAD_KINDS), dtype=tf.int64)  # status 0 / -1 -> zeros
    bad = bad + unparsed * tf.one_hot(BAD_KINDS.index("not_an_example"), len(BAD_KINDS), dtype=tf.int64)
    seen = tf.cast(status != -1, tf.int64) + unparsed
    counts = counts + tf.concat([bad, [seen]], 0)
    ex = dict(ex, counts=counts)
    return counts, ex


# The stop travels to the host as an in-graph error (it ends the stream where it is raised),
# its figures in the message: counters, epoch, reason, usable records.
_STOP_MESSAGE = "clip_jax input stopped"
_STOPPED = re.compile(re.escape(_STOP_MESSAGE) + r"\W*" + r"\W*".join([r"\[([-\d ]+)\]"] * 4))


def _stop(carry, ex, whole_from: int, max_bad_in_a_row: int = 0, last_epoch: int = -1):
    """Where the stream gives up, over the records that decoded plus the sentinels and the
    end-of-epoch markers. carry: (the last epoch with a usable record, raw records seen at it,
    usable records so far).
    Reasons (STOP_REASONS): 1 at the marker of an epoch >= `whole_from` (read whole) without a
    usable record; 2 where the last max_bad_in_a_row records seen were all bad (flagged or
    undecodable). A stop raises (_STOP_MESSAGE) after every usable record before it."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    good_epoch, good_seen, usable = carry
    good = tf.equal(ex["status"], 0)
    usable = usable + tf.cast(good, tf.int64)
    seen = ex["counts"][-1]
    good_epoch = tf.where(good, ex["epoch"], good_epoch)
    good_seen = tf.where(good, seen, good_seen)
    marker = tf.equal(ex["position"], -1)
    empty_pass = marker & (ex["epoch"] >= whole_from) & (good_epoch < ex["epoch"])
    reason = tf.where(empty_pass, tf.constant(1, tf.int64), tf.constant(0, tf.int64))
    # a finite stream's last marker ends it the same way, so its final counts reach the host
    reason = tf.where((reason == 0) & marker & tf.equal(ex["epoch"], last_epoch), tf.constant(END_OF_STREAM, tf.int64),
                      reason)
    if max_bad_in_a_row:
        too_many = tf.logical_and(reason == 0, seen - good_seen >= max_bad_in_a_row)
        reason = tf.where(too_many, tf.constant(2, tf.int64), reason)
    # A pure op that fails with the message on a stop (a stateful assertion here costs the whole
    # pipeline ~8% of its throughput: tf.data stops optimizing around it).
    text = tf.cond(tf.equal(reason, 0), lambda: tf.constant("0"), lambda: tf.strings.format(
        _STOP_MESSAGE + " {} {} {} {}", (ex["counts"], [ex["epoch"]], [reason], [usable]), summarize=-1))
    zero = tf.strings.to_number(text, tf.int64)
    status = ex["status"] + zero
    return (good_epoch, good_seen, usable), dict(ex, status=status)


def list_paths(files: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(files[:most])
    return shown + (f" and {len(files) - most} more" if len(files) > most else "")


# -- host batch -> global jax.Array ------------------------------------------------------
MODEL_INPUTS = ("image", "tokens")


def to_global_arrays(batch: dict, sharding, keys=MODEL_INPUTS) -> dict:
    """Host-local numpy batches of every process -> one global jax.Array per key.

    ``sharding`` splits the leading (batch) axis over the mesh's data axes; each process
    passes only its own rows, in process order (jax.make_array_from_process_local_data).
    """
    import jax

    out = {}
    for key in keys:
        local = batch[key]
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


class InputInterrupted(RuntimeError):
    """A wait for the next host batch cut short by DevicePrefetch's `interrupted` (a SIGTERM)."""


_READERS: list = []  # DevicePrefetch reader threads, for input_reader_stuck


def input_reader_stuck() -> bool:
    """Whether a reader thread was left waiting inside tf.data (an input wait was interrupted): a
    process exiting then must leave with os._exit, as the interpreter's teardown aborts on it."""
    return any(t.is_alive() for t in _READERS)


class DevicePrefetch:
    """Global batches put on the devices ahead of the step that uses them.

    `size` batches are in flight when a step is dispatched: its own and the next size-1. Their
    host-to-device copies run while earlier steps compute, so a step never waits on a transfer.
    Each batch carries the input position after it: `state()` is where the steps (not the
    prefetcher) have got to, which is what a checkpoint must save.

    `interrupted` (a function, e.g. "has SIGTERM arrived"): host batches are then read by a
    background thread and a wait for one is cut short (InputInterrupted) once it returns True:
    a job stuck on its input (a stalled filesystem) still obeys a preemption notice, which a wait
    inside tf.data's C++ would hold off forever.
    """

    def __init__(self, pipe: "InputPipeline", sharding, size: int = 2, keys: Sequence[str] = MODEL_INPUTS,
                 interrupted: Optional[Callable[[], bool]] = None):
        if size < 1:
            raise ValueError(f"device prefetch size must be >= 1, got {size}")
        self.pipe, self.sharding, self.size, self.keys = pipe, sharding, size, tuple(keys)
        self.interrupted = interrupted
        self._queue: collections.deque = collections.deque()
        self._state = pipe.state()
        self._host: Optional[queue.Queue] = None  # (host batch, position after it) or the reader's exception
        self._ended: Optional[BaseException] = None
        self._reader: Optional[threading.Thread] = None
        self._closing = threading.Event()

    def __iter__(self):
        return self

    def _read(self) -> None:
        """The reader thread: host batches with the position after each, one ahead at most, until
        close(); the pipeline is closed by this thread, the one that reads it, on its way out."""
        try:
            while not self._closing.is_set():
                try:
                    item = (next(self.pipe), self.pipe.state())
                except BaseException as e:  # noqa: BLE001  (StopIteration, NoUsableData, ...: re-raised by the caller)
                    item = e
                while not self._closing.is_set():
                    try:
                        self._host.put(item, timeout=0.25)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, BaseException):
                    return
        finally:
            self.pipe.close()

    def close(self, wait_s: float = 120.0) -> None:
        """Stop the reader thread and the pipeline's readers, so that nothing of theirs prints after an
        error the caller goes on to raise. The read in flight is waited for, up to `wait_s` and no longer
        once `interrupted` (SIGTERM): a thread left inside a stalled read stays, and closes the pipeline
        if it ever leaves it (input_reader_stuck)."""
        self._closing.set()
        if self._reader is None:  # no reader thread was started: the pipeline is read here
            self.pipe.close()
            return
        deadline = time.monotonic() + wait_s
        while self._reader.is_alive() and time.monotonic() < deadline:
            self._reader.join(timeout=0.25)
            if self.interrupted():
                break

    def _next_host(self):
        if self.interrupted is None:
            return next(self.pipe), self.pipe.state()
        if self._ended is not None:  # the reader has stopped: its end (or error) again
            raise self._ended
        if self._host is None:
            self._host = queue.Queue(maxsize=1)
            self._reader = threading.Thread(target=self._read, name="clip_jax-input", daemon=True)
            self._reader.start()
            _READERS.append(self._reader)
        while True:
            try:
                item = self._host.get(timeout=0.25)
            except queue.Empty:
                if self.interrupted():
                    raise InputInterrupted("interrupted while waiting for the next batch of input") from None
                continue
            if isinstance(item, BaseException):
                self._ended = item
                raise item
            return item

    def __next__(self) -> dict:
        while len(self._queue) < self.size:
            try:
                host, position = self._next_host()
            except StopIteration:  # a finite source (an embedding cache): serve what is queued
                if not self._queue:
                    raise
                break
            missing = [k for k in self.keys if k not in host]
            if missing:
                raise KeyError(f"the training method needs batch keys {missing} that the input pipeline does not "
                               f"produce (it gives {sorted(host)}); for labels set config.data.label_keys")
            batch = to_global_arrays(host, self.sharding, self.keys)  # dispatched, not waited on
            self._queue.append((batch, position))
        batch, self._state = self._queue.popleft()
        return batch

    def state(self) -> list:
        return self._state
