"""The public inference/interop API: load, save_open_clip, save_hf, encode_image, encode_text.

``params`` here is the Flax variables dict: {'params': ...} plus 'batch_stats' for the
ResNet towers. Inputs are validated on the host before anything is traced or compiled.
"""

from __future__ import annotations

import json
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import convert, hf_layouts, hub
from clip_jax.models import CLIP, CLIPConfig, create_model, get_model_config
from clip_jax.models.config import to_chinese_clip
from clip_jax.models.vit import check_images


def load(
    name: Union[str, dict, CLIPConfig],
    path: Optional[str] = None,
    dtype: str = "float32",
    scan: bool = False,
    remat: str = "none",
    only=None,
):
    """(model, params) from an OpenAI/open_clip checkpoint, a clip_jax export or a model directory.

    name: a preset of ``clip_jax.list_models()`` (use the '-quickgelu' names for OpenAI's
    weights), an open_clip-style config dict, or the path of such a JSON; or, alone, a model
    directory in transformers' layout (config.json + model.safetensors: CLIPModel,
    ChineseCLIPModel, ...) or open_clip's hub layout, or a hub name "hf-hub:ORG/NAME[@REVISION]"
    (clip_jax.hub: huggingface_hub's cache), whose config gives the architecture.
    path: ``.safetensors`` (no torch needed), ``.pt``/``.bin``/``.pth`` (needs torch),
    a clip_jax ``.msgpack`` Flax parameter file written by ``clip_jax.export``, big_vision's
    SigLIP ``.npz`` (with a SigLIP model: 'ViT-B-16-SigLIP', ...), or a model directory / hub
    name as above, whose weights are read into `name`'s architecture.
    only: a predicate on variable paths (('params', 'visual', ...)): read only those (partial
    initialization); a missing or mis-shaped one of them is an error naming it.
    """
    if path is None:
        if not (hub.is_hub_name(name) or hf_layouts.is_model_dir(name)):
            raise ValueError(f"load({name!r}) without a weights path needs a model directory (config.json + "
                             "model.safetensors) or an hf-hub:ORG/NAME name; for a preset or config give the "
                             "weights: load(name, path)")
        directory = hub.resolve(name) if hub.is_hub_name(name) else name
        return hf_layouts.load_dir(directory, dtype=dtype, scan=scan, remat=remat, only=only)
    if hub.is_hub_name(name) or hf_layouts.is_model_dir(name):  # the architecture of a directory's config
        name = hf_layouts.config_of(hub.resolve(name) if hub.is_hub_name(name) else name)
    if hub.is_hub_name(path) or hf_layouts.is_model_dir(path):
        create_model(name, dtype=dtype, scan=scan, remat=remat)  # unknown name fails here, before a download
        directory = hub.resolve(path) if hub.is_hub_name(path) else path
        return hf_layouts.load_dir(directory, dtype=dtype, scan=scan, remat=remat, only=only, architecture=name)
    model = create_model(name, dtype=dtype, scan=scan, remat=remat)  # unknown name fails here, first
    if path.endswith(".msgpack"):
        return model, read_flax_params(model, path, only)
    if path.endswith(".npz"):  # big_vision's SigLIP checkpoint (its two-tower model) for a SigLIP model
        from clip_jax import convert_big_vision

        variables = convert_big_vision.variables_from_big_vision(model, convert_big_vision.read_npz(path), only)
        return model, jax.tree_util.tree_map(jnp.asarray, variables)
    state_dict = convert.read_state_dict(path)
    variables = convert.state_dict_to_variables(model, state_dict, only)
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


