"""transformers' ``CLIPModel`` layout (model_type 'clip'): a pre-LN causal text tower pooled at the end
of text, a ViT with a class token, both projected by bias-free Linears; the same tensors as open_clip's
CLIP under other names (clip_jax.hf_layouts.mapping), with q/k/v split and the projections transposed.

The family's interface (every module of clip_jax.hf_layouts has it): MODEL_TYPES, config_from_hf,
config_to_hf, variables_from_hf, variables_to_hf, write_tokenizer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from clip_jax.hf_layouts import mapping
from clip_jax.models.config import CLIPConfig, TextConfig, VisionConfig

MODEL_TYPES = ("clip",)

# transformers' defaults (CLIPTextConfig / CLIPVisionConfig), for config.json files that leave a field out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> CLIPConfig.quick_gelu (gelu: the exact erf form)
CLIP_LN_EPS = 1e-5  # clip_jax.models.layers.LayerNorm's, in both CLIP towers
# Buffers that older checkpoints saved beside the weights (arange tables, not learned).
IGNORED = re.compile(r".*\.position_ids")


class Fields:
    """A sub-config of config.json with transformers' defaults; `where` names it in errors."""

    def __init__(self, hf: dict, key: str, defaults: dict):
        self.where = key
        self.values = dict(defaults)
        self.values.update(hf.get(key) or hf.get(key + "_dict") or {})  # older files: text_config_dict

    def __getitem__(self, field: str):
        return self.values[field]

    def refuse(self, field: str, why: str):
        raise ValueError(f"config.json {self.where}.{field}={self.values.get(field)!r}: {why}")

    def ratio(self, width_field: str = "hidden_size") -> float:
        """intermediate_size / width, checked to give intermediate_size back (the MLP's width)."""
        width, hidden = self[width_field], self["intermediate_size"]
        ratio = hidden / width
        if int(width * ratio) != hidden:
            self.refuse("intermediate_size", f"not representable as mlp_ratio * {width_field} ({width})")
        return ratio

    def heads(self) -> int:
        if self["hidden_size"] % self["num_attention_heads"]:
            self.refuse("num_attention_heads", f"does not divide hidden_size {self['hidden_size']}")
        return self["num_attention_heads"]


