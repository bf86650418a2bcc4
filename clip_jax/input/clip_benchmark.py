"""Any clip_jax evaluation source in CLIP_benchmark's webdataset layout, which ``clip_benchmark eval
--dataset=wds/NAME --dataset_root=ROOT/{dataset}`` reads (docs/evaluation.md):

    python -m clip_jax.input.clip_benchmark --data=SPEC --out=ROOT/NAME [--label_key=K] [--classes=FILE.json]
        [--task=zero_shot|retrieval] [--data_dir=DIR] [--shard_size=N]
    python -m clip_jax.input.shapes --out=ROOT --format=clip_benchmark      (the embedded dataset's tasks)

A dataset folder ROOT/NAME holds SPLIT/0.tar ... and SPLIT/nshards.txt (CLIP_benchmark reads
SPLIT/{0..nshards-1}.tar), one sample per record of the split, in its order: KEY.png|jpg|webp (the
record's encoded image as stored), KEY.cls (the class index, zero_shot) and KEY.txt (the record's
captions, one a line). A zero_shot folder has classnames.txt (one a line, in label order) and
zeroshot_classification_templates.txt (CLIP_benchmark's "{c}" templates); a retrieval folder has
dataset_type.txt ("retrieval"). CLIP_benchmark fills one template list with every class name, while
clip_jax's prompts may be worded per class (shapes: "an orange star", every colour of a shape): the
exact prompts of every folder under ROOT go in ROOT/clip_benchmark_prompts.json, CLIP_benchmark's
class-specific prompt file ({"wds/NAME": {class name: [prompts]}}, --custom_template_file), and the
templates file holds them where "{c}" words them exactly, else the templates of the first class.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Callable, Optional

from clip_jax.input import catalog, eval_data, records
from clip_jax.input.features import FEATURES, Feature

PROMPTS_FILE = "clip_benchmark_prompts.json"
TASKS = ("zero_shot", "retrieval")


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


# the record's id (records.KEY) names its sample; TFRecords only (a tfds example is named by its position)
FEATURES.register("key")(Feature(
    parse=lambda r: {records.KEY: _tf().io.FixedLenFeature([], _tf().string, default_value="")},
    value=lambda parsed, r: parsed[records.KEY],
    empty=lambda r: _tf().constant(b""),
))


def image_extension(data: bytes) -> Optional[str]:
    """The extension CLIP_benchmark decodes an encoded image by (png, jpg, webp), None for another format."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _png(data: bytes) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def templates_of(names: list, prompts: list) -> tuple[list, bool]:
    """CLIP_benchmark's "{c}" templates for prompts [class][k], and whether they word every class's prompts
    exactly; where they cannot (the prompts differ per class beyond its name), the first class's."""
    templates = [p.replace(names[0], "{c}") for p in prompts[0]]
    exact = all(len(p) == len(templates) and [t.replace("{c}", n) for t in templates] == list(p)
                for n, p in zip(names, prompts))
    return templates, exact


