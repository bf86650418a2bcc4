"""clip_jax's evaluation figures as CLIP_benchmark's result files, which ``clip_benchmark build`` aggregates
beside any other model's (python -m clip_jax.evaluate --format=clip_benchmark --out=DIR).

One JSON per dataset and task, as CLIP_benchmark's eval dumps it: dataset ("wds/NAME", the folder
clip_jax.input.wds_layout names), model, pretrained, task (zeroshot_classification,
zeroshot_retrieval, linear_probe), metrics in its names (acc1, acc5, mean_per_class_recall;
image_retrieval_recall@K = text to image, text_retrieval_recall@K = image to text; lp_acc1, ...) and
language; with the split the figures are of, which CLIP_benchmark's own files leave to their name.

    python -m clip_jax.evaluate.clip_benchmark eval|build ARGS   (= clip_benchmark ARGS, also on NumPy >= 2.4)

runs CLIP_benchmark's own command line (a test-only reference of clip_jax: pip install clip-benchmark),
with its zero-shot top-k count read as .item(): CLIP_benchmark 1.6.2 takes float() of a 1-element
array there, which NumPy 2.4 refuses (a TypeError); nothing else of it is touched.
"""

from __future__ import annotations

import json
import os

from clip_jax.input.wds_layout import dataset_folder, language_of

TASK_NAMES = {"zero_shot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
              "linear_probe": "linear_probe"}
METRIC_NAMES = {
    "zero_shot": {"top1": "acc1", "top5": "acc5", "mean_per_class": "mean_per_class_recall"},
    "linear_probe": {"top1": "lp_acc1", "top5": "lp_acc5", "mean_per_class": "lp_mean_per_class_recall"},
    "retrieval": {f"{ours}_R{k}": f"{theirs}_recall@{k}" for k in (1, 5, 10)
                  for ours, theirs in (("text_to_image", "image_retrieval"), ("image_to_text", "text_retrieval"))},
}


def results(metrics: dict, model: str, pretrained: str) -> list[dict]:
    """CLIP_benchmark's result dicts of clip_jax metrics {TASK/DATASET.SPLIT[/SUBTASK]/METRIC: value}
    (linear_probe: TASK/DATASET[/SUBTASK]/METRIC); the figures CLIP_benchmark has no name for are left out."""
    grouped: dict = {}
    for key, value in metrics.items():
        task, where, *sub, metric = key.split("/")
        name = METRIC_NAMES.get(task, {}).get(metric)
        if name is None:
            continue
        base, _, split = where.rpartition(".") if task != "linear_probe" else (where, "", "test")
        folder = dataset_folder(base, task, "/".join(sub) or None)
        entry = grouped.setdefault((folder, split, task), {
            "dataset": f"wds/{folder}", "model": model, "pretrained": pretrained, "task": TASK_NAMES[task],
            "metrics": {}, "language": language_of(base), "split": split})
        entry["metrics"][name] = float(value)
    return list(grouped.values())


def write(metrics: dict, out_dir: str, model: str, pretrained: str) -> list[str]:
    """The result files in `out_dir`, named as CLIP_benchmark's: DATASET_SPLIT_TASK.json."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for entry in results(metrics, model, pretrained):
        slug = entry["dataset"].split("/", 1)[1]
        paths.append(os.path.join(out_dir, f"{slug}_{entry['split']}_{entry['task']}.json"))
        with open(paths[-1], "w") as f:
            json.dump(entry, f, indent=1)
    return paths


# -- running CLIP_benchmark itself -----------------------------------------------------------------
def _numpy_refuses_array_scalars() -> bool:
    import numpy as np

    try:
        float(np.ones(1))
    except TypeError:
        return True
    return False


def _topk_accuracy(output, target, topk=(1,)):
    """The share of rows whose target is among their k largest logits, for each k (what CLIP_benchmark's
    zero-shot accuracy reports), counted in Python floats: its own takes float() of a 1-element array,
    which NumPy 2.4 refuses."""
    hits = output.topk(max(topk), dim=1).indices == target[:, None]  # [N, max k], one True at most per row
    return [hits[:, :k].any(dim=1).sum().item() / len(target) for k in topk]


def main(argv=None):
    """``clip_benchmark ARGS`` (CLIP_benchmark's own command line, in this process), runnable on NumPy >= 2.4."""
    import sys

    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    if _numpy_refuses_array_scalars():
        zeroshot_classification.accuracy = _topk_accuracy
    sys.argv = ["clip_benchmark"] + list(sys.argv[1:] if argv is None else argv)
    return cli.main()


if __name__ == "__main__":
    import sys

    sys.exit(main())
