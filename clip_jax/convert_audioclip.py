"""AudioCLIP's released checkpoints (AndreyGuzhov/AudioCLIP, release v0.1) <-> clip_jax.

Two layouts of PyTorch state dicts are read:

* ``AudioCLIP-Full-Training.pt`` / ``AudioCLIP-Partial-Training.pt``: the whole model. ``audio.*`` is the
  ESResNeXt-fbsp tower (clip_jax.models.esresnext), ``logit_scale_ai`` / ``logit_scale_at`` its two logit
  scales, and every other key OpenAI's CLIP RN50, read by clip_jax.convert as any OpenAI checkpoint.
* ``ESRNXFBSP.pt``: the audio tower alone, without the ``audio.`` prefix, its ``fc`` an AudioSet classifier
  (527 outputs) that does not fit a 1024-d embedding: by default every other tensor is read, the fc keeps
  a fresh init and is reported as skipped; ``fc='raise'`` makes that an error.

Every key is used. Skipped by rule, and only these: ``fbsp.bias`` (LinearFBSP's empty [0] bias) and each
BatchNorm's ``num_batches_tracked``; the ``window`` buffer is checked against the tower's own window.
Any other missing, unexpected or mis-shaped key is a ValueError naming them. The export writes the
reference's keys back (``fbsp.bias``, ``window`` and ``num_batches_tracked`` = 0 included), so that
the reference module loads it with strict=True.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np
from flax import traverse_util

from clip_jax import convert
from clip_jax.models import create_model
from clip_jax.models.esresnext import ESResNeXtFBSP, blackman_harris, dummy_audio, esresnext

AUDIO_PREFIX = "audio."
SCALES = ("logit_scale_ai", "logit_scale_at")
CLIP_MODEL = "RN50-quickgelu"  # AudioCLIP's image and text towers: OpenAI's RN50, fp32
_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
log = logging.getLogger(__name__)


def reference_key(path: tuple) -> str:
    """A variable path of the tower (collection first) -> the reference's key (without 'audio.')."""
    *parents, leaf = path[1:]
    return ".".join([re.sub(r"_(\d+)$", r".\1", p) for p in parents] + [_LEAF.get(leaf, leaf)])