def vision_from_hf(hf: dict) -> tuple[VisionConfig, bool]:
    """(VisionConfig, quick_gelu) of a CLIP-style ViT vision_config (CLIP's and Chinese-CLIP's)."""
    v = Fields(hf, "vision_config", VISION_DEFAULTS)
    if v["num_channels"] != 3:
        v.refuse("num_channels", "clip_jax's image towers take RGB images (3 channels)")
    if v["layer_norm_eps"] != CLIP_LN_EPS:
        v.refuse("layer_norm_eps", f"clip_jax's CLIP towers normalize with eps {CLIP_LN_EPS}")
    if v["hidden_act"] not in ACTIVATIONS:
        v.refuse("hidden_act", f"clip_jax's CLIP towers compute {sorted(ACTIVATIONS)}")
    if v["image_size"] % v["patch_size"]:
        v.refuse("image_size", f"not a multiple of patch_size {v['patch_size']}")
    vision = VisionConfig(image_size=v["image_size"], layers=v["num_hidden_layers"], width=v["hidden_size"],
                          patch_size=v["patch_size"], head_width=v["hidden_size"] // v.heads(), mlp_ratio=v.ratio())
    return vision, ACTIVATIONS[v["hidden_act"]]


def config_from_hf(hf: dict) -> CLIPConfig:
    """The CLIPConfig of a CLIPModel's config.json (as a dict); ValueError naming the field clip_jax
    cannot represent."""
    vision, quick = vision_from_hf(hf)
    t = Fields(hf, "text_config", TEXT_DEFAULTS)
    if t["layer_norm_eps"] != CLIP_LN_EPS:
        t.refuse("layer_norm_eps", f"clip_jax's CLIP towers normalize with eps {CLIP_LN_EPS}")
    if ACTIVATIONS.get(t["hidden_act"]) != quick:
        t.refuse("hidden_act", f"clip_jax's two CLIP towers share one activation, and vision_config.hidden_act is "
                               f"{'quick_gelu' if quick else 'gelu'!r}")
    eos, vocab = t["eos_token_id"], t["vocab_size"]
    # transformers pools the first eos token (or, for the legacy eos_token_id 2, the largest id): clip_jax
    # pools the largest id, which is the first eos only where eos is the vocabulary's last id.
    if eos != 2 and eos != vocab - 1:
        t.refuse("eos_token_id", f"clip_jax pools the largest token id (argmax), the first eos only where "
                                 f"eos_token_id is the vocabulary's last id ({vocab - 1})")
    text = TextConfig(context_length=t["max_position_embeddings"], vocab_size=vocab, width=t["hidden_size"],
                      heads=t.heads(), layers=t["num_hidden_layers"], mlp_ratio=t.ratio(), pool_type="argmax")
    return CLIPConfig(embed_dim=hf.get("projection_dim", 512), vision=vision, text=text, quick_gelu=quick,
                      init_logit_scale=hf.get("logit_scale_init_value", 2.6592))


def intermediate_size(width: int, ratio: float, tower: str) -> int:
    """The MLP width transformers' config names, refused where width * mlp_ratio is not whole."""
    if int(width * ratio) != width * ratio:
        raise ValueError(f"{tower} mlp_ratio {ratio} * width {width} is no whole intermediate_size")
    return int(width * ratio)


def vision_to_hf(config: CLIPConfig, family: str) -> dict:
    """A CLIP-style ViT vision_config; ValueError where transformers' `family` cannot hold the tower."""
    v = config.vision
    if v.kind != "vit":
        raise ValueError(f"transformers' {family} has only a ViT image tower, this one is {v.kind!r}: "
                         "write it in open_clip's layout (clip_jax.save_open_clip / export's default format)")
    if v.pool_type != "tok":
        raise ValueError(f"transformers' {family} pools the class token; vision pool_type is {v.pool_type!r}: "
                         "write it in open_clip's layout (clip_jax.save_open_clip)")
    return {"hidden_size": v.width, "intermediate_size": intermediate_size(v.width, v.mlp_ratio, "vision"),
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "num_channels": 3, "image_size": v.image_size,
            "patch_size": v.patch_size, "projection_dim": config.embed_dim,
            "hidden_act": "quick_gelu" if config.quick_gelu else "gelu", "layer_norm_eps": CLIP_LN_EPS,
            "attention_dropout": 0.0}


def config_to_hf(config: CLIPConfig) -> dict:
    """config.json of a CLIPModel; ValueError naming what transformers' CLIPModel cannot hold."""
    t = config.text
    if t.kind != "clip":
        raise ValueError(f"transformers' CLIPModel has CLIP's text tower; this one is {t.kind!r}")
    if config.init_logit_bias is not None:
        raise ValueError("transformers' CLIPModel has no logit bias (a SigLIP loss's): write it in open_clip's "
                         "layout (clip_jax.save_open_clip) or as a SigLIP model")
    if t.pool_type != "argmax" or t.no_causal_mask:
        raise ValueError(f"transformers' CLIPModel pools the eos token of a causal tower; this text tower has "
                         f"pool_type={t.pool_type!r}, no_causal_mask={t.no_causal_mask}: write it in open_clip's "
                         "layout (clip_jax.save_open_clip)")
    # eos is the vocabulary's last id, so transformers' first-eos pooling is clip_jax's argmax.
    text = {"vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": intermediate_size(t.width, t.mlp_ratio, "text"),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "projection_dim": config.embed_dim, "hidden_act": "quick_gelu" if config.quick_gelu else "gelu",
            "layer_norm_eps": CLIP_LN_EPS, "attention_dropout": 0.0, "bos_token_id": t.vocab_size - 2,
            "eos_token_id": t.vocab_size - 1, "pad_token_id": t.vocab_size - 1}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
            "logit_scale_init_value": config.init_logit_scale, "text_config": text,
            "vision_config": vision_to_hf(config, "CLIPModel")}


