"""Model configs: open_clip's JSON schema (embed_dim, vision_cfg, text_cfg, quick_gelu) as dataclasses.

Presets live in ``clip_jax/model_configs/NAME.json`` with the same keys as open_clip's
``model_configs``, so a user who knows one knows the other. A ``NAME-quickgelu`` variant
exists for every preset (QuickGELU is what OpenAI's released weights were trained with).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, Optional, Tuple, Union

import numpy as np

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "model_configs")
QUICKGELU_SUFFIX = "-quickgelu"
DEFAULT_LOGIT_SCALE = float(np.log(1 / 0.07))
DEFAULT_MAX_LOGIT_SCALE = float(np.log(100.0))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    layers: Union[int, Tuple[int, ...]] = 12  # a tuple of 4 stage depths selects ModifiedResNet
    width: int = 768
    patch_size: Optional[int] = 16
    head_width: int = 64
    mlp_ratio: float = 4.0
    pool_type: str = "tok"  # 'tok' | 'avg' | 'map' (attentional pooler, one query)
    attn_pooler_heads: int = 8
    patch_dropout: float = 0.0  # FLIP: the share of patch tokens dropped in training (open_clip's key)
    # The tower (clip_jax.models.clip.VISION_TOWERS); '' takes it from `layers`: 4 stage depths make a
    # ModifiedResNet ('resnet'), else 'vit'. A registered tower of another kind is named here.
    kind: str = ""
    # kind 'groupvit' (clip_jax.models.groupvit): per stage, its blocks, its learned group tokens (0: none) and
    # the segments it outputs; layers is their sum. drop_path: the largest stochastic-depth rate.
    stage_depths: Tuple[int, ...] = ()
    group_tokens: Tuple[int, ...] = ()
    output_groups: Tuple[int, ...] = ()
    drop_path: float = 0.0
    # kind 'swin' (clip_jax.models.swin): stage_depths and drop_path as above, the heads of each stage and the
    # attention window's side; width is the first stage's, patch_size the patch embedding's.
    stage_heads: Tuple[int, ...] = ()
    window_size: int = 0

    def __post_init__(self):
        if not self.kind:
            object.__setattr__(self, "kind", "resnet" if self.is_resnet else "vit")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        # ModifiedResNet's attention pool works at width*32 channels.
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclasses.dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    pool_type: str = "argmax"
    no_causal_mask: bool = False  # bidirectional attention over every position, padding too (open_clip's key)
    # With no_causal_mask: keys stop after the last non-pad_id token (open_clip's TextTransformer key,
    # which its CLIPTextCfg cannot set: an export with it does not build in open_clip 3.3).
    use_pad_mask: bool = False
    pad_id: int = 0
    tokenizer: str = "clip_bpe"  # clip_jax.tokenizers.TOKENIZERS: 'clip_bpe', 'wordpiece[:PATH]', 'sentencepiece:PATH'
    # The tower (clip_jax.models.clip.TEXT_TOWERS): 'clip' (causal, pre-LN) or 'bert' (Chinese-CLIP's:
    # post-LN, bidirectional over the non-padding tokens, [CLS] pooled; pool_type/no_causal_mask unused).
    kind: str = "clip"
    max_positions: int = 512  # 'bert': rows of the position table (context_length may not exceed it)
    type_vocab_size: int = 2  # 'bert': token types (all 0 in CLIP-style use)
    dropout: float = 0.0  # 'bert': hidden-state dropout in training (RoBERTa-wwm: 0.1)
    attn_dropout: float = 0.0  # 'bert': attention-probability dropout in training (RoBERTa-wwm: 0.1)


# TextConfig fields written to open_clip's JSON only when they differ from these defaults.
_TEXT_OPTIONAL = {"no_causal_mask": False, "use_pad_mask": False, "pad_id": 0, "tokenizer": "clip_bpe", "kind": "clip",
                  "max_positions": 512, "type_vocab_size": 2, "dropout": 0.0, "attn_dropout": 0.0}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = False
    init_logit_scale: float = DEFAULT_LOGIT_SCALE
    init_logit_bias: Optional[float] = None  # set (e.g. -10) for the SigLIP loss
    # The clamp on the learned log-temperature, in the logits and after each training step (open_clip's
    # log 100); None: unclamped, as big_vision's and transformers' SigLIP (the SigLIP presets).
    max_logit_scale: Optional[float] = DEFAULT_MAX_LOGIT_SCALE
    # > 0: both towers end in GroupViT's projector, Linear(in, this) -> BatchNorm -> ReLU -> Linear(this, embed_dim)
    projection_hidden: int = 0

    # -- open_clip JSON <-> dataclasses ------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        vision = dict(d.pop("vision_cfg"))
        text = dict(d.pop("text_cfg"))
        if vision.pop("attentional_pool", False):
            queries = vision.pop("attn_pooler_queries", 256)
            if queries != 1:
                raise ValueError(f"attentional_pool with attn_pooler_queries={queries} (CoCa) is not supported; use 1")
            vision["pool_type"] = "map"
        vision.pop("attn_pooler_queries", None)
        if isinstance(vision.get("layers"), (list, tuple)):
            vision["layers"] = tuple(vision["layers"])
        for key in ("stage_depths", "group_tokens", "output_groups", "stage_heads"):
            if key in vision:
                vision[key] = tuple(vision[key])
        vision = _known(VisionConfig, vision, "vision_cfg")
        text = _known(TextConfig, text, "text_cfg")
        d = _known(cls, d, "model config")
        return cls(vision=VisionConfig(**vision), text=TextConfig(**text), **d)

    def to_dict(self) -> dict[str, Any]:
        """The open_clip JSON for this config (what ``open_clip.add_model_config`` takes)."""
        vision = dataclasses.asdict(self.vision)
        if vision["pool_type"] == "map":
            vision.update(pool_type="tok", attentional_pool=True, attn_pooler_queries=1)
        else:
            vision.pop("attn_pooler_heads")
        if not vision["patch_dropout"]:
            vision.pop("patch_dropout")
        for key in ("stage_depths", "group_tokens", "output_groups", "stage_heads", "drop_path", "window_size"):
            if vision[key]:  # GroupViT's and Swin's only
                vision[key] = list(vision[key]) if isinstance(vision[key], tuple) else vision[key]
            else:
                vision.pop(key)
        if vision["kind"] == ("resnet" if self.vision.is_resnet else "vit"):  # open_clip's JSON has no such key
            vision.pop("kind")
        if self.vision.is_resnet:
            vision.pop("patch_dropout", None)
            vision["layers"] = list(vision["layers"])
            vision["patch_size"] = None
            for k in ("mlp_ratio", "pool_type"):
                vision.pop(k)
        out: dict[str, Any] = {"embed_dim": self.embed_dim}
        if self.quick_gelu:
            out["quick_gelu"] = True
        if self.init_logit_bias is not None:
            out["init_logit_bias"] = self.init_logit_bias
        if self.init_logit_scale != DEFAULT_LOGIT_SCALE:  # SigLIP's log 10 (open_clip's CLIP takes the key)
            out["init_logit_scale"] = self.init_logit_scale
        if self.max_logit_scale != DEFAULT_MAX_LOGIT_SCALE:
            out["max_logit_scale"] = self.max_logit_scale
        if self.projection_hidden:
            out["projection_hidden"] = self.projection_hidden
        out["vision_cfg"] = vision
        text = dataclasses.asdict(self.text)
        out["text_cfg"] = {k: v for k, v in text.items() if k not in _TEXT_OPTIONAL or v != _TEXT_OPTIONAL[k]}
        return out


def _known(klass, d: dict[str, Any], where: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(klass)} - {"vision", "text"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unsupported keys in {where}: {unknown} (supported: {sorted(fields)})")
    return d


def _preset_files() -> dict[str, str]:
    return {f[:-5]: os.path.join(CONFIG_DIR, f) for f in os.listdir(CONFIG_DIR) if f.endswith(".json")}


def list_models() -> list[str]:
    """Every preset name: open_clip's names, their -quickgelu variants, and tiny test presets."""
    names = []
    for base, path in _preset_files().items():
        with open(path) as f:
            d = json.load(f)
        quick_already = d.get("quick_gelu", False)  # the cn-* presets: OpenAI's image towers
        fixed_act = d["vision_cfg"].get("kind") == "siglip"  # SigLIP's towers compute tanh GELU only
        names += [base] if quick_already or fixed_act else [base, base + QUICKGELU_SUFFIX]
    return sorted(names)


