"""transformers' ``Siglip2Model`` layout (model_type 'siglip2') at a fixed square resolution <-> clip_jax's
SigLIP towers: SigLIP's tensors (clip_jax.hf_layouts.siglip) but for the patch embedding, a Linear over
each flattened patch (rows, columns, channels) instead of a conv, and the position table sized by
``num_patches`` (a square grid) instead of ``image_size``.

NaFlex (images of other sizes and aspect ratios, the position table resized per image) is not
represented: a clip_jax tower takes square images of one size, sqrt(num_patches) * patch_size pixels,
where transformers' resize of the position table is the identity.
"""

from __future__ import annotations

import math

from clip_jax import rename_rules as rr
from clip_jax.hf_layouts import siglip
from clip_jax.models.config import CLIPConfig

MODEL_TYPES = ("siglip2",)
IGNORED = siglip.IGNORED


def config_from_hf(hf: dict) -> CLIPConfig:
    """The CLIPConfig of a Siglip2Model's config.json (a dict); ValueError naming what clip_jax cannot hold."""
    vision = dict(hf.get("vision_config") or {})
    patches = vision.pop("num_patches", 256)
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"config.json vision_config.num_patches={patches}: clip_jax's towers take square images, "
                         "whose patches make a square grid")
    vision["image_size"] = grid * vision.get("patch_size", siglip.VISION_DEFAULTS["patch_size"])
    return siglip.config_from_hf({**hf, "vision_config": vision})


def config_to_hf(config: CLIPConfig) -> dict:
    """config.json of a Siglip2Model of config's fixed resolution."""
    out = siglip.config_to_hf(config)
    vision = out["vision_config"]
    grid = vision.pop("image_size") // config.vision.patch_size
    vision["num_patches"] = grid * grid
    return {**out, "architectures": ["Siglip2Model"], "model_type": "siglip2", "vision_config": vision}


def linear_patches(path: tuple, key: str) -> rr.Rule:
    """The patch embedding's kernel [p, p, C, D] <-> Siglip2's Linear weight [D, p * p * C] (transformers
    flattens each patch by rows, columns, then channels: the kernel's own order)."""
    return rr.Rule((path,), (key,), lambda k: (k.reshape(-1, k.shape[-1]).T,),
                   lambda w: (w.T.reshape(_patch(w), _patch(w), -1, w.shape[0]),))


def _patch(weight) -> int:
    return math.isqrt(weight.shape[1] // 3)


def rules(config: CLIPConfig) -> list[rr.Rule]:
    return siglip.rules(config, patches=linear_patches)


def variables_from_hf(model, state_dict, only=None) -> dict:
    """clip_jax variables (numpy) of `model` from a Siglip2Model state dict (strict, or `only` those)."""
    return rr.from_external(model, state_dict, rules(model.config), "the Siglip2Model weights", only, IGNORED)


def variables_to_hf(model, variables) -> dict:
    return rr.to_external(model, variables, rules(model.config))


def write_tokenizer(config: CLIPConfig, out_dir: str):
    """The model's own SentencePiece as transformers' SiglipTokenizer (clip_jax.hf_layouts.siglip), with
    Siglip2ImageProcessor's preprocessor_config.json for the fixed resolution (a resize to
    sqrt(num_patches) * patch_size pixels square, mean and std 0.5) under a Siglip2Processor. Google's
    SigLIP 2 releases use Gemma's tokenizer instead: those models keep the tokenizer files they came with."""
    grid = config.vision.image_size // config.vision.patch_size
    siglip.write_tokenizer(config, out_dir, processor="Siglip2Processor", image_processor={
        "image_processor_type": "Siglip2ImageProcessor", "patch_size": config.vision.patch_size,
        "max_num_patches": grid * grid})
