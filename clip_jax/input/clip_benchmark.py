"""Any clip_jax evaluation source in CLIP_benchmark's webdataset layout (clip_jax.input.wds_layout), which
``clip_benchmark eval --dataset=wds/NAME --dataset_root=ROOT/{dataset}`` reads (docs/evaluation.md):

    python -m clip_jax.input.clip_benchmark --data=SPEC --out=ROOT/NAME [--label_key=K] [--classes=FILE.json]
        [--task=zero_shot|retrieval] [--data_dir=DIR] [--shard_size=N]

The embedded dataset's tasks: ``python -m clip_jax.input.shapes --out=ROOT --format=clip_benchmark``.
"""

from __future__ import annotations

from typing import Callable, Optional

from clip_jax.input import catalog, eval_data
from clip_jax.input.wds_layout import TASKS, write_dataset


def convert(data: str, out: str, *, config=None, task: str = "zero_shot", label_key: Optional[str] = None,
            classes: Optional[str] = None, split_name: Optional[str] = None, shard_size: int = 1000,
            log: Callable = print) -> dict:
    """Write the split `data` (an evaluation data spec: 'shapes:test', 'tfds:NAME:SPLIT', 'tfrecord:GLOB') to
    the dataset folder `out` for `task`; `label_key`: the label feature (default: the source's first label
    task), `classes`: a class-name file ({"classnames", "templates"}) over the source's own names; the
    split's folder is `split_name` (default the source's split). Returns {split, count, keys, folder}."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
    entry = catalog.of(data)
    source = eval_data.parse_spec(data)
    split = split_name or (source.split if source.kind != "tfrecord" else "test")
    label_keys, names, prompts = [], None, None
    if task == "zero_shot":
        label_key = label_key or entry.default_label_keys(source)[0]
        label_keys = [label_key]
    info = eval_data.describe(data, config, label_keys=label_keys, need_captions=task == "retrieval")
    if task == "zero_shot":
        found = catalog.from_file(classes) if classes else entry.class_names(info, label_key, log)
        if found is None:
            raise ValueError(f"{data} names no classes for {label_key!r}: pass classes=FILE.json "
                             "({'classnames': [...], 'templates': ['a photo of a {}.', ...]})")
        names, prompts = found.names, found.prompts
    features = ["image", "caption", "labels"] + (["key"] if source.kind != "tfds" else [])

    def samples():
        for ex in eval_data.read_examples(info, config, features, label_keys).as_numpy_iterator():
            yield (ex["key"].decode("utf-8") if "key" in ex else "", bytes(ex["image"]),
                   int(ex["labels"][0]) if label_keys else None, [c.decode("utf-8") for c in ex["caption"]])

    return write_dataset(out, split, samples(), task=task, names=names, prompts=prompts, shard_size=shard_size,
                         what=data, log=log)


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
