"""Evaluate a trained model: zero-shot classification, image-text retrieval, linear probes.

    python -m clip_jax.evaluate --workdir=DIR [--step=N] [--eval=SPEC ...] [--out=FILE.json]
    python -m clip_jax.evaluate --weights=PATH.safetensors|.msgpack|.pt [--model=NAME] --eval=SPEC ...
    python -m clip_jax.evaluate --weights=DIR|hf-hub:ORG/NAME --eval=SPEC ...   (transformers' layouts)
    python -m clip_jax.evaluate --workdir=DIR --format=clip_benchmark --out=RESULTS   (CLIP_benchmark's JSON files)

An evaluation SPEC is TASK=DATA[|key=value...]:

    zero_shot=tfds:cifar10:test                 class names + templates shipped for cifar10
    zero_shot=tfds:mydata:test|classes=my.json  your own {"classnames": [...], "templates": [...]}
    zero_shot=DATA|lang=zh                      a source's own options (the built-in dataset's language)
    retrieval=tfds:coco_captions:test|caption_key=captions/text|max_captions=5
    linear_probe=tfds:cifar10                   train / validation / test splits (options train=, val=, test=)

Each task is a class of its own (clip_jax/evaluate/tasks/) with the options it takes: classes,
label_key, caption_key, max_captions (default 5), limit (examples per split), and for
linear_probe train, val (default: the dataset's validation split, else 20% of train held out),
test. What a source offers (its label tasks, class names and prompts per language, the options
of its data spec) comes from clip_jax.input.catalog. The same specs, comma-separated, go in a
training config's data.eval and run every eval_every_steps; their figures go to metrics.jsonl
and TensorBoard.
Metric keys: TASK/DATASET.SPLIT/METRIC, e.g. zero_shot/cifar10.test/top1, or with a source's
label task TASK/DATASET.SPLIT/SUBTASK/METRIC. Several specs of one task on one dataset are told
apart by the options in which they differ: segmentation/ade20k.validation.labels-color/miou
beside segmentation/ade20k.validation/miou (tag_collisions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Callable, Optional

from clip_jax.evaluate.tasks import TASKS
from clip_jax.input import catalog, eval_data
from clip_jax.input.catalog import find_metadata
from clip_jax.input.pipeline import SOURCES

__all__ = ["EvalSpec", "Evaluator", "find_metadata", "format_table", "load_model", "main", "parse_evals"]


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
    """'zero_shot=tfds:cifar10:test,retrieval=tfds:coco_captions:test|max_captions=5' -> specs.

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
        task_options = TASKS.get(task).options
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if key in catalog.of(data).data_options:  # the data's own, e.g. a language: DATA|lang=zh
                data += f"|{pair}"
                continue
            if not sep or key not in task_options:
                raise ValueError(f"evaluation {item!r}: unknown option {pair!r} for {task}; "
                                 f"options: {sorted(task_options)}")
            options[key] = value
        eval_data.parse_spec(TASKS.get(task).check_data(data))  # a bad data spec fails here
        specs.append(EvalSpec(task, data.strip(), tuple(sorted(options.items()))))
    return specs


# -- the evaluator -------------------------------------------------------------------------
@dataclasses.dataclass
class _Group:
    """One pass over one split (with one limit) serves every task that reads it."""

    data: str
    limit: int
    info: object = None
    config: dict = None
    label_keys: list = dataclasses.field(default_factory=list)
    max_captions: int = 0
    caption_key: Optional[str] = None
    predictions: list = dataclasses.field(default_factory=list)
    features: list = dataclasses.field(default_factory=list)  # other record features the tasks read
    optional: bool = True  # every read of it is optional: a split that does not exist is left out
    readers: list = dataclasses.field(default_factory=list)  # (task index, role, Read)

    def add(self, index: int, role: str, read) -> None:
        self.readers.append((index, role, read))
        self.label_keys += [k for k in read.label_keys if k not in self.label_keys]
        self.max_captions = max(self.max_captions, read.max_captions)
        self.caption_key = self.caption_key or read.caption_key
        self.predictions += [p for p in read.predictions if p not in self.predictions]
        self.features += [f for f in read.features if f not in self.features]
        if set(self.features) & set(self.predictions):  # both arrive under their names in a task's features
            raise ValueError(f"{sorted(set(self.features) & set(self.predictions))} name both a record feature and a "
                             "prediction read from one split: name the method's prediction otherwise")
        self.optional = self.optional and read.optional


