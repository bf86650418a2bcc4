"""Zero-shot classification, the CLIP way: ensemble prompt embeddings per class, argmax cosine.

classifier[c] = normalize(mean_k normalize(encode_text(prompt_k(class c))));
logits = image_embeds @ classifier.T. (Issue 6 extends this: datasets, top-5, retrieval.)
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

import clip_jax


def classifier_weights(model, params, class_prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """[C, d] unit vectors from prompts [class][k]."""
    ctx = model.config.text.context_length
    flat = [p for prompts in class_prompts for p in prompts]
    emb = clip_jax.encode_text(model, params, clip_jax.tokenize(flat, ctx))
    out, start = [], 0
    for prompts in class_prompts:
        mean = emb[start : start + len(prompts)].mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
        start += len(prompts)
    return np.stack(out)


def accuracy(image_embeds: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    preds = np.argmax(np.asarray(image_embeds) @ weights.T, axis=1)
    return float(np.mean(preds == np.asarray(labels)))


def shapes_zero_shot(model, params, image_embeds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy on the shapes tasks; labels [N, 3] = (combo, color, shape) from the pipeline."""
    from clip_jax import shapes

    out = {}
    for i, task in enumerate(("combo", "color", "shape")):
        out[f"zero_shot/{task}"] = accuracy(image_embeds, labels[:, i], classifier_weights(model, params, shapes.prompts(task)))
    return out


def embed_split(model, params, pipeline) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings and labels of every batch of a finite (num_epochs=1) pipeline."""
    embeds, labels = [], []
    for batch in pipeline:
        images = batch["image"]
        if images.dtype == np.uint8:
            images = np.asarray(clip_jax.preprocessing.normalize_images(jnp.asarray(images)))
        embeds.append(clip_jax.encode_image(model, params, images.astype(np.float32)))
        labels.append(batch["labels"])
    return np.concatenate(embeds), np.concatenate(labels)
