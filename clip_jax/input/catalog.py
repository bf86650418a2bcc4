"""What a data source offers evaluation, registered by its kind (the names of pipeline.SOURCES).

Evaluation tasks ask here, never by a dataset's name: which label features a source's records
carry and the sub-task each one names in metric keys, its class names and prompts in the
source's language, the options of an evaluation spec that belong to the data spec, the spec
of another split of the same dataset, and a few labelled examples for a picture of
predictions. A source kind without an entry gets the plain ``Catalog`` (a 'label' feature
and no class names of its own: pass classes=FILE.json).

    entry = catalog.of("shapes:test|lang=zh")
    entry.default_label_keys(source)     # ['label', 'label_color', 'label_shape']
    entry.class_names(info, "label_color", log)   # ClassNames(names, prompts) in Chinese

Shipped class-name files (clip_jax/assets/zero_shot/NAME.json: imagenet, cifar10, ...) hold
{"classnames": [...], "templates": [...]} and, for a tfds dataset, its "tfds_name" and
"tfds_label_key"; a user's own file has the same form.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

from clip_jax.registry import Registry

CATALOGS: Registry = Registry("evaluation catalog")
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "zero_shot")
DEFAULT_TEMPLATE = "a photo of a {}."


@dataclasses.dataclass(frozen=True)
class ClassNames:
    names: list  # one per class, in label order
    prompts: list  # [class][k] texts, embedded and averaged per class
    novel: tuple = ()  # the names of the open-vocabulary protocol's novel classes (the file's "novel")


@dataclasses.dataclass(frozen=True)
class Preview:
    """Labelled examples of a source for a picture of the model's predictions."""

    images: list  # uint8 [H, W, 3] each
    labels: list  # int, index into names
    names: list  # class names shown with the pictures
    prompts: list  # [class][k] texts in the source's language
    title: str  # what the examples are
    clips: Optional[list] = None  # float32 [samples] each: the examples' sounds, where the source has them
    rate: int = 0  # their sample rate


# -- shipped class-name files ------------------------------------------------------------------
def available_metadata() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(ASSETS) if f.endswith(".json"))


