"""The interface of an evaluation task, and the registry the Evaluator looks tasks up in."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from clip_jax.registry import Registry

TASKS: Registry = Registry("evaluation task")


@dataclasses.dataclass(frozen=True)
class Read:
    """What a task reads of one split: the Evaluator embeds each split once for every task that
    reads it (with the same limit), with the union of their label keys, captions and predictions."""

    data: str  # a data spec with its split: 'tfds:cifar10:test', 'tfrecord:/data/val-*'
    limit: int = 0  # examples over all processes (0: the whole split)
    label_keys: tuple = ()  # label features, one column each of the features' 'labels'
    max_captions: int = 0  # captions per image, tokenized ('tokens') with a 'caption_mask'
    caption_key: Optional[str] = None  # where the captions are (None: the data config's, else detected)
    predictions: tuple = ("image_embeds",)  # the method's predict functions run on every example
    # Other record features (clip_jax.input.features, each of one shape per example), by name, in the features
    features: tuple = ()
    optional: bool = False  # a split that may not exist: left out (the task sees no such role), not an error


class Task:
    """One evaluation spec of a registered kind, checked at construction and by prepare (before any
    embedding), run by evaluate on the features of the splits it reads."""

    # The options its spec takes (TASK=DATA|key=value...).
    options: frozenset = frozenset({"limit"})
    # Every predict function of the method it calls (clip_jax.methods.base.Method.predictions).
    predictions: tuple = ("image_embeds",)
    # Options whose value its metric keys already carry (zero-shot's label_key names a subtask).
    named_by: frozenset = frozenset()

    def __init__(self, spec, data_config, log: Callable = print):
        self.spec, self.config, self.log = spec, data_config, log
        self.infos: dict = {}
        # What tells its keys from those of another spec of this task on the same dataset (the Evaluator sets it:
        # the options that differ between them, 'labels-color'); empty where the dataset has one such spec.
        self.tag = ""

    def dataset_name(self) -> str:
        """The DATASET part of its metric keys TASK/DATASET/..., before any tag (known once prepared)."""
        return self.infos["data"].name if "data" in self.infos else ""

    def named(self, name: str) -> str:
        """A dataset name as its metric keys and output folders spell it: NAME, or NAME.TAG."""
        return f"{name}.{self.tag}" if self.tag else name

    @classmethod
    def check_data(cls, data: str) -> str:
        """The data spec to check when the spec is parsed (a task whose DATA names no split adds one)."""
        return data

    @property
    def limit(self) -> int:
        return int(self.spec.get("limit", 0))

    def reads(self) -> dict[str, Read]:
        """The splits it reads, by role ('data', or 'train' / 'val' / 'test')."""
        raise NotImplementedError

    def prepare(self, infos: dict) -> None:
        """Told each role's clip_jax.input.eval_data.SplitInfo (an optional split that does not exist is
        absent): checks what needs them (class names against the declared classes)."""
        self.infos = dict(infos)

    def evaluate(self, features: dict, encoder) -> tuple[dict, dict]:
        """(metrics {TASK/DATASET/METRIC: float}, details) from each role's features: every prediction of
        its Read [n, ...], labels [n, len(label_keys)], caption_mask [n, M]. `encoder` runs the method's
        predictions on other inputs (zero-shot prompts)."""
        raise NotImplementedError


def check_labels(spec, info, key: str, labels: np.ndarray, num_classes: Optional[int]) -> None:
    missing = int((labels < 0).sum())
    if missing:
        raise ValueError(f"{spec}: {missing} examples of {info.spec} have no label {key!r}: pass label_key=...")
    if num_classes is not None and len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"{spec}: {info.spec} has label {int(labels.max())} in {key!r} but the class list has "
                         f"{num_classes} names: pass classes= with a name for every label, in label order")


def jsonable(tree):
    if isinstance(tree, dict):
        return {str(k): jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [jsonable(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return tree.tolist()
    if isinstance(tree, (np.floating, np.integer)):
        return tree.item()
    return tree
