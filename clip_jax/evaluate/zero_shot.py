"""Zero-shot classification, the CLIP way: ensemble prompt embeddings per class, argmax cosine.

classifier[c] = normalize(mean_k normalize(encode_text(prompt_k(class c))));
logits = image_embeds @ classifier.T. Class names and templates of common datasets ship as
data (clip_jax/assets/zero_shot/NAME.json: imagenet, cifar10, cifar100, ...); a user passes
their own file of the same form: {"classnames": [...], "templates": ["a photo of a {}.", ...]}.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

import clip_jax
from clip_jax.tokenizers import tokenizer_for


def classifier_weights(model, params, class_prompts: Sequence[Sequence[str]], embed_texts=None) -> np.ndarray:
    """[C, d] unit vectors from prompts [class][k].

    embed_texts: tokens -> unit embeddings (default clip_jax.encode_text on one device;
    evaluation passes clip_jax.evaluate.features.Encoder.embed_texts, sharded over the mesh)."""
    ctx = model.config.text.context_length
    flat = [p for prompts in class_prompts for p in prompts]
    tokens = tokenizer_for(model.config.text)(flat, ctx)
    emb = embed_texts(tokens) if embed_texts else clip_jax.encode_text(model, params, tokens)
    out, start = [], 0
    for prompts in class_prompts:
        mean = emb[start : start + len(prompts)].mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
        start += len(prompts)
    return np.stack(out)


ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "zero_shot")


def available_metadata() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(ASSETS) if f.endswith(".json"))


def load_metadata(name_or_path: str) -> dict:
    """{'classnames': [...], 'templates': [...]} of a shipped dataset name or a JSON file."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(ASSETS, f"{name_or_path}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no zero-shot class names for {name_or_path!r}: use one of {available_metadata()} "
                                f"or a JSON file {{'classnames': [...], 'templates': ['a photo of a {{}}.', ...]}}")
    with open(path) as f:
        meta = json.load(f)
    for key in ("classnames", "templates"):
        if not meta.get(key) or not all(isinstance(x, str) and x for x in meta[key]):
            raise ValueError(f"{path}: '{key}' must be a non-empty list of non-empty strings")
    bad = [t for t in meta["templates"] if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{path}: every template needs exactly one '{{}}' for the class name; not {bad[:3]}")
    return meta


def prompts_for(meta: dict) -> list[list[str]]:
    return [[t.format(c) for t in meta["templates"]] for c in meta["classnames"]]


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits (ties broken by class index)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks if k <= logits.shape[1]}


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy of each class [C] (NaN for a class without examples)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    preds = np.argmax(logits, axis=1)
    n = logits.shape[1]
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    hits = np.bincount(labels[preds == labels], minlength=n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / counts, np.nan)

