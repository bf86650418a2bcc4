"""Prompt templates per class for an adaptation's zero-shot baseline and frozen classifiers."""

from __future__ import annotations

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_prompts(settings, classnames) -> list:
    """[class][k] prompt texts: config.templates if set; else the dataset's own (clip_jax.input.catalog:
    the prompts a source words itself for a label task, in its language; the templates shipped for a
    tfds dataset); else 'a photo of a {}.'."""
    from clip_jax.input import catalog, dataset_info
    from clip_jax.input.pipeline import parse_spec

    templates = settings.templates or DEFAULT_TEMPLATES
    spec = dataset_info.split_specs(settings.dataset)["test"]
    entry, source = catalog.of(spec), parse_spec(spec)
    if not settings.templates:
        own = entry.class_prompts(source, settings.label_key)
        if own is not None and len(own) == len(classnames):
            return own
        templates = entry.templates(source) or templates
    return catalog.prompts_for({"classnames": list(classnames), "templates": list(templates)})
