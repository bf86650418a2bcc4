"""Image-text retrieval Recall@K, COCO/Flickr style: several captions per image.

image->text: an image scores a hit at K when ANY of its captions ranks in its top K texts.
text->image: a caption scores a hit at K when its image ranks in its top K images.
Ties rank in index order (argsort is stable), so the result is deterministic.
Keys: image_to_text_R1, text_to_image_R5, ... (R@K without the '@', which TensorBoard tags reject).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def ranks(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray) -> tuple:
    """(image->text ranks [I]: the best over each image's captions, text->image ranks [T]), 0 = first, of unit
    embeddings image_embeds [I, d], text_embeds [T, d] and text_to_image [T] (the image of each caption)."""
    image_embeds, text_embeds = np.asarray(image_embeds, np.float32), np.asarray(text_embeds, np.float32)
    text_to_image = np.asarray(text_to_image)
    n_images, n_texts = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must hold one image index per caption: shape {text_to_image.shape}, "
                         f"{n_texts} captions")
    if n_texts and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image holds indices outside [0, {n_images})")
    if n_images and np.bincount(text_to_image, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption for image->text recall")
    sims = image_embeds @ text_embeds.T  # [I, T]
    # text->image: the rank of the caption's own image among all images.
    own = sims[text_to_image, np.arange(n_texts)]
    t2i_rank = (sims > own[None, :]).sum(0) + (
        (sims == own[None, :]) & (np.arange(n_images)[:, None] < text_to_image[None, :])
    ).sum(0)
    # image->text: the best rank over the image's captions.
    order = np.argsort(-sims, axis=1, kind="stable")  # [I, T] texts by score
    is_own = text_to_image[order] == np.arange(n_images)[:, None]
    return np.argmax(is_own, axis=1), t2i_rank


def recall_at_k(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """image_embeds [I, d], text_embeds [T, d] (unit norm), text_to_image [T]: the image of each caption."""
    i2t_rank, t2i_rank = ranks(image_embeds, text_embeds, text_to_image)
    out = {}
    for k in ks:
        out[f"image_to_text_R{k}"] = float(np.mean(i2t_rank < k))
        out[f"text_to_image_R{k}"] = float(np.mean(t2i_rank < k))
    return out
