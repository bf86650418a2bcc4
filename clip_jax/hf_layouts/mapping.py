"""Key tables between open_clip's state dict (clip_jax.convert's exchange format) and a transformers
model's, as one rename per open_clip key, so the import, the export and the expected shapes all come
from the same table and only the renaming differs between families.

A rename maps an open_clip key to (its transformers keys, how the tensor changes):
``COPY`` (same tensor), ``TRANSPOSE`` (a torch Linear [out, in] that open_clip stores as a raw [in, out]
matrix), ``QKV`` (open_clip's fused ``in_proj`` [3 * d, ...] <-> separate q, k and v, in that order).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

COPY, TRANSPOSE, QKV = "copy", "transpose", "qkv"
Rename = Callable[[str], tuple[tuple[str, ...], str]]


def hf_shapes(open_clip_shapes: Mapping[str, tuple], rename: Rename) -> dict[str, tuple]:
    """transformers key -> shape, for the open_clip keys and shapes of a model."""
    out = {}
    for key, shape in open_clip_shapes.items():
        names, how = rename(key)
        shape = tuple(shape)
        if how == TRANSPOSE:
            shape = shape[::-1]
        elif how == QKV:
            shape = (shape[0] // 3,) + shape[1:]
        out.update({name: shape for name in names})
    return out


def to_hf(state_dict: Mapping[str, np.ndarray], rename: Rename) -> dict[str, np.ndarray]:
    """An open_clip state dict -> the transformers one (numpy, contiguous)."""
    out = {}
    for key, value in state_dict.items():
        names, how = rename(key)
        value = np.asarray(value)
        parts = np.split(value, 3, axis=0) if how == QKV else [value.T if how == TRANSPOSE else value]
        # np.array(order="C") keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d)
        out.update({name: np.array(part, order="C") for name, part in zip(names, parts)})
    return out


def from_hf(state_dict: Mapping[str, Any], open_clip_shapes: Mapping[str, tuple], rename: Rename, *,
            strict: bool = True, ignored: Optional[re.Pattern] = None, where: str = "the weights") -> dict:
    """A transformers state dict -> the open_clip one holding `open_clip_shapes`' keys.

    Raises ValueError naming, in transformers' keys, every missing, mis-shaped and (where `strict`)
    unexpected tensor; keys matching `ignored` (buffers such as position_ids) are dropped first.
    """
    from clip_jax.convert import listed, mismatches

    given = {k: v for k, v in state_dict.items() if not (ignored and ignored.fullmatch(k))}
    missing, extra, wrong = mismatches(given, hf_shapes(open_clip_shapes, rename), strict)
    if missing or extra or wrong:
        lines = [f"{where} do not match the model (transformers' keys):"]
        for title, items in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped keys", wrong)):
            if items:
                lines.append(f"  {title}: {listed(items)}")
        raise ValueError("\n".join(lines))
    out = {}
    for key in open_clip_shapes:
        names, how = rename(key)
        parts = [np.asarray(given[name]) for name in names]
        out[key] = np.concatenate(parts, axis=0) if how == QKV else parts[0].T if how == TRANSPOSE else parts[0]
    return out


def block_rename(prefix: str, layer: str, rest: str) -> tuple[tuple[str, ...], str]:
    """One pre-LN CLIP block's open_clip key (after 'resblocks.{i}.') -> transformers' CLIPEncoderLayer
    keys under `prefix`.{layer}."""
    base = f"{prefix}.{layer}"
    m = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
    if m:
        return tuple(f"{base}.self_attn.{n}_proj.{m.group(1)}" for n in "qkv"), QKV
    renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    module, leaf = rest.rsplit(".", 1)
    if module not in renames:
        raise ValueError(f"no transformers key for the block's {rest!r}")
    return (f"{base}.{renames[module]}.{leaf}",), COPY


# -- whole models, through clip_jax.convert's open_clip tables ----------------------------------------
def variables_from_hf(model, state_dict: Mapping[str, Any], rename: Rename, only=None,
                      ignored: Optional[re.Pattern] = None) -> dict:
    """clip_jax variables (numpy) of `model` from a transformers state dict: strict (every missing,
    unexpected or mis-shaped key named) or, with `only` (a predicate on variable paths), the
    selected variables only, each missing or mis-shaped one of them named."""
    from clip_jax import convert
    from clip_jax.models import variable_shapes

    shapes = convert.expected_state_dict_shapes(model)
    if only is not None:
        chosen = {key for key, (path, _, _) in convert.expected_variables(variable_shapes(model)).items() if only(path)}
        shapes = {k: v for k, v in shapes.items() if k in chosen}
    open_clip = from_hf(state_dict, shapes, rename, strict=only is None, ignored=ignored)
    return convert.state_dict_to_variables(model, open_clip, only)


def variables_to_hf(model, variables, rename: Rename) -> dict[str, np.ndarray]:
    """`model`'s variables as a transformers state dict; an error naming what does not match the model."""
    from clip_jax import convert

    state_dict = convert.variables_to_state_dict(variables)
    expected = convert.expected_state_dict_shapes(model)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != expected:
        bad = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ValueError(f"the variables do not match the model {model.config.text.kind}/{model.config.vision.kind}: "
                         f"first differing keys {bad[:8]}")
    return to_hf(state_dict, rename)