def load_metadata(name_or_path: str) -> dict:
    """{'classnames': [...], 'templates': [...]} of a shipped dataset name or a JSON file."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(ASSETS, f"{name_or_path}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no zero-shot class names for {name_or_path!r}: use one of {available_metadata()} "
                                f"or a JSON file {{'classnames': [...], 'templates': ['a photo of a {{}}.', ...]}}")
    with open(path) as f:
        meta = json.load(f)
    for key in ("classnames", "templates"):
        if not meta.get(key) or not all(isinstance(x, str) and x for x in meta[key]):
            raise ValueError(f"{path}: '{key}' must be a non-empty list of non-empty strings")
    bad = [t for t in meta["templates"] if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{path}: every template needs exactly one '{{}}' for the class name; not {bad[:3]}")
    return meta


def prompts_for(meta: dict) -> list[list[str]]:
    return [[t.format(c) for t in meta["templates"]] for c in meta["classnames"]]


def find_metadata(tfds_name: str) -> Optional[str]:
    """The shipped class-name file whose tfds_name is `tfds_name` (version / config ignored)."""
    base = tfds_name.split(":")[0]
    for name in available_metadata():
        meta = load_metadata(name)
        if meta.get("tfds_name") and meta["tfds_name"].split(":")[0] in (base, base.split("/")[0]):
            return name
    return None


def from_file(name_or_path: str) -> ClassNames:
    """A shipped or a user's class-name file as ClassNames: {"classnames", "templates"[, "novel": [names]]}, or a
    list of {"name"[, "index"][, "novel": true]} (convert_detection's classes JSON, the detection task's
    categories.json) prompted with DEFAULT_TEMPLATE."""
    if name_or_path.endswith(".json") and os.path.exists(name_or_path):
        with open(name_or_path) as f:
            entries = json.load(f)
        if isinstance(entries, list):
            if not entries or not all(isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"]
                                      for e in entries):
                raise ValueError(f"{name_or_path}: a class list needs a non-empty 'name' in every entry "
                                 "([{'name': 'person', 'index': 0}, ...])")
            entries = sorted(entries, key=lambda e: e.get("index", 0)) if all("index" in e for e in entries) \
                else entries
            names = [e["name"] for e in entries]
            return ClassNames(names, [[DEFAULT_TEMPLATE.format(n)] for n in names],
                              tuple(e["name"] for e in entries if e.get("novel")))
    meta = load_metadata(name_or_path)
    novel = meta.get("novel", [])
    unknown = [n for n in novel if n not in meta["classnames"]] if isinstance(novel, list) else novel
    if unknown:
        raise ValueError(f"{name_or_path}: 'novel' must list names of 'classnames'; not {unknown!r}")
    return ClassNames(list(meta["classnames"]), prompts_for(meta), tuple(novel))


# -- the entries ---------------------------------------------------------------------------------
def kind_of(data: str) -> str:
    """The source kind of a data spec: 'shapes:test|lang=zh' -> 'shapes'."""
    return data.strip().split(":")[0].split("|")[0].strip()


def of(data_or_kind: str) -> "Catalog":
    """The entry of a data spec's (or a source kind's) source; the plain Catalog where none is registered."""
    kind = kind_of(data_or_kind)
    return (CATALOGS.get(kind) if kind in CATALOGS else Catalog)()


class Catalog:
    """A source with nothing to offer beyond its records (TFRecords): labels under 'label', no class
    names (classes=FILE.json names them), every file of the glob one split."""

    # Options of an evaluation spec that belong to the data spec (TASK=DATA|key=value...).
    data_options: frozenset = frozenset()

    def with_split(self, data: str, split: str) -> str:
        """The spec of `split` of the dataset `data` names (a glob is its own split)."""
        return data

    def default_label_keys(self, source) -> list[str]:
        """The label features zero-shot evaluates when a spec names none, one label task each."""
        return ["label"]

    def task_name(self, label_key: str) -> Optional[str]:
        """The sub-task a label feature's figures are filed under (TASK/DATASET/SUBTASK/METRIC), or None."""
        return None

    def class_names(self, info, label_key: str, log: Callable = print) -> Optional[ClassNames]:
        """The source's own class names and prompts for `label_key`, in its language; None: it has none."""
        return None

    def class_prompts(self, source, label_key: str) -> Optional[list]:
        """The prompts [class][k] the source words itself for `label_key`'s classes, in its language, or None."""
        return None

    def templates(self, source) -> Optional[list]:
        """The prompt templates shipped for the source's dataset, or None."""
        return None

    def preview(self, data: str, config, n: int) -> Optional[Preview]:
        """The first `n` examples of a split to picture predictions on, or None."""
        return None


@CATALOGS.register("tfrecord")
class TFRecords(Catalog):
    pass


@CATALOGS.register("tfds")
class Tfds(Catalog):
    """A tfds dataset: the shipped class-name file with its tfds_name, else its ClassLabel names."""

    def with_split(self, data, split):
        kind, name = data.split(":", 2)[:2]
        return f"{kind}:{name}:{split}"

    def default_label_keys(self, source):
        shipped = find_metadata(source.name)
        return [(load_metadata(shipped).get("tfds_label_key") if shipped else None) or "label"]

    def class_names(self, info, label_key, log=print):
        shipped = find_metadata(info.source.name)
        if shipped:
            return from_file(shipped)
        declared = info.label_names.get(label_key)
        if not declared:
            return None
        log(f"note: no class-name file ships for {info.name}: using the dataset's own label names with "
            f"{DEFAULT_TEMPLATE!r} (pass classes=FILE.json to choose names and templates)")
        names = [n.replace("_", " ") for n in declared]
        return ClassNames(names, [[DEFAULT_TEMPLATE.format(n)] for n in names])

    def templates(self, source):
        base = source.name.split("/")[0]
        return load_metadata(base)["templates"] if base in available_metadata() else None