class Evaluator:
    """Checks every spec at construction (datasets, splits, keys, class names); run() evaluates."""

    def __init__(self, specs, data_config, *, image_size: int, context_length: int, log: Callable = print):
        items = specs if isinstance(specs, (list, tuple)) else [specs]
        self.specs = [x for item in items for x in ([item] if isinstance(item, EvalSpec) else parse_evals(item))]
        self.config = data_config
        self.image_size = image_size
        self.context_length = context_length
        self.log = log
        self.tasks = [TASKS.get(spec.task)(spec, data_config, log) for spec in self.specs]
        self.groups: dict = {}
        for index, task in enumerate(self.tasks):
            for role, read in task.reads().items():
                self.groups.setdefault((read.data, read.limit), _Group(read.data, read.limit)).add(index, role, read)
        for key, group in list(self.groups.items()):
            group.config = dict(self.config)
            if group.caption_key:
                group.config["caption_key"] = group.caption_key
            try:
                group.info = eval_data.describe(group.data, group.config, label_keys=group.label_keys,
                                                need_captions=group.max_captions > 0)
                eval_data.check_features(group.info, group.config, group.features)
            except (ValueError, FileNotFoundError) as e:
                if group.optional and isinstance(e, ValueError):  # e.g. no validation split: a probe holds out train
                    del self.groups[key]
                    continue
                if type(e) not in (ValueError, FileNotFoundError):
                    raise
                raise type(e)(f"{self._names(group)}: {e}") from None  # which specs read the split
        for index, task in enumerate(self.tasks):
            task.prepare({role: group.info for group in self.groups.values() for i, role, _ in group.readers
                          if i == index})
        tag_collisions(self.tasks)

    def _names(self, group) -> str:
        return ", ".join(dict.fromkeys(str(self.specs[i]) for i, _, _ in group.readers))

    @property
    def probes(self) -> list:
        """(spec, {role: SplitInfo}) of every linear probe: the splits it resolved."""
        return [(task.spec, task.infos) for task in self.tasks if task.spec.task == "linear_probe"]

    # -- running ----------------------------------------------------------------------------
    def run(self, encoder, batch_size: int = 256) -> tuple[dict, dict]:
        """(metrics {TASK/DATASET/METRIC: float}, details {spec: per-class accuracies, counts, sweeps})."""
        import jax

        for task in self.tasks:
            encoder.require(task.predictions, str(task.spec))
        global_batch = encoder.round_batch(max(batch_size, jax.process_count()))
        waiting = {i: {id(g) for g in self.groups.values() for j, _, _ in g.readers if j == i}
                   for i in range(len(self.tasks))}
        inputs: dict = {i: {} for i in range(len(self.tasks))}
        results = {}
        for group in self.groups.values():
            feats = self._extract(encoder, group, global_batch)
            for index, role, read in group.readers:
                inputs[index][role] = _view(feats, group, read)
                waiting[index].discard(id(group))
            for index in dict.fromkeys(i for i, _, _ in group.readers):
                if not waiting[index]:  # every split it reads is embedded: evaluate it, drop its inputs
                    results[index] = self.tasks[index].evaluate(inputs.pop(index), encoder)
            del feats
        metrics, details = {}, {}
        for index, task in enumerate(self.tasks):
            if index not in results:  # a task that reads no split (or only optional ones that do not exist)
                results[index] = task.evaluate(inputs.pop(index), encoder)
            m, d = results[index]
            metrics.update(m)
            details[str(task.spec)] = d
        return metrics, details

    def _extract(self, encoder, group, global_batch):
        import jax

        from clip_jax.evaluate.features import extract
        from clip_jax.tokenizers import tokenizer_for

        info, config, limit, max_captions = group.info, group.config, group.limit, group.max_captions
        # the record features the predictions read besides images and captions (a clip), read but not kept
        reads = {r for name in group.predictions
                 for r in (encoder.predictions[name].reads,) + encoder.predictions[name].also_reads}
        inputs = [r for r in sorted(reads - {"image", "tokens", None}) if r not in group.features]
        batches = eval_data.eval_batches(
            info, config, batch_size=global_batch // jax.process_count(), image_size=self.image_size,
            context_length=self.context_length, label_keys=group.label_keys, max_captions=max_captions,
            process_index=jax.process_index(), process_count=jax.process_count(), limit=limit,
            tokenizer=tokenizer_for(encoder.model.config.text) if max_captions else None,
            features=list(group.features) + inputs, image="image" in reads or "image" in group.features)
        total = min(info.num_examples, limit) if info.num_examples and limit else (info.num_examples or limit or None)
        from clip_jax.input.pipeline import NoUsableData, list_paths

        try:
            return extract(encoder, batches, predictions=group.predictions, desc=f"embedding {info.name}", total=total,
                           log=self.log, features=group.features)
        except NoUsableData as e:
            files = f" Files: {list_paths(info.files)}." if info.files else ""
            raise NoUsableData(f"evaluation source {info.spec!r}: no usable example (records by kind: "
                               f"{eval_data.diagnose(info, config)}).{files} Evaluation reads an encoded image "
                               "under 'image' (data/*_to_tfrecord.py writes them)") from e


