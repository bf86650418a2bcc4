"""Model directories in Hugging Face's layouts: transformers' (config.json + model.safetensors, one
module per model family here) and open_clip's hub layout (open_clip_config.json +
open_clip_model.safetensors), read into clip_jax models and written from them.

A family module (clip.py, chinese_clip.py, ...) has exactly:
  MODEL_TYPES: the config.json model_type strings it reads;
  config_from_hf(hf: dict) -> CLIPConfig: ValueError naming a field and value clip_jax cannot represent;
  config_to_hf(config) -> dict: config.json; ValueError naming what transformers cannot hold, and the fix;
  variables_from_hf(model, state_dict, only=None) -> variables: strict, every missing, unexpected or
      mis-shaped key named (`only`: a predicate on variable paths, as clip_jax.convert's);
  variables_to_hf(model, variables) -> state_dict (numpy, transformers' keys and layouts);
  write_tokenizer(config, out_dir): the tokenizer and image processor files beside the weights, for
      transformers' AutoProcessor / AutoTokenizer (ValueError where the model's tokenizer has none).
save() picks the first family, in FAMILIES' order, whose config_to_hf takes the model's config.
"""

from __future__ import annotations

import json
import os
from types import ModuleType

import numpy as np

from clip_jax.hf_layouts import chinese_clip, clip, groupvit, siglip, siglip2

FAMILIES: dict[str, ModuleType] = {t: family for family in (clip, chinese_clip, siglip, siglip2, groupvit)
                                   for t in family.MODEL_TYPES}

CONFIG = "config.json"
# transformers' weight files, in the order they are looked for: one file, shards with an index, torch's.
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def is_model_dir(path) -> bool:
    """A folder with a transformers config.json (one naming a model_type) or open_clip's hub layout."""
    path = str(path)
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, OPEN_CLIP_CONFIG)):
        return True
    try:
        with open(os.path.join(path, CONFIG)) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def read_config(path: str) -> dict:
    with open(os.path.join(path, CONFIG)) as f:
        return json.load(f)


def family_of(hf: dict, where: str = CONFIG) -> ModuleType:
    """The family module of a config.json (as a dict); an error listing the supported model types."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not a layout clip_jax reads; it reads "
                         f"{', '.join(sorted(FAMILIES))} (and open_clip's {OPEN_CLIP_CONFIG} directories)")
    return FAMILIES[model_type]


def _is_open_clip(path: str) -> bool:
    return os.path.exists(os.path.join(path, OPEN_CLIP_CONFIG)) and not os.path.exists(os.path.join(path, CONFIG))


def config_of(path: str):
    """The CLIPConfig of a model directory."""
    from clip_jax.models import get_model_config

    if _is_open_clip(path):
        with open(os.path.join(path, OPEN_CLIP_CONFIG)) as f:
            return get_model_config(json.load(f)["model_cfg"])
    hf = read_config(path)
    return family_of(hf, os.path.join(path, CONFIG)).config_from_hf(hf)


def weight_files(path: str) -> list[str]:
    """The weight files of a model directory (several where sharded); FileNotFoundError naming the
    files looked for where there are none."""
    if _is_open_clip(path):
        candidates = [os.path.join(path, name) for name in OPEN_CLIP_WEIGHTS]
        found = next((p for p in candidates if os.path.exists(p)), None)
        if found is None:
            raise FileNotFoundError(f"{path} has {OPEN_CLIP_CONFIG} but none of {', '.join(OPEN_CLIP_WEIGHTS)}")
        return [found]
    if os.path.exists(os.path.join(path, WEIGHTS)):
        return [os.path.join(path, WEIGHTS)]
    if os.path.exists(os.path.join(path, SHARD_INDEX)):
        with open(os.path.join(path, SHARD_INDEX)) as f:
            shards = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        absent = [os.path.basename(s) for s in shards if not os.path.exists(s)]
        if absent:
            raise FileNotFoundError(f"{path}: the shards {', '.join(absent)} named in {SHARD_INDEX} are missing")
        return shards
    if os.path.exists(os.path.join(path, TORCH_WEIGHTS)):
        return [os.path.join(path, TORCH_WEIGHTS)]
    raise FileNotFoundError(f"{path} has no weights: none of {WEIGHTS}, {SHARD_INDEX} (with its shards), "
                            f"{TORCH_WEIGHTS}")


# safetensors' dtype names -> numpy's (bfloat16 from ml_dtypes, which jax installs)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file as numpy arrays, bfloat16 ones (which safetensors' numpy
    reader refuses; hub checkpoints are often bfloat16) upcast to float32."""
    from clip_jax import convert

    try:
        return convert.read_state_dict(path)
    except TypeError:  # a dtype numpy does not know: read the format's header and buffers directly
        import ml_dtypes

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        dtype = ml_dtypes.bfloat16 if entry["dtype"] == "BF16" else np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        value = np.frombuffer(data[start:end], dtype=dtype).reshape(entry["shape"])
        out[name] = value.astype(np.float32) if entry["dtype"] == "BF16" else np.array(value)
    return out


def read(path: str):
    """(CLIPConfig, state dict of numpy arrays in the directory's own keys) of a model directory."""
    from clip_jax import convert

    config = config_of(path)
    state_dict: dict[str, np.ndarray] = {}
    for file in weight_files(path):
        state_dict.update(read_safetensors(file) if file.endswith(".safetensors") else convert.read_state_dict(file))
    return config, state_dict


def load_dir(path: str, dtype: str = "float32", scan: bool = False, remat: str = "none", only=None,
             architecture=None):
    """(model, variables) of a model directory: its own architecture, or `architecture` (a preset
    name, open_clip dict or CLIPConfig) with the directory's weights read into it."""
    import jax
    import jax.numpy as jnp

    from clip_jax import convert
    from clip_jax.models import create_model

    config, state_dict = read(path)
    model = create_model(config if architecture is None else architecture, dtype=dtype, scan=scan, remat=remat)
    if _is_open_clip(path):
        variables = convert.state_dict_to_variables(model, state_dict, only)
    else:
        family = family_of(read_config(path))
        try:
            variables = family.variables_from_hf(model, state_dict, only)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


def family_for(config) -> tuple[ModuleType, dict]:
    """(family module, config.json) of the first family that can hold `config`; an error giving
    each family's reason where none can."""
    reasons = []
    for model_type, family in FAMILIES.items():
        try:
            return family, family.config_to_hf(config)
        except ValueError as e:
            reasons.append(f"  {model_type}: {e}")
    raise ValueError("no transformers layout holds this model:\n" + "\n".join(reasons))


def save(model, variables, out_dir: str, tokenizer: bool = True) -> str:
    """Write `model`'s `variables` to `out_dir` in transformers' layout (config.json, model.safetensors)
    with the tokenizer and image processor files (`tokenizer`), for AutoModel / AutoProcessor."""
    from clip_jax import convert

    family, hf_config = family_for(model.config)
    state_dict = family.variables_to_hf(model, variables)
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer:
        family.write_tokenizer(model.config, out_dir)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump({**hf_config, "dtype": "float32"}, f, indent=2)
        f.write("\n")
    # transformers reads only safetensors files whose metadata names their framework
    convert.write_safetensors(state_dict, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    return out_dir


__all__ = ["FAMILIES", "config_of", "family_for", "family_of", "is_model_dir", "load_dir", "read", "save"]
