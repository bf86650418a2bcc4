"""CLIP_benchmark's webdataset layout of one evaluation dataset, which ``clip_benchmark eval
--dataset=wds/NAME --dataset_root=ROOT/{dataset}`` reads; clip_jax.input.clip_benchmark writes any evaluation
source in it, ``python -m clip_jax.input.shapes --format=clip_benchmark`` the embedded dataset.

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
from typing import Callable, Iterable, Optional

PROMPTS_FILE = "clip_benchmark_prompts.json"
TASKS = ("zero_shot", "retrieval")


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


def write_dataset(out: str, split: str, samples: Iterable[tuple], *, task: str = "zero_shot",
                  names: Optional[list] = None, prompts: Optional[list] = None, shard_size: int = 1000,
                  what: str = "", log: Callable = print) -> dict:
    """The split `split` of the dataset folder `out` from `samples` (key, encoded image, class index or None,
    [captions]) in their order; a zero_shot folder with its class `names` and `prompts` [class][k].
    Returns {split, count, keys, folder}."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if task == "zero_shot":
        names = [n.strip() for n in names or []]
        if not names or len(set(names)) != len(names) or any("\n" in n or not n for n in names):
            raise ValueError(f"the class names of {what or out} must be distinct non-empty lines (CLIP_benchmark keys "
                             f"its prompts by name and reads classnames.txt by line): {names}")
    os.makedirs(out, exist_ok=True)
    writer = _ShardWriter(os.path.join(out, split), shard_size)
    keys, seen = [], set()
    for index, (key, image, label, captions) in enumerate(samples):
        key = (key or f"{index:08d}").replace(".", "_")  # webdataset splits a sample's name at its first dot
        if key in seen:
            raise ValueError(f"{what or out}: two records have the key {key!r}; a webdataset sample needs its own")
        seen.add(key)
        ext = image_extension(image)
        files = {ext or "png": image if ext else _png(image)}  # other formats as PNG, which CLIP_benchmark reads
        captions = [c.strip() for c in captions if c.strip()]
        if task == "zero_shot":
            if label is None or not 0 <= label < len(names):
                raise ValueError(f"{what or out}: record {key!r} has the label {label}, not a class index of "
                                 f"its {len(names)} classes")
            files["cls"] = str(int(label)).encode()
        elif not captions:
            raise ValueError(f"{what or out}: record {key!r} has no caption to retrieve")
        files["txt"] = "\n".join(captions).encode("utf-8")
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
        root = os.path.dirname(os.path.abspath(out))
        _add_prompts(os.path.join(root, PROMPTS_FILE), f"wds/{name}", dict(zip(names, [list(p) for p in prompts])))
        if not exact:
            log(f"note: {name}'s prompts differ per class beyond the class name: CLIP_benchmark words them "
                f"exactly with --custom_template_file={os.path.join(root, PROMPTS_FILE)}")
    log(f"wrote {len(keys)} {split} records{' of ' + what if what else ''} to {out} ({writer.shards} shards)")
    return {"split": split, "count": len(keys), "keys": keys, "folder": out}


def language_of(base: str) -> str:
    """CLIP_benchmark's `language` of a dataset's figures, `base` as in metric keys: its captions' and prompts'."""
    return "zh" if base == "shapes_zh" else "en"


def dataset_folder(base: str, task: str, sub: Optional[str] = None) -> str:
    """The folder (CLIP_benchmark's wds/NAME) of a dataset's evaluation: `base` as in metric keys ('shapes',
    'shapes_zh', 'cifar10'), its label task `sub` for zero_shot; the embedded dataset's as
    shapes.write_clip_benchmark names them."""
    name = base.replace("/", "_")
    if task == "retrieval":
        return f"{name}_captions" if name in ("shapes", "shapes_zh") else name
    return f"{name}_{sub}" if sub else name


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