def save_open_clip(name: Union[str, dict, CLIPConfig], params, path: str, config_path: Optional[str] = None):
    """Write ``params`` as an open_clip state dict in ``.safetensors``.

    ``open_clip.create_model(name, pretrained=path)`` loads it with strict key matching.
    For configs that are no open_clip preset, also write their JSON (``config_path``,
    default: path with '.json') for ``open_clip.add_model_config``.

    A model with a BERT text tower (the cn-* presets) is written in Chinese-CLIP's layout, and its
    JSON (always written) holds the keyword arguments of Chinese-CLIP's ``CLIP``: the reference
    builds ``CLIP(**json)`` and loads the file with strict keys.
    """
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_open_clip writes .safetensors; got path {path!r}")
    config = get_model_config(name)
    if "siglip" in (config.vision.kind, config.text.kind):  # open_clip builds these from timm and HF parts
        raise ValueError("open_clip's JSON and CLIP layout cannot hold SigLIP's towers (tower kind 'siglip'): write "
                         "transformers' layout instead, clip_jax.save_hf(model, params, DIR) (python -m "
                         "clip_jax.export --format=hf)")
    state_dict = convert.variables_to_state_dict(params)
    model = CLIP(config)
    expected = convert.expected_state_dict_shapes(model)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != expected:
        bad = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ValueError(f"params do not match model {name!r}: first differing keys {bad[:8]}")
    convert.write_safetensors(state_dict, path, metadata={"clip_jax_config": json.dumps(config.to_dict())})
    chinese = config.text.kind == "bert"
    if config_path or chinese or not isinstance(name, str) or name.endswith(".json"):
        config_path = config_path or path[: -len(".safetensors")] + ".json"
        with open(config_path, "w") as f:
            json.dump(to_chinese_clip(config) if chinese else config.to_dict(), f, indent=2)
    return path


def save_hf(model: Union[CLIP, str, dict, CLIPConfig], params, directory: str, tokenizer: bool = True) -> str:
    """Write ``params`` to `directory` in transformers' layout: config.json and model.safetensors that
    ``transformers.AutoModel.from_pretrained(directory)`` loads with strict keys (CLIPModel, or
    ChineseCLIPModel for a BERT text tower), and with `tokenizer` the tokenizer and image processor
    files of ``AutoProcessor.from_pretrained(directory)``. `model`: as ``clip_jax.load`` or
    ``create_model`` returns it, or a preset name / config. ``clip_jax.load(directory)`` reads it back."""
    if not isinstance(model, CLIP):
        model = create_model(model)
    return hf_layouts.save(model, params, directory, tokenizer=tokenizer)


# -- open_clip's local-dir: folder -------------------------------------------------------------
OPEN_CLIP_CONFIG = "open_clip_config.json"  # the file names open_clip's local-dir: loader reads
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def open_clip_preprocess_cfg(config: CLIPConfig) -> dict:
    """open_clip's preprocess_cfg of clip_jax.preprocess's transform for `config`: OpenAI's mean and std,
    a bicubic resize of the shorter side to the tower's size, then a center crop."""
    from clip_jax.preprocessing import MEAN, STD

    return {"size": config.vision.image_size, "mode": "RGB", "mean": list(MEAN), "std": list(STD),
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def save_open_clip_dir(model: Union[CLIP, str, dict, CLIPConfig], params, directory: str) -> str:
    """Write ``params`` to `directory` as open_clip's local-dir: folder: open_clip_config.json (``model_cfg``,
    ``preprocess_cfg``) and open_clip_model.safetensors, which
    ``open_clip.create_model_and_transforms("local-dir:" + directory)`` loads with strict keys, with this
    model's preprocessing; ``open_clip.get_tokenizer`` of the same name gives CLIP's BPE. Any preset or
    config with overrides; not the BERT (cn-*) towers or another tokenizer than CLIP's, which open_clip
    does not build."""
    import os

    config = model.config if isinstance(model, CLIP) else get_model_config(model)
    if config.text.kind == "bert":
        raise ValueError("open_clip has no Chinese-CLIP (BERT) text tower: export a cn-* model with save_open_clip "
                         "(cn-clip's layout) or save_hf (transformers' ChineseCLIPModel)")
    if config.text.tokenizer != "clip_bpe":
        raise ValueError(f"open_clip's local-dir: tokenizer is CLIP's BPE, this model's is {config.text.tokenizer!r}: "
                         "export it with save_hf, or train with text_cfg tokenizer 'clip_bpe'")
    os.makedirs(directory, exist_ok=True)
    config_path = os.path.join(directory, OPEN_CLIP_CONFIG)
    # save_open_clip checks the keys and shapes and writes the model JSON, which the folder's config then replaces
    save_open_clip(config, params, os.path.join(directory, OPEN_CLIP_WEIGHTS), config_path=config_path)
    with open(config_path, "w") as f:
        json.dump({"model_cfg": config.to_dict(), "preprocess_cfg": open_clip_preprocess_cfg(config)}, f, indent=2)
    return directory


def write_flax_params(params, path: str):
    from flax import serialization

    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, jax.device_get(params))))


