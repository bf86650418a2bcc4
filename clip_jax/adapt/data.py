"""The few-shot protocol of CoOp and its successors, over any labelled evaluation source.

K examples per class are drawn from the train split by seed; the validation set holds min(K, 4)
per class from the validation split; the test split is read whole. A dataset named by one split
('tfds:NAME:train') is first partitioned per class into fixed train / validation / test parts (50 / 20 /
30%, the same for every seed), as CoOp's split files partition datasets that come without splits.
Base-to-novel: classes in label order, the first ceil(C / 2) are base. Images are kept on the host
as uint8 at the model's resolution (resize of the shorter side, center crop): training augments them
on the device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence

import numpy as np

from clip_jax.input import dataset_info, eval_data
from clip_jax.input.settings import data_settings
from clip_jax.input.transforms import decode_and_crop

VAL_SHOTS = 4  # the references' few-shot validation: min(K, 4) per class
PARTS = (0.5, 0.2)  # one split's train and validation shares (the rest is test): Dassl's p_trn, p_val
PARTITION_SEED = 0  # fixed: a split file, not a draw of the run's seed


@dataclasses.dataclass
class Split:
    images: np.ndarray  # uint8 [n, S, S, 3]
    labels: np.ndarray  # int32 [n], indices into the task's classes

    def __len__(self) -> int:
        return len(self.labels)

    def of_classes(self, classes: Sequence[int]) -> "Split":
        """The examples of `classes`, relabelled 0..len(classes)-1 in that order."""
        remap = {c: i for i, c in enumerate(classes)}
        keep = np.isin(self.labels, list(classes))
        return Split(self.images[keep], np.asarray([remap[int(y)] for y in self.labels[keep]], np.int32))


@dataclasses.dataclass
class FewShot:
    classnames: list
    train: Split
    val: Split
    test: Split


_kept_reads: Optional[dict] = None  # keep_reads(): what was read, by what it read


def keep_reads() -> None:
    """Keep every read of labels and images for the rest of the process, keyed by what it read: for a
    sweep of many runs over the same splits (their labels, the test part, the same for every seed)."""
    global _kept_reads
    if _kept_reads is None:
        _kept_reads = {}


def _kept(key: tuple, read):
    """read(), or its kept value where keep_reads() is on and it ran before for `key`."""
    if _kept_reads is None:
        return read()
    if key not in _kept_reads:
        _kept_reads[key] = read()
    return _kept_reads[key]


def _reading(info, config) -> tuple:
    """What a read depends on besides its own arguments: the source and the readers' settings."""
    return info.spec, json.dumps(config, sort_keys=True, default=str)


def _labels(info, config, label_key: str) -> np.ndarray:
    """Every label of a split, in reading order, without decoding an image."""
    def read():
        ds = eval_data.read_examples(info, config, ("labels",), [label_key]).map(lambda ex: ex["labels"][0])
        return np.fromiter(ds.as_numpy_iterator(), np.int64)

    return _kept(("labels", *_reading(info, config), label_key), read)


def _images(info, config, indices: np.ndarray, image_size: int, total: int) -> np.ndarray:
    """uint8 [len(indices), S, S, 3] of the examples at `indices` (of `total`, reading order), eval transform."""
    wanted = np.asarray(indices, np.int64)
    return _kept(("images", *_reading(info, config), wanted.tobytes(), image_size, total),
                 lambda: _read_images(info, config, wanted, image_size, total))


def _read_images(info, config, indices: np.ndarray, image_size: int, total: int) -> np.ndarray:
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    wanted = np.asarray(indices, np.int64)
    order = np.argsort(wanted)
    picked = np.zeros(total, bool)
    picked[wanted] = True
    keep = tf.constant(picked)
    ds = eval_data.read_examples(info, config, ("image",)).enumerate()
    ds = ds.filter(lambda i, ex: tf.gather(keep, i))
    as_uint8 = dict(config, image_dtype="uint8")  # the eval crop's pixels, rounded
    ds = ds.map(lambda i, ex: decode_and_crop(ex["image"], image_size, False, None, as_uint8),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images = np.stack(list(ds.as_numpy_iterator())) if len(wanted) else np.zeros((0, image_size, image_size, 3),
                                                                                  np.uint8)
    if len(images) != len(wanted):
        raise ValueError(f"{info.spec}: {len(wanted) - len(images)} of the chosen images did not decode")
    out = np.empty_like(images)
    out[order] = images
    return out


def partition(labels: np.ndarray, classes: Sequence[int]) -> tuple:
    """(train, validation, test) index arrays of one split: each class's examples in a fixed random order,
    split PARTS[0] / PARTS[1] / the rest; each part in reading order."""
    parts = ([], [], [])
    for c in classes:
        pool = np.random.default_rng([PARTITION_SEED, int(c)]).permutation(np.flatnonzero(labels == c))
        a = int(round(PARTS[0] * len(pool)))
        b = a + int(round(PARTS[1] * len(pool)))
        for part, idx in zip(parts, (pool[:a], pool[a:b], pool[b:])):
            part.append(idx)
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts)


