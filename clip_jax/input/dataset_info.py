"""What a dataset offers a consumer of labelled examples (the few-shot adaptation): the data specs of
its train, validation and test splits, and its default label feature (its class names and prompts:
clip_jax.input.catalog).
Knowledge of the built-in datasets lives here (and in their modules), not in the consumers."""

from __future__ import annotations

SPLITS = ("train", "validation", "test")
# Source kinds whose spec ends in a split ('KIND[:NAME]:SPLIT[|options]'), and whether they take a NAME:
# a dataset named without its split gets each of SPLITS.
SPLIT_KINDS = {"shapes": False, "shapes_scenes": False, "shapes_video": False, "tfds": True}
# The adaptation's default data: the embedded dataset's train split (partitioned: one image distribution for
# the shots, validation and test) and its count labels, which zero-shot prompts cannot say; no download.
DEFAULT_DATASET = "shapes:train"
DEFAULT_LABEL_KEY = "label_count"
DATASET_FORMS = ("'shapes', 'tfds:NAME', one split to partition ('shapes:train', 'tfds:NAME:train', "
                 "'tfrecord:GLOB') or a dict of train/validation/test specs")


def split_specs(dataset) -> dict:
    """'shapes' / 'tfds:NAME' (with |options) -> the train, validation and test specs; a dict of three specs
    passes; a spec of one split ('shapes:train') is that spec for all three, which a consumer partitions
    (clip_jax.adapt.data: CoOp's fixed train / validation / test parts of a dataset without splits)."""
    if isinstance(dataset, dict) or hasattr(dataset, "items"):
        specs = dict(dataset)
        missing = sorted(set(SPLITS) - set(specs))
        if missing:
            raise ValueError(f"config.dataset needs specs for train, validation and test; missing {missing}")
        return specs
    name, _, option = dataset.partition("|")
    option = f"|{option}" if option else ""
    kind, colon, rest = name.partition(":")
    if kind in SPLIT_KINDS and bool(colon and rest) == SPLIT_KINDS[kind]:
        return {split: f"{name}:{split}{option}" for split in SPLITS}
    from clip_jax.input.pipeline import SOURCES, parse_spec

    if kind in SOURCES:
        parse_spec(dataset)  # a bad split or option is named here
        return {split: dataset for split in SPLITS}
    raise ValueError(f"config.dataset={dataset!r}: use {DATASET_FORMS}")


def is_one_split(specs: dict) -> bool:
    """Whether split_specs named one split for all three (to be partitioned)."""
    return specs["train"] == specs["validation"] == specs["test"]

