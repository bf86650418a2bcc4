"""Swin weights in from timm's state dict layout (swin_tiny_patch4_window7_224 and its family): the
SwinTransformer of clip_jax.models.swin, its shapes read from the state dict where no model is given."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clip_jax import convert
from clip_jax.models.swin import SwinTransformer

_BUFFERS = ("relative_position_index", "attn_mask")
_CLASSIFIER = re.compile(r"^head\.(fc\.)?(weight|bias)$")  # timm's (head.fc) or the original layout's (head)


def timm_key(path: tuple) -> str:
    """A param path of SwinTransformer -> its timm state dict key."""
    names = [re.sub(r"^(layers|blocks)_(\d+)$", r"\1.\2", p) for p in path]
    names = ["mlp." + p if p in ("fc1", "fc2") else p for p in names]
    if names[-1] in ("scale", "kernel") or names[-1] == "reduction":
        names[-1] = {"scale": "weight", "kernel": "weight", "reduction": "reduction.weight"}[names[-1]]
    return ".".join(names)


def _to_flax(path: tuple, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # a conv's [out, in, kh, kw] -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and path[-1] in ("kernel", "reduction"):  # a Linear's [out, in] -> [in, out]
        return value.T
    return value


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 and path[-1] in ("kernel", "reduction") else shape


def model_from_timm(state_dict: Mapping[str, Any]) -> SwinTransformer:
    """The SwinTransformer (no projection) whose shapes a timm Swin state dict has."""
    try:
        weight = np.shape(state_dict["patch_embed.proj.weight"])
        depths = []
        while any(k.startswith(f"layers.{len(depths)}.") for k in state_dict):
            i = len(depths)
            depths.append(len({k.split(".")[3] for k in state_dict if k.startswith(f"layers.{i}.blocks.")}))
        heads = tuple(np.shape(state_dict[f"layers.{i}.blocks.0.attn.relative_position_bias_table"])[1]
                      for i in range(len(depths)))
        rows = np.shape(state_dict["layers.0.blocks.0.attn.relative_position_bias_table"])[0]
        hidden = np.shape(state_dict["layers.0.blocks.0.mlp.fc1.weight"])[0]
    except KeyError as e:
        raise ValueError(f"not a timm Swin state dict: it has no {e.args[0]!r}") from None
    return SwinTransformer(depths=tuple(depths), heads=heads, width=weight[0], patch_size=weight[2],
                           window_size=(math.isqrt(rows) + 1) // 2, mlp_ratio=hidden / weight[0])


def params_from_timm(state_dict: Mapping[str, Any], model: Optional[SwinTransformer] = None) -> dict:
    """timm's SwinTransformer state dict ({key: torch tensor or array}) -> this module's params (float32 numpy,
    without the projection, which timm has not). The model's shapes come from `model` or else from the state
    dict. Buffers (relative_position_index, attn_mask) and the ImageNet classifier (head.fc) are dropped; the
    original Swin layout (a stage's downsample at its end) is renumbered as timm's checkpoint filter does. Any
    other missing, unexpected or mis-shaped key is a ValueError naming them."""
    given = {}
    original = "layers.0.downsample.reduction.weight" in state_dict
    for key, value in state_dict.items():
        if any(b in key for b in _BUFFERS) or _CLASSIFIER.match(key):
            continue
        if original:
            key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        given[key] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    model = (model_from_timm(given) if model is None else model).clone(output_dim=None)
    size = model.patch_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
    paths = traverse_util.flatten_dict(nn.meta.unbox(shapes))
    expected = {timm_key(p): (p, _torch_shape(p, tuple(s.shape))) for p, s in paths.items()}
    missing, extra, wrong = convert.mismatches(given, {k: shape for k, (_, shape) in expected.items()})
    if missing or extra or wrong:
        lines = ["the timm Swin state dict does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped keys", wrong)):
            if items:
                lines.append(f"  {title}: {convert.listed(items)}")
        raise ValueError("\n".join(lines))
    flat = {p: _to_flax(p, np.asarray(given[k], np.float32)) for k, (p, _) in expected.items()}
    return traverse_util.unflatten_dict(flat)
