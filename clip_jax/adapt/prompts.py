"""Prompt templates per class for an adaptation's zero-shot baseline and frozen classifiers."""

from __future__ import annotations

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_prompts(settings, classnames) -> list:
    """[class][k] prompt texts: config.templates if set; else the dataset's own (the shapes task's
    prompts; a tfds dataset's zero-shot metadata); else 'a photo of a {}.'."""
    if settings.templates:
        return [[t.format(name) for t in settings.templates] for name in classnames]
    dataset = str(settings.dataset)
    if dataset.startswith("shapes"):
        from clip_jax.input import shapes
        from clip_jax.input.eval_data import SHAPES_TASKS

        lang = dataset.partition("|lang=")[2] or "en"
        if settings.label_key in SHAPES_TASKS:
            prompts = shapes.prompts(SHAPES_TASKS[settings.label_key], lang=lang)
            if len(prompts) == len(classnames):
                return prompts
    if dataset.startswith("tfds:"):
        from clip_jax.evaluate.zero_shot import available_metadata, load_metadata

        name = dataset[len("tfds:"):].split("/")[0].split("|")[0]
        if name in available_metadata():
            templates = load_metadata(name)["templates"]
            return [[t.format(c) for t in templates] for c in classnames]
    return [[t.format(name) for t in DEFAULT_TEMPLATES] for name in classnames]
