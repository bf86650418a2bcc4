"""retrieval=DATA: image-text retrieval Recall@K over a split's images and their captions
(up to max_captions each, default 5; caption_key= says where they are).

Metrics: retrieval/DATASET/{image_to_text,text_to_image}_R{1,5,10}; details: the counts."""

from __future__ import annotations

import numpy as np

from clip_jax.evaluate.retrieval import recall_at_k
from clip_jax.evaluate.tasks.base import TASKS, Read, Task


@TASKS.register("retrieval")
class Retrieval(Task):
    options = frozenset({"caption_key", "max_captions", "limit"})
    predictions = ("image_embeds", "text_embeds")

    @property
    def max_captions(self) -> int:
        return int(self.spec.get("max_captions", 5))

    def reads(self):
        return {"data": Read(self.spec.data, self.limit, max_captions=self.max_captions,
                             caption_key=self.spec.get("caption_key"), predictions=self.predictions)}

    def captions(self, feats) -> tuple:
        """(which rows have a caption [n] bool, their captions' embeddings [T, d], each caption's row among those
        with one [T])."""
        mask = feats["caption_mask"][:, :self.max_captions]
        has_caption = mask.any(axis=1)
        mask = mask[has_caption]
        texts = feats["text_embeds"][has_caption][:, :self.max_captions][mask]
        return has_caption, texts, np.nonzero(mask)[0]

    def evaluate(self, features, encoder):
        info, feats = self.infos["data"], features["data"]
        has_caption, texts, owner = self.captions(feats)
        images = feats["image_embeds"][has_caption]
        if not len(images):
            raise ValueError(f"{self.spec}: no image of {info.spec} has a caption (caption_key={info.caption_key!r})")
        scores = recall_at_k(images, texts, owner)
        metrics = {f"retrieval/{self.named(info.name)}/{k}": v for k, v in scores.items()}
        details = {"images": int(len(images)), "captions": int(len(texts)),
                   "images_without_caption": int((~has_caption).sum())}
        if details["images_without_caption"]:
            self.log(f"note: {details['images_without_caption']} images of {info.name} have no caption; "
                     f"left out of retrieval")
        return metrics, details