def read_flax_params(model: CLIP, path: str, only=None):
    from flax import serialization, traverse_util

    from clip_jax import convert
    from clip_jax.models import variable_shapes

    with open(path, "rb") as f:
        raw = serialization.msgpack_restore(f.read())
    shapes = variable_shapes(model)
    # the file's layers in the model's layout (an export is per layer; a scanned run stacks them)
    flat = convert.unstack_layers(traverse_util.flatten_dict(raw))
    raw = traverse_util.unflatten_dict(convert.stack_layers(flat) if model.scan else flat)
    if only is not None:  # the selected variables only, each checked by path
        got, out = traverse_util.flatten_dict(raw), {}
        for key, want in traverse_util.flatten_dict(shapes).items():
            if not only(key):
                continue
            name = "/".join(str(p) for p in key[1:])
            if key not in got:
                raise ValueError(f"the weights have no {key[0]} {name!r}")
            if tuple(np.shape(got[key])) != tuple(want.shape):
                raise ValueError(f"{key[0]} {name!r} has shape {tuple(np.shape(got[key]))} in the weights, "
                                 f"the model's is {tuple(want.shape)}")
            out[key] = jnp.asarray(got[key])
        return traverse_util.unflatten_dict(out)
    got = jax.tree_util.tree_map(np.shape, raw)
    want = jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)
    if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(want) or got != want:
        raise ValueError(f"{path!r} does not hold parameters of this model (different tree or shapes)")
    return jax.tree_util.tree_map(jnp.asarray, raw)


# -- encoding ---------------------------------------------------------------------------
_JIT_CACHE: dict = {}


def _jitted(model: CLIP, method: str, **options):
    key = (model.config, model.dtype, model.remat, model.scan, model.attn_impl, method, tuple(sorted(options.items())))
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(lambda variables, x: model.apply(variables, x, method=method, **options))
    return _JIT_CACHE[key]


def _batched(fn, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply fn in fixed-size chunks (last one padded) so any N compiles once."""
    n = x.shape[0]
    outs = []
    for start in range(0, n, batch_size):
        chunk = x[start : start + batch_size]
        pad = min(batch_size, n) - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(np.asarray(fn(params, chunk))[: chunk.shape[0] - pad])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def encode_image(model: CLIP, params, images, batch_size: int = 256) -> np.ndarray:
    """images: NHWC float32 [N, S, S, 3], already normalized -> L2-normalized float32 [N, embed_dim]."""
    images = np.asarray(images)
    check_images(images, model.config.vision.image_size)
    return _batched(_jitted(model, "encode_image"), params, images.astype(np.float32), batch_size)


def encode_text(model: CLIP, params, tokens, batch_size: int = 256) -> np.ndarray:
    """tokens: int [N, context_length] from clip_jax.tokenize -> L2-normalized float32 [N, embed_dim]."""
    tokens = np.asarray(tokens)
    ctx, vocab = model.config.text.context_length, model.config.text.vocab_size
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be int [N, {ctx}] (clip_jax.tokenize); got {tokens.dtype} {tokens.shape}")
    if tokens.shape[1] > ctx:
        raise ValueError(f"tokens are {tokens.shape[1]} long, the model's context_length is {ctx}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}); got [{tokens.min()}, {tokens.max()}]")
    return _batched(_jitted(model, "encode_text"), params, tokens.astype(np.int32), batch_size)


def encode_image_dense(model: CLIP, params, images, form: str = "patch", batch_size: int = 256) -> np.ndarray:
    """images: NHWC float32 [N, S, S, 3], already normalized -> float32 [N, h, w, embed_dim] per-patch features
    in the joint space, NOT normalized (normalize each position before a cosine). form: 'patch' (each patch token
    through the tower's head) or 'maskclip' (MaskCLIP's value path); see CLIP.encode_image_dense."""
    from clip_jax.models.dense import check_form

    images = np.asarray(images)
    check_images(images, model.config.vision.image_size)
    check_form(form)
    return _batched(_jitted(model, "encode_image_dense", form=form), params, images.astype(np.float32), batch_size)