def per_class(labels: np.ndarray, classes: Sequence[int], k: int, seed: int, split: str, classnames,
              within: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of k examples of each class (by seed, without replacement), class by class; only among
    the indices `within` where given (a part of a partitioned split)."""
    chosen = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if within is not None:
            pool = np.intersect1d(pool, within)
        if len(pool) < k:
            raise ValueError(f"class {c} ({classnames[c]!r}) has {len(pool)} examples in the {split} split, fewer "
                             f"than the {k} asked (config.shots): lower shots or choose another label_key")
        rng = np.random.default_rng([seed, int(c)])
        chosen.append(np.sort(rng.choice(pool, size=k, replace=False)))
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def load_few_shot(dataset, label_key: str, shots: int, seed: int, image_size: int, data_config=None,
                  classnames: Optional[Sequence[str]] = None) -> FewShot:
    """The few-shot train and validation sets and the whole test set of a classification source."""
    if int(shots) < 1:
        raise ValueError(f"config.shots={shots} must be >= 1")
    config = data_settings(data_config)
    specs = dataset_info.split_specs(dataset)
    infos = {split: eval_data.describe(spec, config, label_keys=[label_key]) for split, spec in specs.items()}
    declared = infos["train"].label_names.get(label_key)
    if classnames is None:
        classnames = declared
    elif declared is not None and len(declared) != len(classnames):
        raise ValueError(f"the class list has {len(classnames)} names but {specs['train']!r} declares "
                         f"{len(declared)} classes for {label_key!r}: give one name per class, in label order")
    one_split = dataset_info.is_one_split(specs)
    if one_split:
        labels = dict.fromkeys(specs, _labels(infos["train"], config, label_key))
    else:
        labels = {split: _labels(info, config, label_key) for split, info in infos.items()}
    if classnames is None:
        raise ValueError(f"{specs['train']!r} declares no class names for {label_key!r}: set config.classnames "
                         "(a JSON file with 'classnames', as the zero-shot metadata)")
    n = len(classnames)
    for split, y in labels.items():
        bad = y[(y < 0) | (y >= n)]
        if len(bad):
            raise ValueError(f"{specs[split]!r} has labels outside 0..{n - 1} for {label_key!r} (e.g. {int(bad[0])}):"
                             f" the class list ({n} names) does not match the dataset")
    classes = list(range(n))
    pools = partition(labels["train"], classes) if one_split else (None, None, None)
    train_idx = per_class(labels["train"], classes, int(shots), seed, "train", classnames, pools[0])
    val_idx = per_class(labels["validation"], classes, min(int(shots), VAL_SHOTS), seed, "validation", classnames,
                        pools[1])
    test_idx = pools[2] if one_split else np.arange(len(labels["test"]))
    parts = (("train", train_idx), ("validation", val_idx), ("test", test_idx))
    if one_split:  # the shots and validation in one pass; the test part (the same for every seed) in another
        drawn = _images(infos["train"], config, np.concatenate([train_idx, val_idx]), image_size,
                        len(labels["train"]))
        chunks = {"train": drawn[:len(train_idx)], "validation": drawn[len(train_idx):],
                  "test": _images(infos["test"], config, test_idx, image_size, len(labels["test"]))}
    else:
        chunks = {split: _images(infos[split], config, idx, image_size, len(labels[split])) for split, idx in parts}
    splits = {split: Split(chunks[split], labels[split][idx].astype(np.int32)) for split, idx in parts}
    return FewShot(list(classnames), splits["train"], splits["validation"], splits["test"])


def base_and_novel(num_classes: int) -> tuple[list[int], list[int]]:
    """CoOp's base-to-novel split: classes in label order, the first ceil(C / 2) are base."""
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def test_split(dataset, label_key: str, image_size: int, data_config=None) -> tuple[list, Split]:
    """(class names, the whole test split) of a classification source (cross-dataset transfer)."""
    config = data_settings(data_config)
    spec = dataset_info.split_specs(dataset)["test"]
    info = eval_data.describe(spec, config, label_keys=[label_key])
    classnames = info.label_names.get(label_key)
    if classnames is None:
        raise ValueError(f"{spec!r} declares no class names for {label_key!r}: it cannot be a transfer target")
    labels = _labels(info, config, label_key)
    images = _images(info, config, np.arange(len(labels)), image_size, len(labels))
    return list(classnames), Split(images, labels.astype(np.int32))
