"""linear_probe=DATA: logistic regression on frozen image embeddings (the CLIP paper's protocol,
clip_jax.evaluate.linear_probe), trained on one split, C chosen on a validation split (val=, else
the dataset's own validation split, else val_fraction of train held out), scored on test.
DATA names a dataset without a split (train=, val=, test= name its splits, or whole data specs);
data that names no splits (a TFRecord glob) is the train set and needs test=KIND:GLOB.

Metrics: linear_probe/DATASET[/SUBTASK]/{top1, top5, mean_per_class, val_top1, C}."""

from __future__ import annotations

import time

from clip_jax.evaluate.tasks.base import TASKS, Read, Task, check_labels, jsonable
from clip_jax.input import catalog
from clip_jax.input.eval_data import metric_name
from clip_jax.input.pipeline import SOURCES

_METRICS = ("top1", "top5", "mean_per_class", "val_top1")


@TASKS.register("linear_probe")
class LinearProbe(Task):
    options = frozenset({"label_key", "limit", "train", "val", "test", "val_fraction"})
    named_by = frozenset({"label_key"})

    @classmethod
    def check_data(cls, data):
        return catalog.of(data).with_split(data, "train")

    @property
    def label_key(self) -> str:
        return self.spec.get("label_key") or "label"

    def reads(self):
        entry, data = catalog.of(self.spec.data), self.spec.data
        splitless = entry.with_split(data, "test") == data  # a glob is its own split
        kind = catalog.kind_of(data)
        if splitless and catalog.kind_of(self.spec.get("test") or "") != kind:
            raise ValueError(f"{self.spec}: a {kind} linear probe trains on DATA and needs its test set as "
                             f"test={kind}:GLOB (and optionally val={kind}:GLOB)")
        reads = {}
        for role, default in (("train", "train"), ("test", "test"), ("val", None)):
            chosen = self.spec.get(role, default)
            if chosen is not None:
                whole = catalog.kind_of(chosen) in SOURCES  # a data spec of its own, not a split's name
                reads[role] = Read(chosen if whole else entry.with_split(data, chosen), self.limit,
                                   (self.label_key,))
        if "val" not in reads and not splitless:  # the dataset's own validation split, where it has one
            reads["val"] = Read(entry.with_split(data, "validation"), self.limit, (self.label_key,), optional=True)
        return reads

    def dataset_name(self) -> str:
        return metric_name(self.infos["test"].source).rsplit(".", 1)[0]  # the dataset, whichever splits

    def evaluate(self, features, encoder):
        from clip_jax.evaluate.linear_probe import linear_probe

        key = self.label_key
        feats = {}
        for role, info in self.infos.items():
            labels = features[role]["labels"][:, 0]
            check_labels(self.spec, info, key, labels, len(info.label_names.get(key) or []) or None)
            feats[role] = (features[role]["image_embeds"], labels)
        declared = [len(i.label_names.get(key) or []) for i in self.infos.values()]
        num_classes = max(declared) or int(max(int(role_labels.max()) for _, role_labels in feats.values()) + 1)
        val = feats.get("val", (None, None))
        start = time.perf_counter()
        result = linear_probe(*feats["train"], *feats["test"], num_classes, val_features=val[0], val_labels=val[1],
                              val_fraction=float(self.spec.get("val_fraction", 0.2)))
        name = self.named(self.dataset_name())
        sub = catalog.of(self.spec.data).task_name(key) or self.spec.get("label_key")
        if sub:  # which label task: 'cifar100/coarse_label', or the source's own name for it
            name += "/" + sub
        self.log(f"  linear probe {name}: C={result['C']:.3g} in {time.perf_counter() - start:.1f}s")
        metrics = {f"linear_probe/{name}/{k}": float(v) for k, v in result.items() if k in _METRICS + ("C",)}
        details = {k: v for k, v in result.items() if k not in _METRICS}
        details.update({f"{role}_examples": int(len(x)) for role, (x, _) in feats.items()})
        return metrics, jsonable(details)
