"""Evaluation data: every example of a split once, in order, as padded host batches.

Unlike the training pipeline (endless, shuffled, one caption per image), an evaluation
reader yields each image exactly once with all its labels and up to `max_captions`
captions, center-cropped, in a fixed order. Each process reads its own share (tfds:
``even_splits``; TFRecords: every P-th file, or every P-th record when there are fewer
files than processes). The last batch is padded; ``mask`` marks the real rows.

Sources use the training specs: 'shapes:SPLIT', 'tfds:NAME[/CONFIG]:SPLIT', 'tfrecord:GLOB'.
'shapes:SPLIT|lang=zh' reads the embedded dataset's Chinese captions and class names.
``describe`` checks one (the dataset exists, the split exists, the keys exist) without
reading images, so a bad evaluation spec fails before training or embedding starts.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from clip_jax.input import reader, records, shapes
from clip_jax.input.features import FEATURES, Reading
from clip_jax.input.pipeline import (
    Source,
    _plain,
    embedded_files,
    list_files,
    parse_spec,
)
from clip_jax.input.settings import data_settings
from clip_jax.input.transforms import decode_and_crop

# The embedded dataset's label features and the zero-shot task each one labels.
SHAPES_TASKS = shapes.LABEL_TASKS


@dataclasses.dataclass
class SplitInfo:
    spec: str
    source: Source
    name: str  # for metric keys: 'cifar10.test', 'shapes.validation'
    num_examples: Optional[int]  # None where unknown without reading (TFRecords)
    label_names: dict  # label key -> class names the dataset declares (tfds ClassLabel)
    caption_key: Optional[str]  # where captions are, None if the source has none
    files: Optional[list] = None
    lang: str = "en"  # shapes: the language of its captions (caption_key) and class names (label_names)


def source_lang(source: Source) -> str:
    """The language a source reads: shapes' |lang= option (pipeline.Source.lang), else "en"."""
    return getattr(source, "lang", None) or "en"


def metric_name(source: Source) -> str:
    """'cifar10.test', 'coco_captions.val', 'shapes.test', 'shapes_zh.test' (shapes:test|lang=zh),
    'mydata-00000.test' (tag-safe)."""
    if source.kind == "tfrecord":
        base = source.name.split(",")[0].rsplit("/", 1)[-1]
        name = base.split("*")[0].split(".tfrecord")[0].rstrip("-_") or "tfrecord"
    elif source.kind in ("shapes", "shapes_scenes") and source_lang(source) != "en":  # apart from the English figures
        name = f"{source.kind}_{source_lang(source)}.{source.split}"
    else:
        name = f"{source.name or source.kind}.{source.split}"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_")


def _builder(source: Source, data_dir: Optional[str]):
    import tensorflow_datasets as tfds

    where = (f"data_dir={data_dir!r}" if data_dir
             else "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)")
    try:
        builder = tfds.builder(source.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"tfds dataset {source.name!r} not found in {where}: no tfds builder has that name and no prepared "
            f"copy is there. Prepare it where you have internet (`tfds build {source.name} --data_dir=DIR`), "
            f"copy DIR here and set data.data_dir (or --data_dir)"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {source.name!r} is known but not prepared in {where}: run "
            f"`tfds build {source.name} --data_dir=DIR` where you have internet, then set data.data_dir=DIR"
        )
    return builder


def _check_split(builder, source: Source) -> int:
    base = re.split(r"[\[+]", source.split)[0]
    if base not in builder.info.splits:
        raise ValueError(f"tfds dataset {source.name!r} has no split {base!r}; it has {sorted(builder.info.splits)}")
    try:
        return int(builder.info.splits[source.split].num_examples)
    except Exception as e:  # a malformed slice such as 'test[:x]'
        raise ValueError(f"bad split {source.split!r} of {source.name!r}: {e}") from None


def _feature_at(features, path: str):
    node = features
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError):
            return None
        if hasattr(node, "feature"):  # tfds Sequence: look inside
            node = node.feature
    return node


