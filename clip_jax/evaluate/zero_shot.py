"""Zero-shot classification, the CLIP way: ensemble prompt embeddings per class, argmax cosine.

classifier[c] = normalize(mean_k normalize(encode_text(prompt_k(class c))));
logits = image_embeds @ classifier.T. Class names and templates come with a data source
(clip_jax.input.catalog: shipped files for common datasets, clip_jax/assets/zero_shot/NAME.json);
a user passes their own file of the same form: {"classnames": [...], "templates": ["a photo of a {}.", ...]}.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import clip_jax
from clip_jax.input.catalog import available_metadata, load_metadata, prompts_for
from clip_jax.tokenizers import tokenizer_for

__all__ = ["available_metadata", "classifier_weights", "load_metadata", "per_class_accuracy", "prompts_for",
           "topk_accuracy"]


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