def _deep_merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def get_model_config(name_or_config: Union[str, dict, CLIPConfig], overrides: Optional[dict] = None) -> CLIPConfig:
    """A preset name, an open_clip-style dict, a path to such a JSON file, or a CLIPConfig; with
    `overrides` (open_clip JSON keys, nested: {"text_cfg": {"width": 256}}) merged over it."""
    config = _config_of(name_or_config)
    if overrides:
        plain = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
        config = CLIPConfig.from_dict(_deep_merge(config.to_dict(), plain))
    return config


def _config_of(name_or_config) -> CLIPConfig:
    if isinstance(name_or_config, CLIPConfig):
        return name_or_config
    if isinstance(name_or_config, dict):
        d = name_or_config
        return from_chinese_clip(d) if is_chinese_clip_dict(d) else CLIPConfig.from_dict(d)
    name = name_or_config
    if name.endswith(".json") and os.path.exists(name):
        with open(name) as f:
            d = json.load(f)
        return from_chinese_clip(d) if is_chinese_clip_dict(d) else CLIPConfig.from_dict(d)
    files = _preset_files()
    base, quick = name, False
    if name.endswith(QUICKGELU_SUFFIX):
        base, quick = name[: -len(QUICKGELU_SUFFIX)], True
    if base not in files:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    with open(files[base]) as f:
        d = json.load(f)
    if quick:
        d["quick_gelu"] = True
    return CLIPConfig.from_dict(d)