@CATALOGS.register("shapes")
class Shapes(Catalog):
    """The embedded dataset: four label tasks, class names and prompts in each of its languages."""

    data_options = frozenset({"lang"})

    def with_split(self, data, split):
        return f"shapes:{split}"

    def default_label_keys(self, source):
        from clip_jax.input import shapes

        # validation and test images hold one object each: a count is a task of the train split only
        return [key for key in shapes.LABEL_TASKS if key != "label_count" or source.split == "train"]

    def task_name(self, label_key):
        from clip_jax.input import shapes

        return shapes.LABEL_TASKS.get(label_key)

    def class_names(self, info, label_key, log=print):
        from clip_jax.input import shapes

        task = shapes.LABEL_TASKS.get(label_key)
        if task is None:
            return None
        return ClassNames(shapes.class_names(task, info.lang), self.class_prompts(info.source, label_key))

    def class_prompts(self, source, label_key):
        from clip_jax.input import shapes

        task = shapes.LABEL_TASKS.get(label_key)
        return shapes.prompts(task, lang=source.lang) if task else None

    def preview(self, data, config, n):
        """The test split's first images (held-out combinations) and their combo labels; the names
        stay English (the same classes; a picture's font has no Chinese), the prompts in the data's
        language."""
        from clip_jax.input import shapes
        from clip_jax.input.pipeline import parse_spec, shapes_files
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        lang = parse_spec(data).lang
        files = shapes_files("test", config)
        examples = [shapes.parse(r.numpy()) for r in tf.data.TFRecordDataset(files).take(n)]
        from clip_jax.input import audio
        from clip_jax.input.settings import data_settings

        settings = data_settings(config)
        rate, seconds = int(settings["sounds_rate"]), float(settings["sounds_seconds"])
        clips = [audio.embedded_sound(e["key"], [o["shape"] for o in e["objects"]], [o["color"] for o in e["objects"]],
                                      [o["bbox"] for o in e["objects"]], seconds, rate) for e in examples]
        return Preview([e["image"] for e in examples], [e["label"] for e in examples], shapes.class_names("combo"),
                       shapes.prompts("combo", lang=lang), "test images (held-out combinations)", clips, rate)


@CATALOGS.register("shapes_scenes")
class ShapesScenes(Shapes):
    """The scenes variant: the label tasks of its first-named (largest) object, shapes' names and prompts."""

    def with_split(self, data, split):
        return f"shapes_scenes:{split}"

    def default_label_keys(self, source):
        from clip_jax.input import shapes_scenes

        return list(shapes_scenes.LABEL_TASKS)

    def preview(self, data, config, n):
        from clip_jax.input import shapes, shapes_scenes
        from clip_jax.input.pipeline import parse_spec
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        lang = parse_spec(data).lang
        files = shapes_scenes.scenes_files("test", config)
        examples = [shapes_scenes.parse(r.numpy()) for r in tf.data.TFRecordDataset(files).take(n)]
        return Preview([e["image"] for e in examples], [e["label"] for e in examples], shapes.class_names("combo"),
                       shapes.prompts("combo", lang=lang), "test scenes (label: the largest object)")


@CATALOGS.register("shapes_video")
class ShapesVideo(Catalog):
    """The embedded clips: the action, colour and shape of their one object, with their class names and prompts
    (English only)."""

    def with_split(self, data, split):
        return f"shapes_video:{split}"

    def default_label_keys(self, source):
        from clip_jax.input import shapes_video

        return list(shapes_video.LABEL_TASKS)

    def task_name(self, label_key):
        from clip_jax.input import shapes_video

        return shapes_video.LABEL_TASKS.get(label_key)

    def class_names(self, info, label_key, log=print):
        from clip_jax.input import shapes_video

        task = shapes_video.LABEL_TASKS.get(label_key)
        return ClassNames(shapes_video.class_names(task), shapes_video.prompts(task)) if task else None

    def class_prompts(self, source, label_key):
        from clip_jax.input import shapes_video

        task = shapes_video.LABEL_TASKS.get(label_key)
        return shapes_video.prompts(task) if task else None