def describe(spec: str, config, *, label_keys: Sequence[str] = (), need_captions: bool = False) -> SplitInfo:
    """Resolve and check an evaluation source without reading its images."""
    config = data_settings(config)
    source = parse_spec(spec)
    name = metric_name(source)
    if source.kind in ("shapes", "shapes_scenes"):
        files = embedded_files(source, config)
        from clip_jax.input import shapes

        lang = shapes.check_lang(source_lang(source))
        names = {key: shapes.class_names(task, lang) for key, task in SHAPES_TASKS.items()}
        sizes = dict(config["shapes_sizes" if source.kind == "shapes" else "scenes_sizes"])
        return SplitInfo(spec, source, name, int(sizes[source.split]), names, shapes.caption_feature(lang), files,
                         lang)
    if source.kind == "shapes_video":
        from clip_jax.input import shapes_video

        names = {key: shapes_video.class_names(task) for key, task in shapes_video.LABEL_TASKS.items()}
        return SplitInfo(spec, source, name, int(dict(config["video_sizes"])[source.split]), names, records.CAPTION,
                         embedded_files(source, config))
    if source.kind == "tfrecord":
        # Keys are checked while reading: a missing label reads as -1 and is reported then.
        return SplitInfo(spec, source, name, None, {}, records.CAPTION, list_files(source.name))
    builder = _builder(source, config["data_dir"] or None)
    n = _check_split(builder, source)
    features = builder.info.features
    label_names = {}
    for key in label_keys:
        feature = _feature_at(features, key)
        if feature is None:
            raise ValueError(f"tfds dataset {source.name!r} has no feature {key!r} for labels; its features: "
                             f"{sorted(features.keys())}: pass label_key=...")
        if getattr(feature, "names", None):
            label_names[key] = list(feature.names)
    image_key = config["image_key"]
    if _feature_at(features, image_key) is None:
        raise ValueError(f"tfds dataset {source.name!r} has no image feature {image_key!r}; its features: "
                         f"{sorted(features.keys())}: set data.image_key")
    caption_key = None
    wanted = config["caption_key"] or ""
    for key in ([wanted] if wanted else ["caption", "captions/text", "captions", "text"]):
        if _feature_at(features, key) is not None:
            caption_key = key
            break
    if need_captions and caption_key is None:
        raise ValueError(f"tfds dataset {source.name!r} has no caption feature "
                         f"{repr(wanted) if wanted else 'caption, captions/text, captions or text'}; its features: "
                         f"{sorted(features.keys())}: pass caption_key=...")
    return SplitInfo(spec, source, name, n, label_names, caption_key)


