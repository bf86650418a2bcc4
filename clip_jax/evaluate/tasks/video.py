"""Tasks on clips of frames (the records' ``frames``, read at data.video_frames, uniform, centre crop), run on the
method's 'video_embeds' (CLIP4Clip's and ActionCLIP's heads; a plain CLIP's is the mean of its frames' unit
embeddings, CLIP4Clip's meanP without training):

- retrieval_video=DATA: CLIP4Clip's table between each clip and its captions (up to max_captions, default 5):
  text->video (each caption's rank of its clip) and video->text (a clip's best-ranked caption) Recall@1/5/10,
  median and mean rank (1 = first). Metrics: retrieval/DATASET/{text_to_video,video_to_text}_{R1,R5,R10,MdR,MnR}.
- zero_shot_video=DATA: the clips classified against prompt-ensembled class embeddings, as zero_shot classifies
  images (class names, prompts and options the same); a method whose text was trained on its own templates
  (ActionCLIP's 16) embeds the class names in those. Metrics: zero_shot/DATASET[/SUBTASK]/{top1, top5,
  mean_per_class}."""

from __future__ import annotations

import numpy as np

from clip_jax.evaluate.retrieval import ranks
from clip_jax.evaluate.tasks.base import TASKS
from clip_jax.evaluate.tasks.retrieval import Retrieval
from clip_jax.evaluate.tasks.zero_shot import ZeroShot
from clip_jax.input.catalog import ClassNames

KS = (1, 5, 10)


def video_retrieval_metrics(video: np.ndarray, texts: np.ndarray, owner: np.ndarray) -> dict:
    """CLIP4Clip's figures of unit video embeddings [V, d], caption embeddings [T, d] and each caption's clip [T]."""
    v2t, t2v = ranks(video, texts, owner)
    out = {}
    for name, rank in (("text_to_video", t2v), ("video_to_text", v2t)):
        for k in KS:
            out[f"{name}_R{k}"] = float(np.mean(rank < k))
        out[f"{name}_MdR"] = float(np.median(rank) + 1)
        out[f"{name}_MnR"] = float(np.mean(rank) + 1)
    return out


@TASKS.register("retrieval_video")
class RetrievalVideo(Retrieval):
    predictions = ("video_embeds", "text_embeds")

    def evaluate(self, features, encoder):
        info, feats = self.infos["data"], features["data"]
        has_caption, texts, owner = self.captions(feats)
        video = feats["video_embeds"][has_caption]
        if not len(video):
            raise ValueError(f"{self.spec}: no clip of {info.spec} has a caption (caption_key={info.caption_key!r})")
        scores = video_retrieval_metrics(video, texts, owner)
        metrics = {f"retrieval/{self.named(info.name)}/{k}": v for k, v in scores.items()}
        details = {"clips": int(len(video)), "captions": int(len(texts)),
                   "clips_without_caption": int((~has_caption).sum())}
        if details["clips_without_caption"]:
            self.log(f"note: {details['clips_without_caption']} clips of {info.name} have no caption; left out of "
                     "retrieval")
        return metrics, details


@TASKS.register("zero_shot_video")
class ZeroShotVideo(ZeroShot):
    metric_prefix = "zero_shot"
    predictions = ("video_embeds", "text_embeds")
    embeds = "video_embeds"

    def evaluate(self, features, encoder):
        templates = getattr(encoder.predictions.get(self.embeds), "templates", None)
        if templates:  # the method's own prompts (ActionCLIP's), in place of the dataset's
            self.classes = {key: ClassNames(c.names, [[t.format(n) for t in templates] for n in c.names])
                            for key, c in self.classes.items()}
        return super().evaluate(features, encoder)
