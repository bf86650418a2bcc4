"""transformers' ``SiglipModel`` layout (model_type 'siglip') <-> clip_jax's SigLIP towers (tower kind
'siglip', clip_jax.models.siglip): the same tensors under other names, q/k/v split, torch Linears
transposed, the MAP head's fused in_proj, the patch conv OIHW.

The family's interface (as every module of clip_jax.hf_layouts): MODEL_TYPES, config_from_hf,
config_to_hf, variables_from_hf, variables_to_hf, write_tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import jax.numpy as jnp

from clip_jax import rename_rules as rr
from clip_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from clip_jax.models.siglip import SIGLIP_LN_EPS

MODEL_TYPES = ("siglip",)

# transformers' defaults (SiglipTextConfig / SiglipVisionConfig), for config.json files that leave a field out.
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                     layer_norm_eps=1e-6, pad_token_id=1, projection_size=None)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6, vision_use_head=True)
HF_ACT = "gelu_pytorch_tanh"  # = clip_jax.models.layers.gelu_tanh
IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _fields(hf: dict, key: str, defaults: dict) -> dict:
    out = dict(defaults)
    out.update(hf.get(key) or {})
    return out


def _refuse(where: str, field: str, value, why: str):
    raise ValueError(f"config.json {where}.{field}={value!r}: {why}")


def _common(c: dict, where: str) -> tuple[int, float]:
    """(heads, mlp_ratio) of a sub-config, after the checks both towers share."""
    if c["hidden_act"] != HF_ACT:
        _refuse(where, "hidden_act", c["hidden_act"], f"clip_jax's SigLIP towers compute {HF_ACT!r} only")
    if c["layer_norm_eps"] != SIGLIP_LN_EPS:
        _refuse(where, "layer_norm_eps", c["layer_norm_eps"], f"clip_jax's SigLIP towers use {SIGLIP_LN_EPS}")
    if c["hidden_size"] % c["num_attention_heads"]:
        _refuse(where, "num_attention_heads", c["num_attention_heads"], "does not divide hidden_size")
    ratio = c["intermediate_size"] / c["hidden_size"]
    if int(c["hidden_size"] * ratio) != c["intermediate_size"]:
        _refuse(where, "intermediate_size", c["intermediate_size"], "not representable as mlp_ratio * hidden_size")
    return c["num_attention_heads"], ratio


def config_from_hf(hf: dict) -> CLIPConfig:
    """The CLIPConfig of a SiglipModel's config.json (a dict); ValueError naming what clip_jax cannot hold."""
    v = _fields(hf, "vision_config", VISION_DEFAULTS)
    t = _fields(hf, "text_config", TEXT_DEFAULTS)
    if v["num_channels"] != 3:
        _refuse("vision_config", "num_channels", v["num_channels"], "clip_jax's image towers take RGB images")
    if not v["vision_use_head"]:
        _refuse("vision_config", "vision_use_head", False, "clip_jax's SigLIP image tower pools with the MAP head")
    v_heads, v_ratio = _common(v, "vision_config")
    t_heads, t_ratio = _common(t, "text_config")
    embed = t["projection_size"] or t["hidden_size"]
    if embed != v["hidden_size"]:
        _refuse("text_config", "projection_size", embed, f"must equal the image width {v['hidden_size']} (the image "
                                                         "tower has no projection)")
    vision = VisionConfig(image_size=v["image_size"], layers=v["num_hidden_layers"], width=v["hidden_size"],
                          patch_size=v["patch_size"], head_width=v["hidden_size"] // v_heads, mlp_ratio=v_ratio,
                          kind="siglip")
    text = TextConfig(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"], width=t["hidden_size"],
                      heads=t_heads, layers=t["num_hidden_layers"], mlp_ratio=t_ratio, pool_type="last",
                      no_causal_mask=True, pad_id=t["pad_token_id"], tokenizer="sentencepiece", kind="siglip")
    return CLIPConfig(embed_dim=embed, vision=vision, text=text, init_logit_scale=math.log(10.0),
                      init_logit_bias=-10.0, max_logit_scale=None)


