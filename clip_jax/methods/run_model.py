"""The model a run's config trains: config.model with its overrides, the runtime settings and what
the method or loss brings to the architecture. Below training, evaluation and export, so each of
them rebuilds the same model from a run's config."""

from __future__ import annotations

import math

from clip_jax.models import CLIP, create_model

# SigLIP's temperature and bias init (t = exp(t'), t' = log 10; b = -10) come with its loss.
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}


def model_from_config(config) -> CLIP:
    """The model of config.model with config.model_overrides and the runtime settings; the sigmoid
    loss brings SigLIP's temperature and bias init unless the overrides set them."""
    overrides = config.model_overrides.to_dict() if hasattr(config.model_overrides, "to_dict") \
        else dict(config.model_overrides or {})
    if config.loss == "sigmoid":
        overrides = {**SIGLIP_INIT, **overrides}
    if config.patch_dropout:
        vision = {**overrides.get("vision_cfg", {}), "patch_dropout": config.patch_dropout}
        overrides = {**overrides, "vision_cfg": vision}
    return create_model(config.model, dtype=config.dtype, remat=config.remat, scan=config.scan,
                        attn_impl=config.attn_impl, overrides=overrides)
