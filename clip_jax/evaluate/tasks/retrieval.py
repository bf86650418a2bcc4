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

    def evaluate(self, features, encoder):
        info, feats = self.infos["data"], features["data"]
        m = self.max_captions
        mask = feats["caption_mask"][:, :m]
        has_caption = mask.any(axis=1)
        images = feats["image_embeds"][has_caption]
        mask = mask[has_caption]
        texts = feats["text_embeds"][has_caption][:, :m][mask]
        owner = np.nonzero(mask)[0]
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