def to_torch_layout(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim == 4:  # conv HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value  # fc [in, out] -> [out, in]


def from_torch_layout(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def expected_keys(model: ESResNeXtFBSP) -> dict[str, tuple[tuple, tuple]]:
    """The reference key -> (variable path, PyTorch shape) of every variable of the tower (no buffers)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), dummy_audio(model))
    flat = traverse_util.flatten_dict(dict(shapes))
    return {reference_key(p): (p, to_torch_layout(np.empty(s.shape, np.bool_)).shape) for p, s in flat.items()}


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    return np.asarray(value)


def _by_rule(key: str, expected: Mapping[str, Any]) -> bool:
    """The keys skipped by rule: LinearFBSP's empty bias and BatchNorm's counters."""
    if key == "fbsp.bias":
        return True
    return key.endswith(".num_batches_tracked") and key[: -len("num_batches_tracked")] + "running_mean" in expected


def audio_variables(state_dict: Mapping[str, Any], model: Optional[ESResNeXtFBSP] = None, fc: str = "reinit",
                    seed: int = 0) -> tuple[dict, list[str]]:
    """The tower's state dict, keys without 'audio.' (torch tensors or arrays) -> (its flax variables
    {'params', 'batch_stats'} as float32 numpy, the keys skipped beyond the rule, with why).

    fc: what to do when the classifier's shape does not fit the model (ESRNXFBSP.pt's 527 AudioSet classes
    against a 1024-d embedding): 'reinit' keeps a fresh init of `fc` (PyTorch Linear's, from `seed`) and
    reports it, 'raise' is a ValueError. Any other missing, unexpected or mis-shaped key is a ValueError."""
    if fc not in ("reinit", "raise"):
        raise ValueError(f"fc={fc!r}: use 'reinit' (keep a fresh fc, reported) or 'raise'")
    model = esresnext() if model is None else model
    expected = expected_keys(model)
    given = {k: _numpy(v) for k, v in state_dict.items()}
    if "fbsp.bias" in given and given["fbsp.bias"].size:
        raise ValueError(f"fbsp.bias has shape {given['fbsp.bias'].shape}: AudioCLIP's LinearFBSP has no bias "
                         "(an empty [0] tensor); this tower cannot add one")
    if "window" in given:
        window = blackman_harris(model.win_length)
        if given["window"].shape != window.shape or not np.allclose(given["window"], window, atol=1e-6):
            raise ValueError(f"the checkpoint's window (shape {given['window'].shape}) is not the periodic "
                             f"Blackman-Harris window of win_length={model.win_length} this tower computes")
        del given["window"]
    given = {k: v for k, v in given.items() if not _by_rule(k, expected)}
    skipped = []
    fc_keys = [k for k in ("fc.weight", "fc.bias") if k in expected and k in given
               and tuple(given[k].shape) != tuple(expected[k][1])]
    if fc_keys:
        shapes = ", ".join(f"{k} {tuple(given[k].shape)} (the model's {tuple(expected[k][1])})" for k in fc_keys)
        if fc == "raise":
            raise ValueError(f"the classifier does not fit the model's embed_dim={model.embed_dim}: {shapes}; "
                             "pass fc='reinit' to read everything else and keep a fresh fc")
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(expected["fc.weight"][1][1])
        for k in ("fc.weight", "fc.bias"):
            given[k] = rng.uniform(-bound, bound, expected[k][1]).astype(np.float32)
        skipped.append(f"{shapes}: not read, a fresh fc (PyTorch Linear's init, seed {seed})")
        log.warning("AudioCLIP import skipped %s", skipped[-1])
    missing, extra, wrong = convert.mismatches(given, {k: s for k, (_, s) in expected.items()})
    if missing or extra or wrong:
        lines = ["the audio tower's state dict does not match ESResNeXtFBSP"
                 f" (n_fft={model.n_fft}, layers={tuple(model.layers)}, embed_dim={model.embed_dim}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped keys", wrong)):
            if items:
                lines.append(f"  {title}: {convert.listed(items)}")
        raise ValueError("\n".join(lines))
    flat = {p: from_torch_layout(given[k]).astype(np.float32) for k, (p, _) in expected.items()}
    return traverse_util.unflatten_dict(flat), skipped


def audio_state_dict(model: ESResNeXtFBSP, variables, prefix: str = AUDIO_PREFIX) -> dict[str, np.ndarray]:
    """The tower's variables -> the reference's state dict (PyTorch layouts, `prefix` on every key), with
    LinearFBSP's empty bias, the window buffer and num_batches_tracked = 0: it loads with strict=True."""
    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(variables)))
    out = {reference_key(p): np.array(to_torch_layout(v), np.float32, order="C") for p, v in flat.items()}
    for key in [k for k in out if k.endswith(".running_mean")]:
        out[key[: -len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
    if "fbsp.m" in out:
        out["fbsp.bias"] = np.zeros((0,), np.float32)
    out["window"] = blackman_harris(model.win_length)
    return {prefix + k: v for k, v in out.items()}


def layout_of(state_dict: Mapping[str, Any]) -> str:
    """'audioclip' (the whole model: Full or Partial training) or 'esrnxfbsp' (the audio tower alone)."""
    if any(k.startswith(AUDIO_PREFIX) for k in state_dict):
        return "audioclip"
    if "fbsp.m" in state_dict or ("layer1.0.conv1.weight" in state_dict and "att1.bn.weight" in state_dict):
        return "esrnxfbsp"
    if any(k.startswith("visual.") for k in state_dict):
        raise ValueError("the state dict holds no audio tower (no 'audio.*' keys): is it CLIP.pt? Load it as an "
                         f"OpenAI checkpoint (clip_jax.load({CLIP_MODEL!r}, path))")
    raise ValueError(f"not an AudioCLIP checkpoint: no 'audio.*' keys and no ESResNeXt-fbsp keys (fbsp.m); its "
                     f"first keys are {convert.listed(sorted(state_dict), 6)}")


def load_audioclip(checkpoint: Union[str, Mapping[str, Any]], audio_model: Optional[ESResNeXtFBSP] = None,
                   clip_model: Union[str, Any] = CLIP_MODEL, fc: str = "reinit", seed: int = 0) -> dict:
    """One of AudioCLIP's checkpoints (a path, read with torch.load(weights_only=True), or a state dict of
    tensors or arrays) -> {'layout', 'audio_model', 'audio' (its variables), 'logit_scale_ai',
    'logit_scale_at' (float32, None for ESRNXFBSP.pt), 'clip_model', 'clip' (CLIP's variables, None for
    ESRNXFBSP.pt), 'skipped' (keys not read beyond the rule, with why)}. audio_model defaults to the
    reference's tower (models.esresnext preset 'esresnext-fbsp'); clip_model is a clip_jax preset name or a
    CLIP module. fc, seed: audio_variables'."""
    state_dict = convert.read_state_dict(checkpoint) if isinstance(checkpoint, str) else checkpoint
    state_dict = convert.clean_state_dict(state_dict)  # a trainer's {'state_dict': ...} and 'module.' prefixes
    audio_model = esresnext() if audio_model is None else audio_model
    layout = layout_of(state_dict)
    out = {"layout": layout, "audio_model": audio_model, "logit_scale_ai": None, "logit_scale_at": None,
           "clip_model": None, "clip": None}
    if layout == "esrnxfbsp":
        out["audio"], out["skipped"] = audio_variables(state_dict, audio_model, fc, seed)
        return out
    audio = {k[len(AUDIO_PREFIX):]: v for k, v in state_dict.items() if k.startswith(AUDIO_PREFIX)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(AUDIO_PREFIX) and k not in SCALES}
    clip_model = create_model(clip_model) if isinstance(clip_model, str) else clip_model
    # Every key of the file in one error: the scales and CLIP's here, the tower's in audio_variables.
    missing, extra, wrong = convert.mismatches(
        {**rest, **{k: state_dict[k] for k in SCALES if k in state_dict}},
        {**convert.expected_state_dict_shapes(clip_model), **{k: () for k in SCALES}})
    if missing or extra or wrong:
        name = getattr(clip_model.config, "name", "") or "the CLIP model"
        lines = [f"the AudioCLIP state dict's CLIP part does not match {name} (or its logit scales):"]
        for title, items in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped keys", wrong)):
            if items:
                lines.append(f"  {title}: {convert.listed(items)}")
        raise ValueError("\n".join(lines))
    out["audio"], out["skipped"] = audio_variables(audio, audio_model, fc, seed)
    out["clip_model"] = clip_model
    out["clip"] = convert.state_dict_to_variables(clip_model, {k: _numpy(v) for k, v in rest.items()})
    for k in SCALES:
        out[k] = np.float32(_numpy(state_dict[k]))
    return out


def audioclip_state_dict(audio_model: ESResNeXtFBSP, audio, clip=None, logit_scale_ai: float = float(np.log(100)),
                         logit_scale_at: float = float(np.log(100))) -> dict[str, np.ndarray]:
    """The reference AudioCLIP's state dict: the tower's variables under 'audio.', CLIP's variables (if given)
    in OpenAI's keys, and the two logit scales (log-space, log(100) at the reference's init)."""
    out = audio_state_dict(audio_model, audio)
    if clip is not None:
        out.update(convert.variables_to_state_dict(clip))
    out.update({"logit_scale_ai": np.array(logit_scale_ai, np.float32),
                "logit_scale_at": np.array(logit_scale_at, np.float32)})
    return out