def tag_collisions(tasks) -> None:
    """Specs of one task on one dataset would write the same keys TASK/DATASET/...: each gets the options in
    which they differ as a tag, TASK/DATASET.OPTION-VALUE[.OPTION-VALUE]/... (an option a spec leaves out adds
    nothing to its name, so a spec with none of them keeps the plain keys). Specs that differ in no option are
    an error naming both."""
    alike: dict = {}
    for task in tasks:
        named = tuple((k, task.spec.get(k)) for k in sorted(task.named_by))  # already apart in their keys
        alike.setdefault((task.spec.task, task.dataset_name(), named), []).append(task)
    for (kind, name, _), group in alike.items():
        if len(group) < 2:
            continue
        options = [dict(task.spec.options) for task in group]
        differ = sorted(k for k in set().union(*options) if len({o.get(k) for o in options}) > 1)
        seen: dict = {}
        for task, own in zip(group, options):
            task.tag = ".".join(f"{k}-" + re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(own[k])).strip("_")
                                for k in differ if k in own)
            other = seen.setdefault(task.tag, task)
            if other is not task:
                fix = ("they read different data of one metric name: rename one's files or evaluate them apart"
                       if other.spec.data != task.spec.data else "they are the same evaluation: drop one")
                raise ValueError(f"evaluations {other.spec} and {task.spec} would both write the metric keys "
                                 f"{kind}/{task.named(name)}/...: {fix}")


def _view(feats: dict, group: _Group, read) -> dict:
    """A group's features as one read asked for them: its label columns, in its order."""
    out = dict(feats)
    if "labels" in feats:
        out["labels"] = feats["labels"][:, [group.label_keys.index(k) for k in read.label_keys]]
    return out


# -- formatting ------------------------------------------------------------------------------
def format_table(metrics: dict) -> str:
    """One row per task/dataset, one column per metric."""
    rows: dict = {}
    for key, value in metrics.items():
        task, rest = key.split("/", 1)
        dataset, metric = rest.rsplit("/", 1)  # dataset may hold a sub-task: DATASET.SPLIT/SUBTASK
        rows.setdefault((task, dataset), {})[metric] = value
    lines = []
    for (task, dataset), values in rows.items():
        cells = "  ".join(f"{m}={_fmt(m, v)}" for m, v in values.items())
        lines.append(f"{task:13s} {dataset:28s} {cells}")
    return "\n".join(lines)


def _fmt(metric: str, value: float) -> str:
    if metric == "C" or metric.endswith(("_MdR", "_MnR")):  # a linear probe's C; video retrieval's ranks
        return f"{value:.3g}"
    return f"{100 * value:.1f}%"