def eval_batches(info: SplitInfo, config, *, batch_size: int, image_size: int, context_length: int,
                 label_keys: Sequence[str] = (), max_captions: int = 0, process_index: int = 0,
                 process_count: int = 1, tokenizer=None, limit: int = 0,
                 features: Sequence[str] = (), image: bool = True) -> Iterator[dict[str, Any]]:
    """Host batches of this process: image [b,S,S,3], labels [b,K] int64 (-1 = absent),
    tokens [b,M,ctx] and caption_mask [b,M] (M = max_captions > 0), mask [b] (real rows), and each
    other record feature in `features` (clip_jax.input.features) under its name, [b, ...] ('audio':
    [b, C, T] float32, clip_jax.input.audio). image=False: records without images (audio ones), no 'image'."""
    config = data_settings(config)
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    if max_captions and tokenizer is None:
        from clip_jax.tokenizers import get_tokenizer

        tokenizer = get_tokenizer()
    label_keys = list(label_keys)
    extra = [name for name in features if name not in ("image", "caption", "labels")]
    _check_names(extra)
    read = ("image",) if image else ()
    ds = read_examples(info, config, (*read, "caption", "labels", *extra), label_keys, process_index, process_count)
    _check_fixed(ds, extra)
    if limit:  # `limit` examples over all processes (tfds users can also slice: 'train[:5000]')
        ds = ds.take(limit // process_count + int(process_index < limit % process_count))

    def prepare(ex):
        out = {"labels": ex["labels"]}
        if image:
            out["image"] = decode_and_crop(ex["image"], image_size, False, None, config)
        for name in extra:  # a label map is cropped as the image (clip_jax.input.segmentation)
            feature = FEATURES.get(name)
            encoded = ex["image"] if image else tf.constant(b"")
            out[name] = feature.prepare(ex[name], encoded, image_size, config) if feature.prepare else ex[name]
        if max_captions:
            captions = tf.strings.strip(ex["caption"][:max_captions])
            pad = max_captions - tf.shape(captions)[0]
            out["captions"] = tf.concat([captions, tf.fill([pad], "")], 0)
        return out

    # An image that does not decode is skipped with a warning in the log (ignore_errors):
    # the report counts the examples actually evaluated.
    ds = ds.map(_plain(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size)
    if max_captions:
        def tokenize(batch):
            flat = tf.reshape(batch["captions"], [-1])
            tokens = tokenizer.tf_tokenize(flat, context_length)
            batch["tokens"] = tf.reshape(tokens, [-1, max_captions, context_length])
            batch["caption_mask"] = tf.reshape(tf.strings.length(flat) > 0, [-1, max_captions])
            del batch["captions"]
            return batch

        ds = ds.map(_plain(tokenize), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for batch in ds.prefetch(2).as_numpy_iterator():
        yield pad_batch(batch, batch_size)


def check_features(info: SplitInfo, config, features: Sequence[str]) -> None:
    """An error naming a record feature evaluation batches cannot hold (unknown, or of no fixed shape per
    example), without reading a record."""
    if features:
        _check_names(features)
        _check_fixed(read_examples(info, config, tuple(features)), features)


def _check_names(names: Sequence[str]) -> None:
    if "mask" in names:
        raise ValueError("record feature 'mask': evaluation batches name their real rows 'mask'; read a mask "
                         "of class ids as 'mask/shape', 'mask/color', 'mask/combo' or 'mask/record' "
                         "(clip_jax.input.segmentation)")


def _check_fixed(ds, names: Sequence[str]) -> None:
    for name in names:  # rows of a batch stack: a feature of varying length (one value per object) cannot
        if FEATURES.get(name).prepare is not None:  # of the model's input size once prepared
            continue
        if not ds.element_spec[name].shape.is_fully_defined():
            raise ValueError(f"record feature {name!r} has shape {ds.element_spec[name].shape} per example, not a "
                             "fixed one, so evaluation batches cannot hold it: register a feature of one shape "
                             "(a count, a padded list) and read that")


def pad_batch(batch: dict, batch_size: int) -> dict:
    """Pad every array to batch_size rows (zeros; labels -1) and add mask [b]."""
    n = len(batch["labels"])
    out = {}
    for key, value in batch.items():
        fill = -1 if key == "labels" else 0
        pad = np.full((batch_size - n,) + value.shape[1:], fill, value.dtype)
        out[key] = np.concatenate([value, pad]) if n < batch_size else value
    out["mask"] = np.arange(batch_size) < n
    return out


def empty_batch(like: dict) -> dict:
    """A batch of padding only: for a process whose share ended before the others'."""
    out = {k: np.zeros_like(v) for k, v in like.items()}
    if "labels" in out:
        out["labels"][:] = -1
    return out


def reading(info: SplitInfo, config, label_keys: Sequence[str] = ()) -> Reading:
    """Where the features of an evaluation source are: its caption feature (or tfds path) and labels."""
    return Reading(info.source, data_settings(config), info.caption_key, tuple(label_keys))


def read_examples(info: SplitInfo, config, features: Sequence[str] = ("image", "caption", "labels"),
                  label_keys: Sequence[str] = (), process_index: int = 0, process_count: int = 1):
    """{feature: raw value} of the named record features (clip_jax.input.features: image bytes, captions
    [n] strings, labels [K] int64, ...) of this process's share, in order, through the training
    pipeline's reader (clip_jax.input.reader)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    config = data_settings(config)
    source = info.source
    where = reading(info, config, label_keys)
    if source.kind == "tfds":
        import tensorflow_datasets as tfds

        builder = _builder(source, config["data_dir"] or None)
        split = tfds.even_splits(source.split, n=process_count, drop_remainder=False)[process_index]
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=reader.tfds_decoders(features, where))
        read_options = tf.data.Options()
        read_options.deterministic = True
        return ds.with_options(read_options).map(_plain(lambda ex: reader.from_tfds(ex, features, where)),
                                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    files = list(info.files)
    shard_records = len(files) < process_count
    if not shard_records:
        files = files[process_index::process_count]
    compressed = any(f.endswith(".gz") for f in files)
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP" if compressed else "", num_parallel_reads=None)
    if shard_records:
        ds = ds.shard(process_count, process_index)
    spec = reader.example_spec(features, where)
    return ds.map(_plain(lambda record: reader.parse_example(record, features, where, spec)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def diagnose(info: SplitInfo, config, most: int = 1000) -> str:
    """What the first `most` records of a source hold, by kind (usable, unreadable file, not a
    tf.train.Example, missing image, undecodable image): read eagerly, one record at a time, for
    the error of a source that gave no usable example."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    counts: collections.Counter = collections.Counter()

    def image_kind(image) -> str:
        if not len(image):
            return "missing_image"
        try:
            tf.io.decode_image(image, channels=3, expand_animations=False)
        except (tf.errors.OpError, UnicodeDecodeError):  # TF's message may quote the bytes
            return "undecodable"
        return "usable"

    read = 0
    if info.source.kind == "tfds":
        for ex in read_examples(info, config, ("image",)).take(most).as_numpy_iterator():
            counts[image_kind(ex["image"])] += 1
        return _describe_counts(counts)
    where = reading(info, config)
    for path in info.files or []:
        compressed = path.endswith(".gz")
        try:
            for record in tf.data.TFRecordDataset(path, compression_type="GZIP" if compressed else ""):
                if read >= most:
                    return _describe_counts(counts) + f" (in the first {most} records)"
                read += 1
                try:
                    image = reader.parse_example(record, ("image",), where)["image"].numpy()
                except (tf.errors.OpError, UnicodeDecodeError):
                    counts["not_an_example"] += 1
                    continue
                counts[image_kind(image)] += 1
        except (tf.errors.OpError, UnicodeDecodeError):
            counts["unreadable_file"] += 1
    return _describe_counts(counts)


def _describe_counts(counts: dict) -> str:
    return ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items())) or "no records at all"
