"""The frozen CLIP an adaptation starts from: any file clip_jax.load reads, or a training workdir."""

from __future__ import annotations

import os


def load_frozen(settings):
    """(model, variables) of config.weights for config.model (a workdir brings its own model), run in
    config.dtype with config.remat (the weights stay float32)."""
    from clip_jax.api import load

    path = settings.weights
    if not path:
        raise ValueError("config.weights is empty: give a weights file (.safetensors, .pt, .msgpack) with "
                         "config.model, or a training workdir (python -m clip_jax.train --workdir=DIR)")
    options = dict(dtype=settings.dtype, remat=settings.remat)
    if os.path.isdir(path):
        from clip_jax.export import load_run
        from clip_jax.models import create_model

        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"config.weights={path!r} is a directory but not a training workdir (no config.json)")
        model, variables, step = load_run(path)
        return create_model(model.config, **options), variables
    if not settings.model:
        raise ValueError(f"config.weights={path!r} is a file: set config.model to its architecture (a preset name "
                         "or a model JSON)")
    return load(settings.model, path, **options)