# -- command line ------------------------------------------------------------------------------
def load_model(workdir: Optional[str], weights: Optional[str], model_name: Optional[str], step: Optional[int]):
    """(model, variables, description, run config or None, step or None) from a workdir or a weights file."""
    if workdir:
        from clip_jax import runs

        run = runs.read(workdir, step)
        if run.kind == runs.ADAPTATION:  # python -m clip_jax.adapt's
            return run.model, run.variables, f"{workdir} (the towers its adaptation froze)", None, None
        own = run.method.model_variables(run.params, run.model_state)
        if set(own["params"]) - set(run.method.export(run.params, run.model_state)["towers"]["params"]):
            # a model of more than the towers (LSeg's head): its predictions need the method's own variables
            return run.method.model, own, f"{workdir} step {run.step}", run.config, run.step
        return run.model, run.variables, f"{workdir} step {run.step}", run.config, run.step
    if not weights:
        raise ValueError("pass --workdir=DIR (a training run) or --weights=FILE (an exported or released model)")
    from clip_jax import hf_layouts, hub

    if hub.is_hub_name(weights) or hf_layouts.is_model_dir(weights):  # its config is the architecture
        import clip_jax

        model, variables = clip_jax.load(model_name, weights) if model_name else clip_jax.load(weights)
        return model, variables, weights, None, None
    if not os.path.exists(weights) and "://" not in weights:
        raise FileNotFoundError(f"--weights={weights!r} does not exist")
    name = model_name or _model_beside(weights)
    if name is None:
        raise ValueError(f"cannot tell which model {weights!r} holds: pass --model=NAME (clip_jax.list_models(); "
                         f"'-quickgelu' names for OpenAI's weights) or --model=CONFIG.json")
    import clip_jax

    model, variables = clip_jax.load(name, weights)
    return model, variables, weights, None, None


def method_predictions(run_config, model, mesh) -> dict:
    """The predict functions of the method a run trained (its config's), or CLIP's for bare weights
    and for the towers an adaptation froze."""
    from clip_jax.methods import METHODS
    from clip_jax.methods.base import two_tower_predictions

    if run_config is None:
        return two_tower_predictions(model)
    return METHODS.get(run_config.method)(run_config, model, mesh).predictions()


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
    parser.add_argument("--weights", help="an exported .safetensors/.msgpack, open_clip/OpenAI weights, or a "
                        "transformers model directory / hf-hub:ORG/NAME (its config gives the model)")
    parser.add_argument("--model", help="model name or config JSON (default: the one exported beside --weights)")
    parser.add_argument("--eval", action="append", default=[],
                        help="TASK=DATA[|key=value...], repeatable (default: the run config's data.eval)")
    parser.add_argument("--data_dir", default=None, help="tfds data_dir with the prepared datasets")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="a data setting over the run's config.data (JSON values), e.g. "
                             "--data=cache_dir=/tmp/c --data='label_keys=[\"label\"]'; repeatable")
    parser.add_argument("--batch_size", type=int, default=256, help="global images per step")
    parser.add_argument("--out", default=None, help="JSON results (default: WORKDIR/eval_step{N}.json with --workdir); "
                        "with --format=clip_benchmark a directory")
    parser.add_argument("--format", choices=("clip_jax", "clip_benchmark"), default="clip_jax",
                        help="clip_benchmark: one result JSON per dataset and task in CLIP_benchmark's format "
                             "(clip_jax.evaluate.clip_benchmark), for `clip_benchmark build`")
    args = parser.parse_args(argv)
    if args.format == "clip_benchmark" and not args.out:
        parser.error("--format=clip_benchmark writes its files to a directory: pass --out=DIR")

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
        parser.error("no evaluation: pass --eval=TASK=DATA (e.g. --eval=zero_shot=tfds:cifar10:test)")
    evaluator = Evaluator(specs, data_config, image_size=model.config.vision.image_size,
                          context_length=model.config.text.context_length, log=log)
    from clip_jax.evaluate.features import Encoder
    from clip_jax.parallel import sharding

    mesh = sharding.make_mesh({"data": -1})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    encoder = Encoder(model, jax.device_put(variables, replicated), mesh,
                      predictions=method_predictions(run_config, model, mesh))
    log(f"evaluating {what} ({model.config.vision.image_size}px) on {len(jax.devices())} devices")
    start = time.perf_counter()
    metrics, details = evaluator.run(encoder, args.batch_size)
    log(format_table(metrics))
    if args.format == "clip_benchmark":
        if jax.process_index() == 0:
            from clip_jax.evaluate import clip_benchmark

            name = args.model or (run_config.model if run_config else "clip_jax")
            for path in clip_benchmark.write(metrics, args.out, name if isinstance(name, str) else "clip_jax", what):
                log(f"wrote {path}")
        return metrics
    out = args.out or (os.path.join(args.workdir, f"eval_step{step}.json") if args.workdir else None)
    if out and jax.process_index() == 0:
        from etils import epath  # gs:// too

        epath.Path(out).write_text(json.dumps({"model": what, "evals": [str(s) for s in specs], "metrics": metrics,
                                               "details": details, "seconds": time.perf_counter() - start}, indent=2))
        log(f"wrote {out}")
    return metrics
