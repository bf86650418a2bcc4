"""transformers' ``ChineseCLIPModel`` layout (model_type 'chinese_clip'): a BERT text tower pooled at
[CLS] over the non-padding tokens, CLIP's ViT image tower. Its keys are Chinese-CLIP's with
'text_model.' for 'bert.' and CLIPModel's vision keys (clip_jax.hf_layouts.clip).

The family's interface: MODEL_TYPES, config_from_hf, config_to_hf, variables_from_hf, variables_to_hf,
write_tokenizer (see clip_jax.hf_layouts).
"""

from __future__ import annotations

import os
import re
import shutil

from clip_jax.hf_layouts import clip as clip_family
from clip_jax.hf_layouts import mapping
from clip_jax.models.config import CHINESE_CLIP_CONTEXT, CLIPConfig, TextConfig

MODEL_TYPES = ("chinese_clip",)

# transformers' ChineseCLIPTextConfig defaults, for config.json files that leave a field out.
TEXT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, type_vocab_size=2, pad_token_id=0,
                     position_embedding_type="absolute")
BERT_LN_EPS = 1e-12  # clip_jax.models.bert's
# Buffers that older checkpoints saved beside the weights (arange / zero tables, not learned).
IGNORED = re.compile(r".*\.(position_ids|token_type_ids)")


def config_from_hf(hf: dict) -> CLIPConfig:
    """The CLIPConfig of a ChineseCLIPModel's config.json (as a dict), with Chinese-CLIP's context
    length (52: the config has none); ValueError naming the field clip_jax cannot represent."""
    vision, quick = clip_family.vision_from_hf(hf)
    t = clip_family.Fields(hf, "text_config", TEXT_DEFAULTS)
    if t["hidden_act"] != "gelu":
        t.refuse("hidden_act", "clip_jax's BERT tower computes the exact GELU ('gelu') only")
    if t["layer_norm_eps"] != BERT_LN_EPS:
        t.refuse("layer_norm_eps", f"clip_jax's BERT tower normalizes with eps {BERT_LN_EPS}")
    if t["position_embedding_type"] != "absolute":
        t.refuse("position_embedding_type", "clip_jax's BERT tower learns absolute positions ('absolute')")
    context = min(CHINESE_CLIP_CONTEXT, t["max_position_embeddings"])
    text = TextConfig(context_length=context, vocab_size=t["vocab_size"], width=t["hidden_size"], heads=t.heads(),
                      layers=t["num_hidden_layers"], mlp_ratio=t.ratio(), kind="bert", tokenizer="wordpiece",
                      max_positions=t["max_position_embeddings"], type_vocab_size=t["type_vocab_size"],
                      dropout=t["hidden_dropout_prob"], attn_dropout=t["attention_probs_dropout_prob"],
                      pad_id=t["pad_token_id"])
    return CLIPConfig(embed_dim=hf.get("projection_dim", 512), vision=vision, text=text, quick_gelu=quick,
                      init_logit_scale=hf.get("logit_scale_init_value", 2.6592))


def config_to_hf(config: CLIPConfig) -> dict:
    """config.json of a ChineseCLIPModel; ValueError naming what it cannot hold."""
    t = config.text
    if t.kind != "bert":
        raise ValueError(f"transformers' ChineseCLIPModel has a BERT text tower; this one is {t.kind!r}")
    if config.init_logit_bias is not None:
        raise ValueError("transformers' ChineseCLIPModel has no logit bias (a SigLIP loss's): write it in "
                         "open_clip's layout (clip_jax.save_open_clip)")
    text = {"vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": clip_family.intermediate_size(t.width, t.mlp_ratio, "text"),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions,
            "type_vocab_size": t.type_vocab_size, "hidden_act": "gelu", "layer_norm_eps": BERT_LN_EPS,
            "hidden_dropout_prob": t.dropout, "attention_probs_dropout_prob": t.attn_dropout, "pad_token_id": t.pad_id}
    return {"architectures": ["ChineseCLIPModel"], "model_type": "chinese_clip", "projection_dim": config.embed_dim,
            "logit_scale_init_value": config.init_logit_scale, "text_config": text,
            "vision_config": clip_family.vision_to_hf(config, "ChineseCLIPModel")}


def rename(key: str) -> tuple[tuple[str, ...], str]:
    """Chinese-CLIP's key (clip_jax.convert's form of a BERT tower) -> transformers' ChineseCLIPModel keys."""
    if key.startswith("visual."):
        return clip_family.vision_rename(key)
    if key.startswith("bert."):
        return ("text_model." + key[len("bert."):],), mapping.COPY
    if key == "text_projection":
        return ("text_projection.weight",), mapping.TRANSPOSE
    if key == "logit_scale":
        return ("logit_scale",), mapping.COPY
    raise ValueError(f"no transformers ChineseCLIPModel key for Chinese-CLIP's {key!r}")


def variables_from_hf(model, state_dict, only=None) -> dict:
    """clip_jax variables of `model` from a ChineseCLIPModel state dict (strict; `only` as in
    clip_jax.convert.state_dict_to_variables)."""
    return mapping.variables_from_hf(model, state_dict, rename, only, IGNORED)


def variables_to_hf(model, variables) -> dict:
    return mapping.variables_to_hf(model, variables, rename)


def write_tokenizer(config: CLIPConfig, out_dir: str):
    """vocab.txt and tokenizer_config.json of transformers' BertTokenizer (clip_jax's WordPiece ids:
    [CLS] ... [SEP], padded with [PAD] 0), and ChineseCLIPImageProcessor's preprocessor_config.json
    (clip_jax.preprocess's transform, as for every clip_jax model)."""
    from clip_jax.tokenizers import ZH_VOCAB_PATH

    t = config.text
    name, _, path = t.tokenizer.partition(":")
    if name != "wordpiece":
        raise ValueError(f"transformers' BertTokenizer is WordPiece; this model's text tokenizer is {t.tokenizer!r}: "
                         "write it without tokenizer files (tokenizer=False)")
    path = path or ZH_VOCAB_PATH
    with open(path, encoding="utf-8") as f:  # universal newlines, as BERT's load_vocab (not str.splitlines)
        tokens = f.read().rstrip("\n").split("\n")
    if len(tokens) != t.vocab_size or tokens[t.pad_id] != "[PAD]":
        raise ValueError(f"the WordPiece vocab {path} has {len(tokens)} ids, the text tower embeds {t.vocab_size} "
                         f"with pad_id {t.pad_id}: BertTokenizer needs the same vocab, [PAD] at pad_id")
    shutil.copyfile(path, os.path.join(out_dir, "vocab.txt"))
    clip_family.write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "BertTokenizer", "processor_class": "ChineseCLIPProcessor",
        "model_max_length": t.context_length, "do_lower_case": True, "tokenize_chinese_chars": True,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "mask_token": "[MASK]"})
    clip_family.write_image_processor(config, out_dir, "ChineseCLIPImageProcessor", "ChineseCLIPProcessor")