def config_to_hf(config: CLIPConfig) -> dict:
    """config.json of a SiglipModel; ValueError naming what transformers' SiglipModel cannot hold."""
    v, t = config.vision, config.text
    if v.kind != "siglip" or t.kind != "siglip":
        raise ValueError(f"transformers' SiglipModel holds SigLIP's towers (kind 'siglip'); these are "
                         f"{v.kind!r} / {t.kind!r}")
    out = {"architectures": ["SiglipModel"], "model_type": "siglip"}
    out["text_config"] = {
        "vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": _whole(t.width, t.mlp_ratio, "text"),
        "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
        "hidden_act": HF_ACT, "layer_norm_eps": SIGLIP_LN_EPS, "attention_dropout": 0.0, "pad_token_id": t.pad_id,
        "projection_size": config.embed_dim}
    out["vision_config"] = {
        "hidden_size": v.width, "intermediate_size": _whole(v.width, v.mlp_ratio, "vision"),
        "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "num_channels": 3, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": HF_ACT, "layer_norm_eps": SIGLIP_LN_EPS, "attention_dropout": 0.0,
        "vision_use_head": True}
    return out


def _whole(width: int, ratio: float, tower: str) -> int:
    hidden = int(width * ratio)
    if abs(hidden - width * ratio) > 0.5:
        raise ValueError(f"{tower} mlp_ratio {ratio} * width {width} is no whole intermediate_size")
    return hidden


# -- the tensor table ----------------------------------------------------------------------------------
def _block(path: tuple, prefix: str, heads: int) -> list[rr.Rule]:
    return (rr.layer_norm(path + ("ln_1",), f"{prefix}.layer_norm1.weight", f"{prefix}.layer_norm1.bias")
            + rr.split_qkv(path + ("attn",), tuple(f"{prefix}.self_attn.{n}_proj.weight" for n in "qkv"),
                           tuple(f"{prefix}.self_attn.{n}_proj.bias" for n in "qkv"), heads, torch=True)
            + rr.out_proj(path + ("attn",), f"{prefix}.self_attn.out_proj.weight", f"{prefix}.self_attn.out_proj.bias",
                          heads, torch=True)
            + rr.layer_norm(path + ("ln_2",), f"{prefix}.layer_norm2.weight", f"{prefix}.layer_norm2.bias")
            + rr.dense(path + ("mlp", "c_fc"), f"{prefix}.mlp.fc1.weight", f"{prefix}.mlp.fc1.bias")
            + rr.dense(path + ("mlp", "c_proj"), f"{prefix}.mlp.fc2.weight", f"{prefix}.mlp.fc2.bias"))


