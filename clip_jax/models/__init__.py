"""CLIP towers as Flax (linen) modules, presets, and model construction.

Logical axis names carried by the parameters (resolved to mesh axes by the trainer's
rules, never by the layers): 'embed' (model width), 'mlp' (MLP hidden), 'heads',
'kv' (head dim), 'vocab', 'layers' (the scan axis), 'conv_in' / 'conv_out' (ResNet
channels); None marks an axis that is never sharded (positions, the q/k/v triple).
"""

from __future__ import annotations

from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.clip import CLIP, MAX_LOGIT_SCALE, l2_normalize
from clip_jax.models.config import CLIPConfig, TextConfig, VisionConfig, get_model_config, list_models
from clip_jax.models.layers import ATTN_IMPLS, remat_policy

AXES = ("embed", "mlp", "heads", "kv", "vocab", "layers", "conv_in", "conv_out")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(
    name_or_config: Union[str, dict, CLIPConfig],
    dtype: Union[str, jnp.dtype] = "float32",
    remat: str = "none",
    scan: bool = False,
    attn_impl: Optional[str] = None,
    overrides: Optional[dict] = None,
) -> CLIP:
    """A CLIP module for a preset name (see ``list_models()``), an open_clip-style dict or JSON path,
    with `overrides` (open_clip JSON keys) merged over its architecture."""
    config = get_model_config(name_or_config, overrides)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported: use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl {attn_impl!r} not supported: use 'auto' (cuDNN's fused kernel on NVIDIA "
                         "GPUs in 16 bits, else XLA's), 'xla' or 'cudnn'")
    if remat != "none":
        remat_policy(remat)  # an unknown policy name fails here, before any tracing
    return CLIP(config, dtype=dtype, remat=remat, scan=scan, attn_impl=attn_impl)


def dummy_inputs(model: CLIP, batch: int = 1):
    cfg = model.config
    images = jnp.zeros((batch, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
    tokens = jnp.zeros((batch, cfg.text.context_length), jnp.int32)
    return images, tokens


def init_variables(model: CLIP, rng: jax.Array, boxed: bool = False):
    """Random variables {'params': ...[, 'batch_stats': ...]}; ``boxed`` keeps the logical-axis boxes."""
    variables = jax.jit(model.init)(rng, *dummy_inputs(model))  # jit: one compile beats op-by-op init
    return variables if boxed else nn.meta.unbox(variables)


def variable_shapes(model: CLIP, boxed: bool = False):
    """Shapes/dtypes of the variables, without allocating them (``jax.eval_shape``)."""
    shapes = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model)), jax.random.key(0))
    return shapes if boxed else nn.meta.unbox(shapes)


def logical_axes(model: CLIP):
    """The tree of logical PartitionSpecs (names above) for the model's variables."""
    return nn.get_partition_spec(variable_shapes(model, boxed=True))


__all__ = [
    "AXES",
    "CLIP",
    "CLIPConfig",
    "MAX_LOGIT_SCALE",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "dummy_inputs",
    "get_model_config",
    "init_variables",
    "l2_normalize",
    "list_models",
    "logical_axes",
    "variable_shapes",
]
