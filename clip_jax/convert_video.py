"""CLIP4Clip's and ActionCLIP's head weights (PyTorch state dicts) -> clip_jax.models.video variables.

Read layouts:

* CLIP4Clip's model state dict (``pytorch_model.bin.N``): ``frame_position_embeddings.*``, ``transformerClip.*``,
  ``lstm_visual.*``, ``cross.*``, ``similarity_dense.*`` are the head's; every ``clip.*`` key is the CLIP tower's
  and is handed back without its prefix (for clip_jax.convert, whose ``logit_scale`` the loose headers use).
* ActionCLIP's ``fusion_model_state_dict`` (saved from nn.DataParallel: a ``module.`` prefix is removed).

Every key is used, handed back, or skipped by name: ``frame_position_embeddings.weight`` of the heads that
build that table and never read it (CLIP4Clip's seqLSTM; ActionCLIP's LSTM, Conv_1D, Transf_cls). Any other
missing, unexpected or mis-shaped key is a ValueError naming them.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from clip_jax import convert
from clip_jax.models import video

CLIP_PREFIX = "clip."
UNUSED = {  # built by the reference, read by none of its forward passes
    "clip4clip:seqLSTM": ("frame_position_embeddings.weight",),
    "actionclip:LSTM": ("frame_position_embeddings.weight",),
    "actionclip:Conv_1D": ("frame_position_embeddings.weight",),
    "actionclip:Transf_cls": ("frame_position_embeddings.weight",),
}
# where the frame width can be read, by key: the dim that holds it
_WIDTH_KEYS = {"frame_position_embeddings.weight": 1, "cross.embeddings.position_embeddings.weight": 1,
               "lstm_visual.weight_ih_l0": 1, "shift.weight": 0, "transformer.cls_token": 2}
_LEAF = {"embedding": "weight", "kernel": "weight", "scale": "weight", "in_proj_kernel": "in_proj_weight",
         "out_proj_kernel": "out_proj.weight", "out_proj_bias": "out_proj.bias"}
log = logging.getLogger(__name__)


def head_name(module) -> str:
    """The 'family:head' name of a head module (video.video_head's names)."""
    if isinstance(module, video.ActionFusion):
        return f"actionclip:{module.sim_head}"
    for name, cls in video.CLIP4CLIP_HEADS.items():
        if type(module) is cls:
            return f"clip4clip:{name}"
    raise ValueError(f"{type(module).__name__} is not a video head of clip_jax.models.video")


def reference_key(path: tuple) -> str:
    """A params path of a head (without the collection) -> the reference's state-dict key."""
    *parents, leaf = path
    return ".".join([re.sub(r"^(resblocks|layers)_(\d+)$", r"\1.\2", p) for p in parents] + [_LEAF.get(leaf, leaf)])


def expected_keys(module, width: int) -> dict[str, tuple[tuple, tuple, Any]]:
    """reference key -> (params path, flax shape, dtype) of the head at frame width `width`."""
    shapes = jax.eval_shape(lambda r: module.init(r, *video.dummy_video_inputs(module, width)), jax.random.key(0))
    flat = traverse_util.flatten_dict(dict(nn.meta.unbox(shapes).get("params", {})))
    return {reference_key(p): (p, tuple(s.shape), s.dtype) for p, s in flat.items()}


def _width(state_dict: Mapping[str, Any], width: Optional[int]) -> Optional[int]:
    if width is not None:
        return width
    for key, dim in _WIDTH_KEYS.items():
        if key in state_dict:
            return int(np.shape(state_dict[key])[dim])
    return None


def video_head_variables(state_dict: Mapping[str, Any], module, width: Optional[int] = None):
    """-> ({'params': ...} for `module`, the CLIP tower's keys without 'clip.' (CLIP4Clip's; else {})).

    `width` (the frame embedding width) is read from the weights where they have a table or an LSTM."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    clip = {k[len(CLIP_PREFIX):]: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith(CLIP_PREFIX)}
    name = head_name(module)
    skipped = [k for k in UNUSED.get(name, ()) if k in sd]
    if skipped:
        log.info("%s: skipping %s (the reference builds it and never reads it)", name, ", ".join(skipped))
        sd = {k: v for k, v in sd.items() if k not in skipped}
    width = _width(sd, width)
    if width is None:
        if sd:
            raise ValueError(f"{name}: cannot read the frame width from keys {convert.listed(sorted(sd))}: "
                             "pass width=")
        width = 1  # a head without parameters (meanP)
    expected = expected_keys(module, width)
    torch_shapes = {k: convert.torch_shape(("params",) + p, s) for k, (p, s, _) in expected.items()}
    missing, extra, wrong = convert.mismatches(sd, torch_shapes)
    if missing or extra or wrong:
        lines = [f"state dict does not match the {name} head (frame width {width}, {module!r}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped keys", wrong)):
            if items:
                lines.append(f"  {title}: {convert.listed(items)}")
        lines.append("  (is it the right head and are its fields, heads, layers, positions, frames, set as the "
                     "reference built it?)")
        raise ValueError("\n".join(lines))
    flat = {p: convert.from_torch_layout(("params",) + p, np.asarray(sd[k]), shape, dtype)
            for k, (p, shape, dtype) in expected.items()}
    return {"params": traverse_util.unflatten_dict(flat)} if flat else {}, clip