# -- Chinese-CLIP's model JSON (the keyword arguments of its CLIP constructor) -----------------
CHINESE_CLIP_CONTEXT = 52  # its tokenizer's default; the constructor takes no context length


def is_chinese_clip_dict(d: dict) -> bool:
    return "vision_layers" in d and "text_hidden_size" in d


def to_chinese_clip(config: CLIPConfig) -> dict[str, Any]:
    """Chinese-CLIP's ``CLIP(**kwargs)`` for a model with a BERT text tower (cn_clip/clip/model.py)."""
    v, t = config.vision, config.text
    if t.kind != "bert":
        raise ValueError("only a model with a BERT text tower (text_cfg kind 'bert', the cn-* presets) has a "
                         "Chinese-CLIP form; save others with save_open_clip's open_clip JSON")
    if v.pool_type != "tok" or v.mlp_ratio != 4.0 or not config.quick_gelu:
        raise ValueError("Chinese-CLIP's image towers are OpenAI's (QuickGELU, class-token pooling, MLP ratio 4): "
                         f"this one differs (quick_gelu={config.quick_gelu}, pool_type={v.pool_type!r}, "
                         f"mlp_ratio={v.mlp_ratio})")
    out: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "image_resolution": v.image_size,
        "vision_layers": list(v.layers) if v.is_resnet else v.layers,
        "vision_width": v.width,
        "vision_patch_size": None if v.is_resnet else v.patch_size,
        "vocab_size": t.vocab_size,
        "text_attention_probs_dropout_prob": t.attn_dropout,
        "text_hidden_act": "gelu",
        "text_hidden_dropout_prob": t.dropout,
        "text_hidden_size": t.width,
        "text_initializer_range": 0.02,
        "text_intermediate_size": int(t.width * t.mlp_ratio),
        "text_max_position_embeddings": t.max_positions,
        "text_num_attention_heads": t.heads,
        "text_num_hidden_layers": t.layers,
        "text_type_vocab_size": t.type_vocab_size,
    }
    if v.head_width != 64:
        out["vision_head_width"] = v.head_width
    return out


def from_chinese_clip(d: dict[str, Any], context_length: int = CHINESE_CLIP_CONTEXT) -> CLIPConfig:
    """The CLIPConfig of Chinese-CLIP's constructor kwargs (as in its model_configs, merged)."""
    d = dict(d)
    if d.get("text_hidden_act", "gelu") != "gelu":
        raise ValueError(f"text_hidden_act {d['text_hidden_act']!r}: the BERT tower computes exact GELU only")
    layers = d["vision_layers"]
    if isinstance(layers, str):  # its RN50 JSON spells the stage depths as a string
        layers = json.loads(layers)
    resnet = isinstance(layers, (list, tuple))
    vision = VisionConfig(image_size=d["image_resolution"], layers=tuple(layers) if resnet else layers,
                          width=d["vision_width"], patch_size=None if resnet else d["vision_patch_size"],
                          head_width=d.get("vision_head_width", 64))
    width = d["text_hidden_size"]
    text = TextConfig(context_length=context_length, vocab_size=d["vocab_size"], width=width,
                      heads=d["text_num_attention_heads"], layers=d["text_num_hidden_layers"],
                      mlp_ratio=d["text_intermediate_size"] / width, kind="bert", tokenizer="wordpiece",
                      max_positions=d["text_max_position_embeddings"], type_vocab_size=d["text_type_vocab_size"],
                      dropout=d["text_hidden_dropout_prob"], attn_dropout=d["text_attention_probs_dropout_prob"])
    return CLIPConfig(embed_dim=d["embed_dim"], vision=vision, text=text, quick_gelu=True)