def _map_head(path: tuple, prefix: str, heads: int) -> list[rr.Rule]:
    """big_vision's MAP head as transformers stores it: a torch MultiheadAttention (one in_proj)."""
    attn = path + ("attn",)

    def out_qkv(q, k, v):
        return (jnp.concatenate([w.reshape(w.shape[0], -1).T for w in (q, k, v)]),)

    def into_qkv(w):
        d = w.shape[1]
        return tuple(part.T.reshape(d, heads, d // heads) for part in jnp.split(w, 3))

    return ([rr.same(attn + ("query",), f"{prefix}.probe", (1, 1, -1), (1, -1)),
             rr.Rule(tuple(attn + (f"{n}_proj_kernel",) for n in "qkv"), (f"{prefix}.attention.in_proj_weight",),
                     out_qkv, into_qkv),
             rr.same(attn + ("in_proj_bias",), f"{prefix}.attention.in_proj_bias", (-1,), (3, heads, -1))]
            + rr.out_proj(attn, f"{prefix}.attention.out_proj.weight", f"{prefix}.attention.out_proj.bias", heads,
                          torch=True)
            + rr.layer_norm(path + ("ln",), f"{prefix}.layernorm.weight", f"{prefix}.layernorm.bias")
            + rr.dense(path + ("mlp", "c_fc"), f"{prefix}.mlp.fc1.weight", f"{prefix}.mlp.fc1.bias")
            + rr.dense(path + ("mlp", "c_proj"), f"{prefix}.mlp.fc2.weight", f"{prefix}.mlp.fc2.bias"))


def conv_patches(path: tuple, key: str) -> rr.Rule:
    """The patch embedding's kernel [p, p, C, D] (HWIO) <-> SiglipModel's Conv2d weight [D, C, p, p] (OIHW)."""
    return rr.Rule((path,), (key,), lambda k: (k.transpose(3, 2, 0, 1),), lambda w: (w.transpose(2, 3, 1, 0),))


def rules(config: CLIPConfig, patches=conv_patches) -> list[rr.Rule]:
    """clip_jax's SigLIP variables <-> SiglipModel's state dict (`patches`: the patch embedding's rule, a
    function of (variable path, key))."""
    config_to_hf(config)  # refuses towers of other kinds
    v, t = config.vision, config.text
    tv, vv = ("text",), ("visual",)
    out = [rr.same(("logit_scale",), "logit_scale", (1,), ()), rr.same(("logit_bias",), "logit_bias", (1,), ()),
           rr.same(tv + ("token_embedding", "embedding"), "text_model.embeddings.token_embedding.weight"),
           rr.same(tv + ("positional_embedding",), "text_model.embeddings.position_embedding.weight")]
    for i in range(t.layers):
        out += _block(tv + ("transformer", f"resblocks_{i}"), f"text_model.encoder.layers.{i}", t.heads)
    out += rr.layer_norm(tv + ("ln_final",), "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias")
    out += rr.dense(tv + ("head",), "text_model.head.weight", "text_model.head.bias")
    out += [patches(vv + ("conv1", "kernel"), "vision_model.embeddings.patch_embedding.weight"),
            rr.same(vv + ("conv1", "bias"), "vision_model.embeddings.patch_embedding.bias"),
            rr.same(vv + ("positional_embedding",), "vision_model.embeddings.position_embedding.weight")]
    for i in range(v.layers):
        out += _block(vv + ("transformer", f"resblocks_{i}"), f"vision_model.encoder.layers.{i}", v.heads)
    out += rr.layer_norm(vv + ("ln_post",), "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias")
    out += _map_head(vv + ("attn_pool",), "vision_model.head", v.heads)
    return out


def expected_state_dict_shapes(model) -> dict[str, tuple]:
    return rr.expected_shapes(model, rules(model.config))


def variables_from_hf(model, state_dict, only=None) -> dict:
    """clip_jax variables (numpy) of `model` from a SiglipModel state dict: strict (every missing,
    unexpected or mis-shaped key named) or, with `only` (a predicate on variable paths), those only."""
    return rr.from_external(model, state_dict, rules(model.config), "the SiglipModel weights", only, IGNORED)


def variables_to_hf(model, variables) -> dict:
    """`model`'s variables as a SiglipModel state dict (numpy)."""
    return rr.to_external(model, variables, rules(model.config))


# -- tokenizer and image processor files ----------------------------------------------------------------
def write_tokenizer(config: CLIPConfig, out_dir: str, processor: str = "SiglipProcessor", image_processor=None):
    """spiece.model and tokenizer_config.json of transformers' SiglipTokenizer (the model's own
    SentencePiece file, text_cfg tokenizer 'sentencepiece:PATH'), and preprocessor_config.json
    (`image_processor`'s fields; by default SiglipImageProcessor's: a resize to the square, mean and std
    0.5)."""
    name, _, path = config.text.tokenizer.partition(":")
    if name != "sentencepiece" or not path:
        raise ValueError(f"transformers' SiglipTokenizer reads a SentencePiece model; this model's text tokenizer is "
                         f"{config.text.tokenizer!r}: set text_cfg tokenizer='sentencepiece:PATH' or write it without "
                         "tokenizer files")
    shutil.copyfile(path, os.path.join(out_dir, "spiece.model"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "SiglipTokenizer", "processor_class": processor,
        "model_max_length": config.text.context_length, "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "do_lower_case": True})
    size = config.vision.image_size
    image_processor = image_processor or {"image_processor_type": "SiglipImageProcessor",
                                          "size": {"height": size, "width": size}}
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        **image_processor, "processor_class": processor, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True})


def _write_json(path: str, content):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
