"""The frozen CLIP an adaptation starts from: any file clip_jax.load reads, or a training workdir."""

from __future__ import annotations


def load_frozen(settings):
    """(model, variables) of config.weights for config.model (a workdir brings its own model, read
    through clip_jax.runs), run in config.dtype with config.remat (the weights stay float32)."""
    from clip_jax.runs import towers

    return towers(settings.weights, settings.model, dtype=settings.dtype, remat=settings.remat)
