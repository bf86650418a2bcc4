"""Prompt templates per class for an adaptation's zero-shot baseline and frozen classifiers."""

from __future__ import annotations

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_prompts(settings, classnames) -> list:
    """[class][k] prompt texts: config.templates if set; else the dataset's own (those its source brings,
    clip_jax.input.dataset_info.class_prompts; a tfds dataset's zero-shot metadata); else 'a photo of a {}.'."""
    from clip_jax.evaluate.zero_shot import available_metadata, load_metadata, prompts_for
    from clip_jax.input.dataset_info import class_prompts as dataset_prompts
    from clip_jax.input.dataset_info import split_specs
    from clip_jax.input.pipeline import parse_spec

    templates = settings.templates or DEFAULT_TEMPLATES
    spec = split_specs(settings.dataset)["test"]
    source = parse_spec(spec)
    if not settings.templates:
        prompts = dataset_prompts(spec, settings.label_key)
        if prompts is not None and len(prompts) == len(classnames):
            return prompts
    if not settings.templates and source.kind == "tfds" and source.name.split("/")[0] in available_metadata():
        templates = load_metadata(source.name.split("/")[0])["templates"]
    return prompts_for({"classnames": list(classnames), "templates": list(templates)})
