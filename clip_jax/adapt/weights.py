"""The frozen CLIP an adaptation starts from: any file clip_jax.load reads, or a training workdir."""

from __future__ import annotations

import os


def load_frozen(settings):
    """(model, variables) of config.weights for config.model (a workdir brings its own model)."""
    from clip_jax.api import load

    path = settings.weights
    if not path:
        raise ValueError("config.weights is empty: give a weights file (.safetensors, .pt, .msgpack) with "
                         "config.model, or a training workdir (python -m clip_jax.train --workdir=DIR)")
    if os.path.isdir(path):
        from clip_jax.export import load_run

        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"config.weights={path!r} is a directory but not a training workdir (no config.json)")
        model, variables, step = load_run(path)
        return model, variables
    if not settings.model:
        raise ValueError(f"config.weights={path!r} is a file: set config.model to its architecture (a preset name "
                         "or a model JSON)")
    model, variables = load(settings.model, path)
    return model, variables
