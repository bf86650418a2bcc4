"""What a dataset offers a consumer of labelled examples (the few-shot adaptation): the data specs of
its train, validation and test splits, and its default label feature (its class names and prompts:
clip_jax.input.catalog).
Knowledge of the built-in datasets lives here (and in their modules), not in the consumers."""

from __future__ import annotations

SPLITS = ("train", "validation", "test")
# Source kinds whose spec ends in a split ('KIND[:NAME]:SPLIT[|options]'), and whether they take a NAME:
# a dataset named without its split gets each of SPLITS.
SPLIT_KINDS = {"shapes": False, "tfds": True}
# The adaptation's default data: the embedded dataset, no download, and its shape labels.
DEFAULT_DATASET = "shapes"
DEFAULT_LABEL_KEY = "label_shape"
DATASET_FORMS = "'shapes', 'tfds:NAME' or a dict of train/validation/test specs (tfrecord:GLOB ones too)"


def split_specs(dataset) -> dict:
    """'shapes' / 'tfds:NAME' (with |options) -> the train, validation and test specs; a dict of three specs
    passes."""
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
    raise ValueError(f"config.dataset={dataset!r}: use {DATASET_FORMS}")

