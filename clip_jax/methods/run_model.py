"""The model a run's config trains: config.model with its overrides, the runtime settings and what
the method or its loss brings to the architecture (Method.model_overrides). Below training,
evaluation and export, so each of them rebuilds the same model from a run's config."""

from __future__ import annotations

from clip_jax.models import CLIP, create_model


def model_from_config(config) -> CLIP:
    """The model of config.model with config.model_overrides, what the method brings to it (a loss's
    init, a tower setting), and the runtime settings."""
    from clip_jax.methods import METHODS

    overrides = config.model_overrides.to_dict() if hasattr(config.model_overrides, "to_dict") \
        else dict(config.model_overrides or {})
    overrides = METHODS.get(config.method).model_overrides(config, overrides)
    return create_model(config.model, dtype=config.dtype, remat=config.remat, scan=config.scan,
                        attn_impl=config.attn_impl, overrides=overrides)
