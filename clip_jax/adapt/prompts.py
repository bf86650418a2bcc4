"""Prompt templates per class for an adaptation's zero-shot baseline and frozen classifiers."""

from __future__ import annotations

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_prompts(settings, classnames) -> list:
    """[class][k] prompt texts: config.templates if set; else the dataset's own (the shapes task's
    prompts in the source's language; a tfds dataset's zero-shot metadata); else 'a photo of a {}.'."""
    from clip_jax.adapt.data import split_specs
    from clip_jax.evaluate.zero_shot import available_metadata, load_metadata, prompts_for
    from clip_jax.input.eval_data import SHAPES_TASKS, source_lang
    from clip_jax.input.pipeline import parse_spec

    templates = settings.templates or DEFAULT_TEMPLATES
    source = parse_spec(split_specs(settings.dataset)["test"])
    if not settings.templates and source.kind == "shapes" and settings.label_key in SHAPES_TASKS:
        from clip_jax.input import shapes

        prompts = shapes.prompts(SHAPES_TASKS[settings.label_key], lang=source_lang(source))
        if len(prompts) == len(classnames):
            return prompts
    if not settings.templates and source.kind == "tfds" and source.name.split("/")[0] in available_metadata():
        templates = load_metadata(source.name.split("/")[0])["templates"]
    return prompts_for({"classnames": list(classnames), "templates": list(templates)})
