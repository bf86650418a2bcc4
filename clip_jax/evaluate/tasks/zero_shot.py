"""zero_shot=DATA: CLIP's zero-shot classification of a split's images against prompt-ensembled
class embeddings. Class names and prompts: classes=NAME|FILE.json, else the source's own
(clip_jax.input.catalog). A source with several label tasks evaluates each (its figures under
TASK/DATASET/SUBTASK/...) unless label_key= names one.

Metrics: zero_shot/DATASET[/SUBTASK]/{top1, top5, mean_per_class}; details: per-class top-1."""

from __future__ import annotations

import numpy as np

from clip_jax.evaluate import zero_shot
from clip_jax.evaluate.tasks.base import TASKS, Read, Task, check_labels
from clip_jax.input import catalog
from clip_jax.input.pipeline import parse_spec


@TASKS.register("zero_shot")
class ZeroShot(Task):
    metric_prefix = "zero_shot"
    options = frozenset({"label_key", "limit", "classes"})
    named_by = frozenset({"label_key"})
    predictions = ("image_embeds", "text_embeds")  # the text tower embeds the prompts
    embeds = "image_embeds"  # the prediction classified (zero_shot_audio: the clips')

    def __init__(self, spec, data_config, log=print):
        super().__init__(spec, data_config, log)
        self.catalog = catalog.of(spec.data)
        self.label_keys = self._label_keys()
        self.classes: dict = {}

    def _label_keys(self) -> list:
        if self.spec.get("label_key"):
            return [self.spec.get("label_key")]
        source = parse_spec(self.spec.data)
        keys = self.catalog.default_label_keys(source)
        if self.spec.get("classes") and len(keys) > 1:  # one list of names cannot serve several label tasks
            raise ValueError(f"{self.spec}: classes= on {source.kind} needs label_key= naming the labels they are for "
                             f"(one of {keys})")
        return keys

    def reads(self):
        return {"data": Read(self.spec.data, self.limit, tuple(self.label_keys), predictions=(self.embeds,))}

    def prepare(self, infos):
        super().prepare(infos)
        info = infos["data"]
        for key in self.label_keys:
            if self.spec.get("classes"):
                classes = catalog.from_file(self.spec.get("classes"))
            else:
                classes = self.catalog.class_names(info, key, self.log)
            if classes is None:
                raise ValueError(f"{self.spec}: no class names for {info.spec}: pass classes=NAME (one of "
                                 f"{catalog.available_metadata()}) or classes=FILE.json")
            declared = info.label_names.get(key)
            if declared is not None and len(declared) != len(classes.names):
                raise ValueError(
                    f"{self.spec}: the class-name list has {len(classes.names)} names but {info.spec} declares "
                    f"{len(declared)} classes in {key!r}: pass classes= with {len(declared)} names in the "
                    f"dataset's label order"
                )
            self.classes[key] = classes

    def evaluate(self, features, encoder):
        info, feats = self.infos["data"], features["data"]
        metrics, details = {}, {"examples": int(len(feats[self.embeds]))}
        for j, key in enumerate(self.label_keys):
            labels = feats["labels"][:, j]
            classes = self.classes[key]
            sub = self.catalog.task_name(key)
            prefix = f"{sub}/" if sub else ""
            check_labels(self.spec, info, key, labels, len(classes.names))
            weights = zero_shot.classifier_weights(encoder.model, None, classes.prompts,
                                                   embed_texts=encoder.embed_texts)
            logits = feats[self.embeds] @ weights.T
            scores = zero_shot.topk_accuracy(logits, labels, ks=(1, 5))
            per_class = zero_shot.per_class_accuracy(logits, labels)
            scores["mean_per_class"] = float(np.nanmean(per_class))
            for name, value in scores.items():
                metrics[f"{self.metric_prefix}/{self.named(info.name)}/{prefix}{name}"] = value
            details[prefix + "per_class"] = {n: (None if np.isnan(a) else float(a))
                                             for n, a in zip(classes.names, per_class)}
        return metrics, details
