"""transformers' ``GroupViTModel`` layout (model_type 'groupvit') <-> clip_jax's GroupViT towers (tower kinds
'groupvit', clip_jax.models.groupvit): the same tensors under other names, q/k/v split, torch Linears
transposed, the patch conv OIHW, and the projectors' BatchNorm running statistics (the 'batch_stats'
collection) beside the params.

The family's interface (as every module of clip_jax.hf_layouts): MODEL_TYPES, config_from_hf,
config_to_hf, variables_from_hf, variables_to_hf, write_tokenizer.
"""

from __future__ import annotations

import numpy as np

from clip_jax import rename_rules as rr
from clip_jax.hf_layouts import clip as clip_layout
from clip_jax.hf_layouts.siglip import _block, conv_patches
from clip_jax.models.config import CLIPConfig, TextConfig, VisionConfig
from clip_jax.models.groupvit import ASSIGN_EPS, ASSIGN_MLP_RATIO

MODEL_TYPES = ("groupvit",)

# transformers' defaults (GroupViTTextConfig, GroupViTVisionConfig, GroupViTConfig) for fields config.json omits
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                     num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, depths=[6, 3, 3],
                       num_group_tokens=[64, 8, 0], num_output_groups=[64, 8, 8], num_attention_heads=6,
                       image_size=224, patch_size=16, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5,
                       assign_eps=1.0, assign_mlp_ratio=[0.5, 4])
MODEL_DEFAULTS = dict(projection_dim=256, projection_intermediate_dim=4096, logit_scale_init_value=2.6592)
TEXT_ACTS = {"quick_gelu": True, "gelu": False}  # hidden_act -> CLIPConfig.quick_gelu (the text tower's)
IGNORED = ("text_model.embeddings.position_ids",)
# the projectors' BatchNorm running statistics: clip_jax's batch_stats leaf -> BatchNorm1d's buffer
STATS = {"mean": "running_mean", "var": "running_var", "num_batches_tracked": "num_batches_tracked"}


def _refuse(where: str, field: str, value, why: str):
    raise ValueError(f"config.json {where}.{field}={value!r}: {why}")


def _ratio(c: dict, where: str) -> float:
    if c["hidden_size"] % c["num_attention_heads"]:
        _refuse(where, "num_attention_heads", c["num_attention_heads"], "does not divide hidden_size")
    if c["layer_norm_eps"] != 1e-5:
        _refuse(where, "layer_norm_eps", c["layer_norm_eps"], "clip_jax's GroupViT towers use 1e-5")
    return c["intermediate_size"] / c["hidden_size"]


