"""Evaluate a trained model: zero-shot classification, image-text retrieval, linear probes.

    python -m clip_jax.evaluate --workdir=DIR [--step=N] [--eval=SPEC ...] [--out=FILE.json]
    python -m clip_jax.evaluate --weights=PATH.safetensors|.msgpack|.pt [--model=NAME] --eval=SPEC ...

An evaluation SPEC is TASK=DATA[|key=value...]:

    zero_shot=shapes:test                       the embedded dataset (colour, shape, combo)
    zero_shot=shapes:test|lang=zh               ... with its Chinese class names and prompts
    zero_shot=tfds:cifar10:test                 class names + templates shipped for cifar10
    zero_shot=tfds:mydata:test|classes=my.json  your own {"classnames": [...], "templates": [...]}
    retrieval=tfds:coco_captions:test|caption_key=captions/text|max_captions=5
    retrieval=shapes:test                       (|lang=zh: its Chinese captions)
    linear_probe=tfds:cifar10                   train / validation / test splits (options train=, val=, test=)

Options: classes, label_key, caption_key, max_captions (default 5), limit (examples per
split), and for linear_probe train, val (default: the dataset's validation split, else
20% of train held out), test. The same specs, comma-separated, go in a training config's
data.eval and run every eval_every_steps; their figures go to metrics.jsonl and TensorBoard.
Metric keys: TASK/DATASET.SPLIT/METRIC, e.g. zero_shot/cifar10.test/top1 (shapes has three
label tasks: zero_shot/shapes.test/color/top1, .../shape/..., .../combo/...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Callable, Optional

import numpy as np

from clip_jax.evaluate import zero_shot
from clip_jax.evaluate.retrieval import recall_at_k
from clip_jax.input import eval_data
from clip_jax.input.pipeline import SOURCES
from clip_jax.registry import Registry

# Evaluation tasks by name, each with the options its spec takes (TASK=DATA|key=value...).
TASKS: Registry = Registry("evaluation task")
_COMMON = frozenset({"label_key", "limit"})
TASKS.register("zero_shot")(_COMMON | {"classes"})
TASKS.register("retrieval")(frozenset({"caption_key", "max_captions", "limit"}))
TASKS.register("linear_probe")(_COMMON | {"train", "val", "test", "val_fraction"})
_SHAPES_TASKS = eval_data.SHAPES_TASKS


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    task: str
    data: str
    options: tuple = ()  # sorted (key, value) pairs

    def get(self, key: str, default=None):
        return dict(self.options).get(key, default)

    def __str__(self):
        return f"{self.task}={self.data}" + "".join(f"|{k}={v}" for k, v in self.options)


def parse_evals(text) -> list[EvalSpec]:
    """'zero_shot=shapes:test,retrieval=tfds:coco_captions:test|max_captions=5' -> specs.

    A bare data spec means zero_shot. Commas inside a TFRecord glob list stay with it."""
    if isinstance(text, (list, tuple)):
        return [s for item in text for s in parse_evals(item)]
    starts = "|".join([f"{t}=" for t in TASKS] + [f"{kind}(?::|$)" for kind in SOURCES])
    items = [s.strip() for s in re.split(rf",(?=\s*(?:{starts}))", text or "") if s.strip()]
    specs = []
    for item in items:
        task, sep, rest = item.partition("=")
        if not sep or task not in TASKS:
            if task.split(":")[0] not in SOURCES:
                raise ValueError(f"evaluation {item!r}: expected TASK=DATA with TASK one of {', '.join(TASKS)}, "
                                 f"e.g. zero_shot=tfds:cifar10:test")
            task, rest = "zero_shot", item
        data, *pairs = rest.split("|")
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if key == "lang" and data.strip().startswith("shapes"):  # the data's own: shapes:SPLIT|lang=zh
                data += f"|{pair}"
                continue
            if not sep or key not in TASKS.get(task):
                raise ValueError(f"evaluation {item!r}: unknown option {pair!r} for {task}; "
                                 f"options: {sorted(TASKS.get(task))}")
            options[key] = value
        eval_data.parse_spec(_with_split(data, task))  # a bad data spec fails here
        specs.append(EvalSpec(task, data.strip(), tuple(sorted(options.items()))))
    return specs


def _with_split(data: str, task: str, split: str = "train") -> str:
    """linear_probe names a dataset without a split; the splits come from its options."""
    if task != "linear_probe" or data.startswith("tfrecord:"):
        return data
    if data.startswith("shapes"):
        return f"shapes:{split}"
    kind, name = data.split(":", 2)[:2]
    return f"{kind}:{name}:{split}"


# -- class names -------------------------------------------------------------------------
def find_metadata(tfds_name: str) -> Optional[str]:
    """The shipped class-name file whose tfds_name is `tfds_name` (version / config ignored)."""
    base = tfds_name.split(":")[0]
    for name in zero_shot.available_metadata():
        meta = zero_shot.load_metadata(name)
        if meta.get("tfds_name") and meta["tfds_name"].split(":")[0] in (base, base.split("/")[0]):
            return name
    return None


def _class_metadata(spec: EvalSpec, info, label_key: str, log) -> dict:
    if spec.get("classes"):
        meta = zero_shot.load_metadata(spec.get("classes"))
    else:
        shipped = find_metadata(info.source.name) if info.source.kind == "tfds" else None
        if shipped:
            meta = zero_shot.load_metadata(shipped)
        elif info.label_names.get(label_key):
            meta = {"classnames": [n.replace("_", " ") for n in info.label_names[label_key]],
                    "templates": ["a photo of a {}."]}
            log(f"note: no class-name file ships for {info.name}: using the dataset's own label names with "
                f"'a photo of a {{}}.' (pass classes=FILE.json to choose names and templates)")
        else:
            raise ValueError(f"{spec}: no class names for {info.spec}: pass classes=NAME (one of "
                             f"{zero_shot.available_metadata()}) or classes=FILE.json")
    declared = info.label_names.get(label_key)
    if declared is not None and len(declared) != len(meta["classnames"]):
        raise ValueError(
            f"{spec}: the class-name list has {len(meta['classnames'])} names but {info.spec} declares "
            f"{len(declared)} classes in {label_key!r}: pass classes= with {len(declared)} names in the "
            f"dataset's label order"
        )
    return meta


# -- the evaluator -------------------------------------------------------------------------
@dataclasses.dataclass
class _Group:
    """One pass over one split serves every zero-shot and retrieval spec on it."""

    data: str
    limit: int
    info: object = None
    label_keys: list = dataclasses.field(default_factory=list)
    max_captions: int = 0
    specs: list = dataclasses.field(default_factory=list)


class Evaluator:
    """Checks every spec at construction (datasets, splits, keys, class names); run() evaluates."""

    def __init__(self, specs, data_config, *, image_size: int, context_length: int, log: Callable = print):
        items = specs if isinstance(specs, (list, tuple)) else [specs]
        self.specs = [x for item in items for x in ([item] if isinstance(item, EvalSpec) else parse_evals(item))]
        self.config = data_config
        self.image_size = image_size
        self.context_length = context_length
        self.log = log
        self.groups: dict = {}
        self.probes = []
        self._class_meta: dict = {}
        self._keys = {s: self._label_keys(s) for s in self.specs if s.task == "zero_shot"}
        for spec in self.specs:
            if spec.task == "linear_probe":
                self.probes.append((spec, self._probe_splits(spec)))
                continue
            limit = int(spec.get("limit", 0))
            group = self.groups.setdefault((spec.data, limit), _Group(spec.data, limit))
            group.specs.append(spec)
            if spec.task == "zero_shot":
                for key in self._keys[spec]:
                    if key not in group.label_keys:
                        group.label_keys.append(key)
            else:
                group.max_captions = max(group.max_captions, int(spec.get("max_captions", 5)))
        for group in self.groups.values():
            caption_cfg = dict(self.config)
            captions = [s.get("caption_key") for s in group.specs if s.get("caption_key")]
            if captions:
                caption_cfg["caption_key"] = captions[0]
            group.config = caption_cfg
            group.info = eval_data.describe(group.data, caption_cfg, label_keys=group.label_keys,
                                            need_captions=group.max_captions > 0)
            for spec in group.specs:
                if spec.task == "zero_shot" and (group.info.source.kind != "shapes" or spec.get("classes")):
                    self._class_meta[spec] = _class_metadata(spec, group.info, self._keys[spec][0], self.log)

    def _label_keys(self, spec: EvalSpec) -> list:
        if spec.get("label_key"):
            return [spec.get("label_key")]
        if spec.data.startswith("shapes"):
            if spec.get("classes"):  # one list of names cannot serve all three label tasks
                raise ValueError(f"{spec}: classes= on shapes needs label_key= naming the labels they are for "
                                 f"(one of {list(_SHAPES_TASKS)})")
            return list(_SHAPES_TASKS)
        if spec.data.startswith("tfds:") and not spec.get("classes"):
            shipped = find_metadata(eval_data.parse_spec(_with_split(spec.data, spec.task)).name)
            if shipped:
                return [zero_shot.load_metadata(shipped).get("tfds_label_key") or "label"]
        return ["label"]

    def _probe_splits(self, spec: EvalSpec) -> dict:
        keys = [spec.get("label_key") or "label"]
        if spec.data.startswith("tfrecord:") and not (spec.get("test") or "").startswith("tfrecord:"):
            raise ValueError(f"{spec}: a TFRecord linear probe trains on DATA and needs its test set as "
                             f"test=tfrecord:GLOB (and optionally val=tfrecord:GLOB)")
        splits = {}
        for role, default in (("train", "train"), ("test", "test"), ("val", None)):
            chosen = spec.get(role, default)
            if chosen is None:
                continue
            data = chosen if chosen.startswith("tfrecord:") else _with_split(spec.data, spec.task, chosen)
            try:
                splits[role] = eval_data.describe(data, self.config, label_keys=keys)
            except ValueError as e:
                raise ValueError(f"{spec}: {e}") from None
        if "val" not in splits and not spec.data.startswith("tfrecord:"):
            try:  # the dataset's own validation split, where it has one (the paper's protocol)
                splits["val"] = eval_data.describe(_with_split(spec.data, spec.task, "validation"), self.config,
                                                   label_keys=keys)
            except ValueError:
                pass  # none: linear_probe holds out part of train
        return splits

    # -- running ----------------------------------------------------------------------------
    def run(self, encoder, batch_size: int = 256) -> tuple[dict, dict]:
        """(metrics {TASK/DATASET/METRIC: float}, details {spec: per-class accuracies, counts, sweeps})."""
        import jax

        global_batch = encoder.round_batch(max(batch_size, jax.process_count()))
        metrics, details = {}, {}
        for group in self.groups.values():
            feats = self._extract(encoder, group.info, group.config, global_batch, group.label_keys,
                                  group.max_captions, group.limit)
            for spec in group.specs:
                if spec.task == "zero_shot":
                    m, d = self._zero_shot(encoder, spec, group, feats)
                else:
                    m, d = self._retrieval(spec, group, feats)
                metrics.update(m)
                details[str(spec)] = d
        for spec, splits in self.probes:
            m, d = self._linear_probe(encoder, spec, splits, global_batch)
            metrics.update(m)
            details[str(spec)] = d
        return metrics, details

    def _extract(self, encoder, info, config, global_batch, label_keys, max_captions, limit):
        import jax

        from clip_jax.evaluate.features import extract
        from clip_jax.tokenizers import tokenizer_for

        batches = eval_data.eval_batches(
            info, config, batch_size=global_batch // jax.process_count(), image_size=self.image_size,
            context_length=self.context_length, label_keys=label_keys, max_captions=max_captions,
            process_index=jax.process_index(), process_count=jax.process_count(), limit=limit,
            tokenizer=tokenizer_for(encoder.model.config.text) if max_captions else None)
        total = min(info.num_examples, limit) if info.num_examples and limit else (info.num_examples or limit or None)
        from clip_jax.input.pipeline import NoUsableData, list_paths

        try:
            return extract(encoder, batches, texts=max_captions > 0, desc=f"embedding {info.name}", total=total,
                           log=self.log)
        except NoUsableData as e:
            files = f" Files: {list_paths(info.files)}." if info.files else ""
            raise NoUsableData(f"evaluation source {info.spec!r}: no usable example (records by kind: "
                               f"{eval_data.diagnose(info, config)}).{files} Evaluation reads an encoded image "
                               "under 'image' (data/*_to_tfrecord.py writes them)") from e

    def _zero_shot(self, encoder, spec, group, feats):
        info = group.info
        metrics, details = {}, {"examples": int(len(feats["image_embeds"]))}
        for key in self._keys[spec]:
            labels = feats["labels"][:, group.label_keys.index(key)]
            if spec not in self._class_meta:  # shapes' own prompts, per label task
                from clip_jax.input import shapes

                task = _SHAPES_TASKS[key]
                prompts, names = shapes.prompts(task, lang=info.lang), shapes.class_names(task, info.lang)
                prefix = f"{task}/"
            else:
                meta = self._class_meta[spec]
                prompts, names = zero_shot.prompts_for(meta), meta["classnames"]
                prefix = f"{_SHAPES_TASKS[key]}/" if info.source.kind == "shapes" else ""
            _check_labels(spec, info, key, labels, len(names))
            weights = zero_shot.classifier_weights(encoder.model, None, prompts, embed_texts=encoder.embed_texts)
            logits = feats["image_embeds"] @ weights.T
            scores = zero_shot.topk_accuracy(logits, labels, ks=(1, 5))
            per_class = zero_shot.per_class_accuracy(logits, labels)
            scores["mean_per_class"] = float(np.nanmean(per_class))
            for name, value in scores.items():
                metrics[f"zero_shot/{info.name}/{prefix}{name}"] = value
            details[prefix + "per_class"] = {n: (None if np.isnan(a) else float(a)) for n, a in zip(names, per_class)}
        return metrics, details

    def _retrieval(self, spec, group, feats):
        info = group.info
        m = int(spec.get("max_captions", 5))
        mask = feats["caption_mask"][:, :m]
        has_caption = mask.any(axis=1)
        images = feats["image_embeds"][has_caption]
        mask = mask[has_caption]
        texts = feats["text_embeds"][has_caption][:, :m][mask]
        owner = np.nonzero(mask)[0]
        if not len(images):
            raise ValueError(f"{spec}: no image of {info.spec} has a caption (caption_key={info.caption_key!r})")
        scores = recall_at_k(images, texts, owner)
        metrics = {f"retrieval/{info.name}/{k}": v for k, v in scores.items()}
        details = {"images": int(len(images)), "captions": int(len(texts)),
                   "images_without_caption": int((~has_caption).sum())}
        if details["images_without_caption"]:
            self.log(f"note: {details['images_without_caption']} images of {info.name} have no caption; "
                     f"left out of retrieval")
        return metrics, details

    def _linear_probe(self, encoder, spec, splits, global_batch):
        from clip_jax.evaluate.linear_probe import linear_probe

        limit = int(spec.get("limit", 0))
        key = spec.get("label_key") or "label"
        feats = {}
        for role, info in splits.items():
            f = self._extract(encoder, info, self.config, global_batch, [key], 0, limit)
            labels = f["labels"][:, 0]
            _check_labels(spec, info, key, labels, len(info.label_names.get(key) or []) or None)
            feats[role] = (f["image_embeds"], labels)
        declared = [len(i.label_names.get(key) or []) for i in splits.values()]
        num_classes = max(declared) or int(max(int(role_labels.max()) for _, role_labels in feats.values()) + 1)
        val = feats.get("val", (None, None))
        start = time.perf_counter()
        result = linear_probe(*feats["train"], *feats["test"], num_classes, val_features=val[0], val_labels=val[1],
                              val_fraction=float(spec.get("val_fraction", 0.2)))
        name = eval_data.metric_name(splits["test"].source).rsplit(".", 1)[0]
        if spec.data.startswith("shapes"):  # which of its label tasks: shapes/color, shapes/shape, shapes/combo
            name += "/" + _SHAPES_TASKS[key]
        elif spec.get("label_key"):
            name += "/" + spec.get("label_key")
        self.log(f"  linear probe {name}: C={result['C']:.3g} in {time.perf_counter() - start:.1f}s")
        metrics = {f"linear_probe/{name}/{k}": float(v) for k, v in result.items()
                   if k in ("top1", "top5", "mean_per_class", "val_top1", "C")}
        details = {k: v for k, v in result.items() if k not in ("top1", "top5", "mean_per_class", "val_top1")}
        details.update({f"{role}_examples": int(len(x)) for role, (x, _) in feats.items()})
        return metrics, _jsonable(details)


def _check_labels(spec, info, key, labels, num_classes):
    missing = int((labels < 0).sum())
    if missing:
        raise ValueError(f"{spec}: {missing} examples of {info.spec} have no label {key!r}: pass label_key=...")
    if num_classes is not None and len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"{spec}: {info.spec} has label {int(labels.max())} in {key!r} but the class list has "
                         f"{num_classes} names: pass classes= with a name for every label, in label order")


def _jsonable(tree):
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return tree.tolist()
    if isinstance(tree, (np.floating, np.integer)):
        return tree.item()
    return tree


# -- formatting ------------------------------------------------------------------------------
def format_table(metrics: dict) -> str:
    """One row per task/dataset, one column per metric."""
    rows: dict = {}
    for key, value in metrics.items():
        task, rest = key.split("/", 1)
        dataset, metric = rest.rsplit("/", 1)  # dataset may hold a sub-task: shapes.test/color
        rows.setdefault((task, dataset), {})[metric] = value
    lines = []
    for (task, dataset), values in rows.items():
        cells = "  ".join(f"{m}={_fmt(m, v)}" for m, v in values.items())
        lines.append(f"{task:13s} {dataset:28s} {cells}")
    return "\n".join(lines)


def _fmt(metric: str, value: float) -> str:
    return f"{value:.3g}" if metric == "C" else f"{100 * value:.1f}%"


# -- command line ------------------------------------------------------------------------------
def load_model(workdir: Optional[str], weights: Optional[str], model_name: Optional[str], step: Optional[int]):
    """(model, variables, description, run config or None, step or None) from a workdir or a weights file."""
    if workdir:
        from clip_jax import runs

        run = runs.read(workdir, step)
        if run.kind == runs.ADAPTATION:  # python -m clip_jax.adapt's
            return run.model, run.variables, f"{workdir} (the towers its adaptation froze)", None, None
        return run.model, run.variables, f"{workdir} step {run.step}", run.config, run.step
    if not weights:
        raise ValueError("pass --workdir=DIR (a training run) or --weights=FILE (an exported or released model)")
    if not os.path.exists(weights) and "://" not in weights:
        raise FileNotFoundError(f"--weights={weights!r} does not exist")
    name = model_name or _model_beside(weights)
    if name is None:
        raise ValueError(f"cannot tell which model {weights!r} holds: pass --model=NAME (clip_jax.list_models(); "
                         f"'-quickgelu' names for OpenAI's weights) or --model=CONFIG.json")
    import clip_jax

    model, variables = clip_jax.load(name, weights)
    return model, variables, weights, None, None


def _model_beside(weights: str):
    """The model config clip_jax.export wrote: PATH.json, or the .safetensors metadata."""
    stem = os.path.splitext(weights)[0]
    if os.path.exists(stem + ".json"):
        return stem + ".json"
    if weights.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weights, framework="numpy") as f:
            meta = f.metadata() or {}
        if "clip_jax_config" in meta:
            return json.loads(meta["clip_jax_config"])
    return None


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clip_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="a training workdir: its latest (or --step) checkpoint")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--weights", help="an exported .safetensors/.msgpack, or open_clip/OpenAI weights")
    parser.add_argument("--model", help="model name or config JSON (default: the one exported beside --weights)")
    parser.add_argument("--eval", action="append", default=[],
                        help="TASK=DATA[|key=value...], repeatable (default: the run config's data.eval)")
    parser.add_argument("--data_dir", default=None, help="tfds data_dir with the prepared datasets")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="a data setting over the run's config.data (JSON values), e.g. "
                             "--data=cache_dir=/tmp/c --data='shapes_sizes={\"test\": 200}'; repeatable")
    parser.add_argument("--batch_size", type=int, default=256, help="global images per step")
    parser.add_argument("--out", default=None, help="JSON results (default: WORKDIR/eval_step{N}.json with --workdir)")
    args = parser.parse_args(argv)

    from clip_jax.parallel import distributed

    distributed.initialize()
    import jax

    log = print if jax.process_index() == 0 else (lambda *_: None)
    model, variables, what, run_config, step = load_model(args.workdir, args.weights, args.model, args.step)
    run_data = run_config.data.to_dict() if run_config else {}
    data_config = {k: v for k, v in run_data.items() if k not in ("train", "eval")}
    for item in args.data:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--data={item!r}: expected KEY=VALUE")
        try:
            data_config[key] = json.loads(value)
        except json.JSONDecodeError:
            data_config[key] = value  # a plain string
    if args.data_dir:
        data_config["data_dir"] = args.data_dir
    specs = parse_evals(args.eval or (run_config.data.eval if run_config else ""))
    if not specs:
        parser.error("no evaluation: pass --eval=TASK=DATA (e.g. --eval=zero_shot=shapes:test)")
    evaluator = Evaluator(specs, data_config, image_size=model.config.vision.image_size,
                          context_length=model.config.text.context_length, log=log)
    from clip_jax.evaluate.features import Encoder
    from clip_jax.parallel import sharding

    mesh = sharding.make_mesh({"data": -1})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    encoder = Encoder(model, jax.device_put(variables, replicated), mesh)
    log(f"evaluating {what} ({model.config.vision.image_size}px) on {len(jax.devices())} devices")
    start = time.perf_counter()
    metrics, details = evaluator.run(encoder, args.batch_size)
    log(format_table(metrics))
    out = args.out or (os.path.join(args.workdir, f"eval_step{step}.json") if args.workdir else None)
    if out and jax.process_index() == 0:
        from etils import epath  # gs:// too

        epath.Path(out).write_text(json.dumps({"model": what, "evals": [str(s) for s in specs], "metrics": metrics,
                                               "details": details, "seconds": time.perf_counter() - start}, indent=2))
        log(f"wrote {out}")
    return metrics