class _ShardWriter:
    """SPLIT/0.tar, SPLIT/1.tar, ... of `shard_size` samples each, and SPLIT/nshards.txt at the end."""

    def __init__(self, directory: str, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        self.count, self.shards, self.tar = 0, 0, None
        os.makedirs(directory, exist_ok=True)

    def write(self, key: str, files: dict) -> None:
        if self.count % self.shard_size == 0:
            self._close_tar()
            self.tar = tarfile.open(os.path.join(self.directory, f"{self.shards}.tar"), "w")
            self.shards += 1
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # no clock in the bytes: a rerun writes the same
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def _close_tar(self):
        if self.tar is not None:
            self.tar.close()

    def close(self) -> None:
        self._close_tar()
        with open(os.path.join(self.directory, "nshards.txt"), "w") as f:
            f.write(f"{self.shards}\n")


def convert(data: str, out: str, *, config=None, task: str = "zero_shot", label_key: Optional[str] = None,
            classes: Optional[str] = None, split_name: Optional[str] = None, shard_size: int = 1000,
            log: Callable = print) -> dict:
    """Write the split `data` (an evaluation data spec: 'shapes:test', 'tfds:NAME:SPLIT', 'tfrecord:GLOB') to
    the dataset folder `out` for `task`; `label_key`: the label feature (default: the source's first label
    task), `classes`: a class-name file ({"classnames", "templates"}) over the source's own names; the
    split's folder is `split_name` (default the source's split). Returns {split, count, keys, folder}."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    entry = catalog.of(data)
    source = eval_data.parse_spec(data)
    split = split_name or (source.split if source.kind != "tfrecord" else "test")
    label_keys = []
    if task == "zero_shot":
        label_key = label_key or entry.default_label_keys(source)[0]
        label_keys = [label_key]
    info = eval_data.describe(data, config, label_keys=label_keys, need_captions=task == "retrieval")
    features = ["image", "caption", "labels"] + (["key"] if source.kind != "tfds" else [])
    names = None
    if task == "zero_shot":
        found = catalog.from_file(classes) if classes else entry.class_names(info, label_key, log)
        if found is None:
            raise ValueError(f"{data} names no classes for {label_key!r}: pass classes=FILE.json "
                             "({'classnames': [...], 'templates': ['a photo of a {}.', ...]})")
        names, prompts = [n.strip() for n in found.names], found.prompts
        if len(set(names)) != len(names) or any("\n" in n or not n for n in names):
            raise ValueError(f"the class names of {data} must be distinct non-empty lines (CLIP_benchmark keys its "
                             f"prompts by name and reads classnames.txt by line): {names}")
    os.makedirs(out, exist_ok=True)
    writer = _ShardWriter(os.path.join(out, split), shard_size)
    keys = []
    seen = set()
    for index, ex in enumerate(eval_data.read_examples(info, config, features, label_keys).as_numpy_iterator()):
        key = ex["key"].decode("utf-8") if "key" in ex and ex["key"] else f"{index:08d}"
        key = key.replace(".", "_")  # webdataset splits a sample's name at its first dot
        if key in seen:
            raise ValueError(f"{data}: two records have the key {key!r}; a webdataset sample needs its own")
        seen.add(key)
        image = bytes(ex["image"])
        ext = image_extension(image)
        files = {ext or "png": image if ext else _png(image)}  # other formats as PNG, which CLIP_benchmark reads
        captions = [c.decode("utf-8").strip() for c in ex["caption"]]
        if task == "zero_shot":
            label = int(ex["labels"][0])
            if not 0 <= label < len(names):
                raise ValueError(f"{data}: record {key!r} has {label_key}={label}, not a class index of "
                                 f"its {len(names)} classes")
            files["cls"] = str(label).encode()
        elif not any(captions):
            raise ValueError(f"{data}: record {key!r} has no caption to retrieve")
        files["txt"] = "\n".join(c for c in captions if c).encode("utf-8")
        writer.write(key, files)
        keys.append(key)
    writer.close()
    name = os.path.basename(os.path.normpath(out))
    if task == "retrieval":
        _write_text(os.path.join(out, "dataset_type.txt"), ["retrieval"])
    else:
        templates, exact = templates_of(names, prompts)
        _write_text(os.path.join(out, "classnames.txt"), names)
        _write_text(os.path.join(out, "zeroshot_classification_templates.txt"), templates)
        _add_prompts(os.path.join(os.path.dirname(os.path.abspath(out)), PROMPTS_FILE), f"wds/{name}",
                     dict(zip(names, [list(p) for p in prompts])))
        if not exact:
            log(f"note: {name}'s prompts differ per class beyond the class name: CLIP_benchmark words them "
                f"exactly with --custom_template_file={os.path.join(os.path.dirname(out) or '.', PROMPTS_FILE)}")
    log(f"wrote {len(keys)} {split} records of {data} to {out} ({writer.shards} shards)")
    return {"split": split, "count": len(keys), "keys": keys, "folder": out}


# the embedded dataset's folders: zero-shot by each label task of its one-object splits, and retrieval
SHAPES_DATASETS = {"shapes_shape": "label_shape", "shapes_color": "label_color", "shapes_combo": "label",
                   "shapes_captions": None}
SHAPES_SPLITS = ("validation", "test")


def dataset_folder(base: str, task: str, sub: Optional[str] = None) -> str:
    """The folder (CLIP_benchmark's wds/NAME) of a dataset's evaluation: `base` as in metric keys ('shapes',
    'shapes_zh', 'cifar10'), its label task `sub` for zero_shot; the embedded dataset's as write_shapes names them."""
    name = base.replace("/", "_")
    if task == "retrieval":
        return f"{name}_captions" if name in ("shapes", "shapes_zh") else name
    return f"{name}_{sub}" if sub else name


def write_shapes(root: str, config=None, log: Callable = print) -> dict:
    """ROOT/shapes_shape, shapes_color, shapes_combo (zero_shot) and shapes_captions (retrieval), each with
    the validation and test splits of the embedded dataset `config` (data settings) makes. {folder: {split: n}}."""
    written = {}
    for name, label_key in SHAPES_DATASETS.items():
        for split in SHAPES_SPLITS:
            done = convert(f"shapes:{split}", os.path.join(root, name), config=config,
                           task="zero_shot" if label_key else "retrieval", label_key=label_key, log=log)
            written.setdefault(name, {})[split] = done["count"]
    return written


def _write_text(path: str, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{line}\n" for line in lines))


def _add_prompts(path: str, dataset: str, prompts: dict) -> None:
    """The class-specific prompt file of every dataset under a root, this one's entry set."""
    table = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    table[dataset] = prompts
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1, ensure_ascii=False)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clip_jax.input.clip_benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an evaluation data spec: shapes:test, tfds:NAME:SPLIT, "
                        "tfrecord:GLOB")
    parser.add_argument("--out", required=True, help="the dataset folder ROOT/NAME (CLIP_benchmark's wds/NAME)")
    parser.add_argument("--task", choices=TASKS, default="zero_shot")
    parser.add_argument("--label_key", default=None, help="the label feature (default: the source's first)")
    parser.add_argument("--classes", default=None, help="a class-name file {classnames, templates}")
    parser.add_argument("--split_name", default=None, help="the split's folder (default: the source's split)")
    parser.add_argument("--data_dir", default=None, help="tfds data_dir")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per .tar")
    args = parser.parse_args(argv)
    config = {"data_dir": args.data_dir} if args.data_dir else None
    convert(args.data, args.out, config=config, task=args.task, label_key=args.label_key, classes=args.classes,
            split_name=args.split_name, shard_size=args.shard_size)


if __name__ == "__main__":
    main()