def config_from_hf(hf: dict) -> CLIPConfig:
    """The CLIPConfig of a GroupViTModel's config.json (a dict); ValueError naming what clip_jax cannot hold."""
    v = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    t = {**TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    m = {**MODEL_DEFAULTS, **hf}
    if v["hidden_act"] != "gelu":
        _refuse("vision_config", "hidden_act", v["hidden_act"], "clip_jax's GroupViT image tower computes 'gelu' only")
    if t["hidden_act"] not in TEXT_ACTS:
        _refuse("text_config", "hidden_act", t["hidden_act"], f"clip_jax's text towers compute {sorted(TEXT_ACTS)}")
    if v["num_channels"] != 3:
        _refuse("vision_config", "num_channels", v["num_channels"], "clip_jax's image towers take RGB images")
    if float(v["assign_eps"]) != ASSIGN_EPS:
        _refuse("vision_config", "assign_eps", v["assign_eps"], f"clip_jax's grouping blocks use {ASSIGN_EPS}")
    if tuple(map(float, v["assign_mlp_ratio"])) != ASSIGN_MLP_RATIO:
        _refuse("vision_config", "assign_mlp_ratio", v["assign_mlp_ratio"], f"clip_jax's are {ASSIGN_MLP_RATIO}")
    for key in ("image_size", "patch_size"):
        if not isinstance(v[key], int):
            _refuse("vision_config", key, v[key], "clip_jax's towers take square images: give one int")
    if sum(v["depths"]) != v["num_hidden_layers"]:
        _refuse("vision_config", "num_hidden_layers", v["num_hidden_layers"], f"must be sum(depths) {v['depths']}")
    if t["eos_token_id"] not in (2, t["vocab_size"] - 1):
        _refuse("text_config", "eos_token_id", t["eos_token_id"], "clip_jax's text tower pools the largest id (CLIP's "
                f"end of text), so the end-of-text id must be the vocabulary's last, {t['vocab_size'] - 1}")
    v_ratio, t_ratio = _ratio(v, "vision_config"), _ratio(t, "text_config")
    vision = VisionConfig(image_size=v["image_size"], layers=v["num_hidden_layers"], width=v["hidden_size"],
                          patch_size=v["patch_size"], head_width=v["hidden_size"] // v["num_attention_heads"],
                          mlp_ratio=v_ratio, kind="groupvit", stage_depths=tuple(v["depths"]),
                          group_tokens=tuple(v["num_group_tokens"]), output_groups=tuple(v["num_output_groups"]))
    text = TextConfig(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"], width=t["hidden_size"],
                      heads=t["num_attention_heads"], layers=t["num_hidden_layers"], mlp_ratio=t_ratio,
                      kind="groupvit")
    return CLIPConfig(embed_dim=m["projection_dim"], vision=vision, text=text, quick_gelu=TEXT_ACTS[t["hidden_act"]],
                      init_logit_scale=float(m["logit_scale_init_value"]),
                      projection_hidden=m["projection_intermediate_dim"])


def _whole(width: int, ratio: float, tower: str) -> int:
    hidden = int(round(width * ratio))
    if abs(hidden - width * ratio) > 1e-6:
        raise ValueError(f"{tower} mlp_ratio {ratio} * width {width} is no whole intermediate_size")
    return hidden


def config_to_hf(config: CLIPConfig) -> dict:
    """config.json of a GroupViTModel; ValueError naming what transformers' GroupViTModel cannot hold."""
    v, t = config.vision, config.text
    if v.kind != "groupvit" or t.kind != "groupvit":
        raise ValueError(f"transformers' GroupViTModel holds GroupViT's towers (kind 'groupvit'); these are "
                         f"{v.kind!r} / {t.kind!r}")
    return {
        "architectures": ["GroupViTModel"], "model_type": "groupvit", "projection_dim": config.embed_dim,
        "projection_intermediate_dim": config.projection_hidden, "logit_scale_init_value": config.init_logit_scale,
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": _whole(t.width, t.mlp_ratio, "text"),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "hidden_act": "quick_gelu" if config.quick_gelu else "gelu", "layer_norm_eps": 1e-5,
            "pad_token_id": 1, "bos_token_id": t.vocab_size - 2, "eos_token_id": t.vocab_size - 1},
        "vision_config": {
            "hidden_size": v.width, "intermediate_size": _whole(v.width, v.mlp_ratio, "vision"),
            "num_hidden_layers": v.layers, "depths": list(v.stage_depths), "num_group_tokens": list(v.group_tokens),
            "num_output_groups": list(v.output_groups), "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "assign_eps": ASSIGN_EPS, "assign_mlp_ratio": list(ASSIGN_MLP_RATIO)}}


# -- the tensor table ----------------------------------------------------------------------------------
def _named(rule, path: tuple, prefix: str, names) -> list[rr.Rule]:
    """rule (rr.dense, rr.layer_norm) for each module named as transformers' (path + 'a/b' <-> prefix.a.b)."""
    out = []
    for name in names:
        parts = tuple(name.split("/"))
        key = f"{prefix}.{'.'.join(parts)}"
        out += rule(path + parts, f"{key}.weight", f"{key}.bias")
    return out


def _denses(path: tuple, prefix: str, names) -> list[rr.Rule]:
    return _named(rr.dense, path, prefix, names)


def _norms(path: tuple, prefix: str, names) -> list[rr.Rule]:
    return _named(rr.layer_norm, path, prefix, names)


def _projector(path: tuple, prefix: str) -> list[rr.Rule]:
    return (rr.dense(path + ("linear1",), f"{prefix}.0.weight", f"{prefix}.0.bias")
            + rr.layer_norm(path + ("bn",), f"{prefix}.1.weight", f"{prefix}.1.bias")
            + rr.dense(path + ("linear2",), f"{prefix}.3.weight", f"{prefix}.3.bias"))


def _grouping(path: tuple, prefix: str) -> list[rr.Rule]:
    return (_norms(path, prefix, ("norm_tokens", "norm_x", "norm_post_tokens", "norm_new_x", "pre_assign_attn/norm2",
                                  "pre_assign_attn/norm_post"))
            + _denses(path, prefix, ("mlp_inter/fc1", "mlp_inter/fc2", "mlp_channels/fc1", "mlp_channels/fc2",
                                     "pre_assign_attn/mlp/fc1", "pre_assign_attn/mlp/fc2", "assign/q_proj",
                                     "assign/k_proj", "assign/v_proj", "assign/proj")
                      + tuple(f"pre_assign_attn/attn/{n}_proj" for n in ("q", "k", "v", "out"))))


def rules(config: CLIPConfig) -> list[rr.Rule]:
    """clip_jax's GroupViT params <-> GroupViTModel's state dict (without the BatchNorm statistics)."""
    config_to_hf(config)  # refuses towers of other kinds
    v, t = config.vision, config.text
    tv, vv = ("text",), ("visual",)
    out = [rr.same(("logit_scale",), "logit_scale"),
           rr.same(tv + ("token_embedding", "embedding"), "text_model.embeddings.token_embedding.weight"),
           rr.same(tv + ("positional_embedding",), "text_model.embeddings.position_embedding.weight")]
    for i in range(t.layers):
        out += _block(tv + ("transformer", f"resblocks_{i}"), f"text_model.encoder.layers.{i}", t.heads)
    out += rr.layer_norm(tv + ("ln_final",), "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias")
    out += _projector(tv + ("projection",), "text_projection")
    emb = "vision_model.embeddings"
    out += [conv_patches(vv + ("conv1", "kernel"), f"{emb}.patch_embeddings.projection.weight"),
            rr.same(vv + ("conv1", "bias"), f"{emb}.patch_embeddings.projection.bias"),
            rr.same(vv + ("positional_embedding",), f"{emb}.position_embeddings", (1, -1, v.width), (-1, v.width))]
    out += rr.layer_norm(vv + ("ln_embed",), f"{emb}.layernorm.weight", f"{emb}.layernorm.bias")
    for i, depth in enumerate(v.stage_depths):
        path, prefix = vv + (f"stages_{i}",), f"vision_model.encoder.stages.{i}"
        for j in range(depth):
            out += _block(path + (f"blocks_{j}",), f"{prefix}.layers.{j}", v.heads)
        if v.group_tokens[i]:
            out.append(rr.same(path + ("group_token",), f"{prefix}.group_token", (1, -1, v.width), (-1, v.width)))
            out += _grouping(path + ("grouping",), f"{prefix}.downsample")
            if i and v.group_tokens[i - 1]:
                out += rr.layer_norm(path + ("projector_norm",), f"{prefix}.group_projector.0.weight",
                                     f"{prefix}.group_projector.0.bias")
                out += _denses(path + ("projector_mlp",), f"{prefix}.group_projector.1", ("fc1", "fc2"))
    out += rr.layer_norm(vv + ("ln_post",), "vision_model.layernorm.weight", "vision_model.layernorm.bias")
    out += _projector(vv + ("projection",), "visual_projection")
    return out


def _stat_keys() -> dict[tuple, str]:
    """batch_stats path -> GroupViTModel buffer."""
    return {(tower, "projection", "bn", leaf): f"{prefix}.1.{buffer}"
            for tower, prefix in (("visual", "visual_projection"), ("text", "text_projection"))
            for leaf, buffer in STATS.items()}


def expected_state_dict_shapes(model) -> dict[str, tuple]:
    shapes = rr.expected_shapes(model, rules(model.config))
    hidden = model.config.projection_hidden
    for (_, _, _, leaf), key in _stat_keys().items():
        shapes[key] = () if leaf == "num_batches_tracked" else (hidden,)
    return shapes


def variables_from_hf(model, state_dict, only=None) -> dict:
    """clip_jax variables (numpy) of `model` from a GroupViTModel state dict: strict (every missing,
    unexpected or mis-shaped key named) or, with `only` (a predicate on variable paths), those only."""
    stats = _stat_keys()
    buffers = set(stats.values())
    wanted = {path: key for path, key in stats.items() if only is None or only(("batch_stats",) + path)}
    missing = sorted(key for key in wanted.values() if key not in state_dict)
    hidden = model.config.projection_hidden
    wrong = sorted(key for key in wanted.values() if key in state_dict and "num_batches" not in key
                   and tuple(np.shape(state_dict[key])) != (hidden,))
    if missing or wrong:
        raise ValueError(f"the GroupViTModel weights do not match the model: BatchNorm statistics missing {missing}, "
                         f"mis-shaped {wrong} (expected [{hidden}])")
    params = {k: x for k, x in state_dict.items() if k not in buffers}
    variables = rr.from_external(model, params, rules(model.config), "the GroupViTModel weights", only, IGNORED)
    batch_stats: dict = {}
    for (tower, *rest), key in wanted.items():
        node = batch_stats.setdefault(tower, {}).setdefault(rest[0], {}).setdefault(rest[1], {})
        dtype = np.int32 if rest[2] == "num_batches_tracked" else np.float32
        node[rest[2]] = np.asarray(state_dict[key]).astype(dtype)
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def variables_to_hf(model, variables) -> dict:
    """`model`'s variables as a GroupViTModel state dict (numpy), BatchNorm statistics with them."""
    out = rr.to_external(model, variables, rules(model.config))
    stats = dict(variables).get("batch_stats")
    if stats is None:
        raise ValueError("GroupViT's variables need their 'batch_stats' (the projectors' BatchNorm statistics): "
                         "pass the whole variables dict, not its params")
    for (tower, module, bn, leaf), key in _stat_keys().items():
        value = np.asarray(stats[tower][module][bn][leaf])
        out[key] = value.astype(np.int64) if leaf == "num_batches_tracked" else value.astype(np.float32)
    return out


def write_tokenizer(config: CLIPConfig, out_dir: str):
    """CLIP's BPE tokenizer and image processor files, as GroupViT's hub checkpoints carry (CLIPProcessor)."""
    clip_layout.write_tokenizer(config, out_dir)