def vision_rename(key: str) -> tuple[tuple[str, ...], str]:
    """open_clip's 'visual.*' key of a ViT -> transformers' 'vision_model.*' / 'visual_projection.weight'."""
    m = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)", key)
    if m:
        return mapping.block_rename("vision_model.encoder.layers", m.group(1), m.group(2))
    if key == "visual.proj":
        return ("visual_projection.weight",), mapping.TRANSPOSE
    renames = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
               "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
               "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight"}
    if key in renames:
        return (renames[key],), mapping.COPY
    m = re.fullmatch(r"visual\.(ln_pre|ln_post)\.(weight|bias)", key)
    if m:  # 'pre_layrnorm' is transformers' spelling
        return (f"vision_model.{'pre_layrnorm' if m.group(1) == 'ln_pre' else 'post_layernorm'}.{m.group(2)}",), \
            mapping.COPY
    raise ValueError(f"no transformers key for open_clip's {key!r}")


def rename(key: str) -> tuple[tuple[str, ...], str]:
    """open_clip's key -> transformers' CLIPModel keys (mapping.Rename)."""
    if key.startswith("visual."):
        return vision_rename(key)
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if m:
        return mapping.block_rename("text_model.encoder.layers", m.group(1), m.group(2))
    if key == "text_projection":
        return ("text_projection.weight",), mapping.TRANSPOSE
    renames = {"logit_scale": "logit_scale", "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
               "positional_embedding": "text_model.embeddings.position_embedding.weight",
               "ln_final.weight": "text_model.final_layer_norm.weight",
               "ln_final.bias": "text_model.final_layer_norm.bias"}
    if key not in renames:
        raise ValueError(f"no transformers CLIPModel key for open_clip's {key!r}")
    return (renames[key],), mapping.COPY


def variables_from_hf(model, state_dict, only=None) -> dict:
    """clip_jax variables of `model` from a CLIPModel state dict (strict; `only`: a predicate on
    variable paths selecting the variables read, as clip_jax.convert.state_dict_to_variables)."""
    return mapping.variables_from_hf(model, state_dict, rename, only, IGNORED)


def variables_to_hf(model, variables) -> dict:
    return mapping.variables_to_hf(model, variables, rename)


# -- tokenizer and image processor files ----------------------------------------------------------------
def write_image_processor(config: CLIPConfig, out_dir: str, image_processor: str, processor: str):
    """preprocessor_config.json: clip_jax.preprocess's transform (bicubic resize of the shorter side,
    center crop, OpenAI's mean and std)."""
    from clip_jax.preprocessing import MEAN, STD

    size = config.vision.image_size
    content: dict[str, Any] = {
        "image_processor_type": image_processor, "processor_class": processor, "do_resize": True,
        "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD),
        "do_convert_rgb": True}
    write_json(os.path.join(out_dir, "preprocessor_config.json"), content)


def write_tokenizer(config: CLIPConfig, out_dir: str):
    """vocab.json, merges.txt and tokenizer_config.json of transformers' CLIPTokenizer (clip_jax's
    byte-level BPE, the same ids up to and including the end of text; transformers pads with
    <|endoftext|>, clip_jax with 0), and the image processor's preprocessor_config.json."""
    from clip_jax import tokenizers

    t, bpe = config.text, tokenizers.get_tokenizer()
    if t.tokenizer != "clip_bpe" or t.vocab_size != bpe.vocab_size:
        raise ValueError(f"transformers' CLIPTokenizer is CLIP's BPE over {bpe.vocab_size} ids; this model's text "
                         f"tokenizer is {t.tokenizer!r} over {t.vocab_size}: write it without tokenizer files "
                         "(tokenizer=False)")
    vocab = dict(sorted(bpe.encoder.items(), key=lambda kv: kv[1]))
    write_json(os.path.join(out_dir, "vocab.json"), vocab)
    merges = sorted(bpe.merge_rank.items(), key=lambda kv: kv[1])
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
        "model_max_length": t.context_length, "bos_token": tokenizers.SOT_TOKEN, "eos_token": tokenizers.EOT_TOKEN,
        "unk_token": tokenizers.EOT_TOKEN, "pad_token": tokenizers.EOT_TOKEN, "do_lower_case": True})
    write_image_processor(config, out_dir, "CLIPImageProcessor", "CLIPProcessor")


def write_json(path: str, content):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
        f.write("\n")
