"""Tasks of a model with an audio tower (AudioCLIP):

- zero_shot_audio=DATA: the split's clips classified against prompt-ensembled class embeddings, as zero_shot
  classifies images (the same class names, prompts and options). Metrics: zero_shot_audio/DATASET[/SUBTASK]/
  {top1, top5, mean_per_class}.
- retrieval_audio=DATA: Recall@K between each record's clip and its image (one each) and between the clip and
  the record's captions (up to max_captions). Metrics: retrieval_audio/DATASET/{audio_to_image, image_to_audio,
  audio_to_text, text_to_audio}_R{1,5,10}."""

from __future__ import annotations

import numpy as np

from clip_jax.evaluate.retrieval import recall_at_k
from clip_jax.evaluate.tasks.base import TASKS
from clip_jax.evaluate.tasks.retrieval import Retrieval
from clip_jax.evaluate.tasks.zero_shot import ZeroShot


@TASKS.register("zero_shot_audio")
class ZeroShotAudio(ZeroShot):
    metric_prefix = "zero_shot_audio"
    predictions = ("audio_embeds", "text_embeds")
    embeds = "audio_embeds"


@TASKS.register("retrieval_audio")
class RetrievalAudio(Retrieval):
    predictions = ("audio_embeds", "image_embeds", "text_embeds")

    def evaluate(self, features, encoder):
        info, feats = self.infos["data"], features["data"]
        audio, images = feats["audio_embeds"], feats["image_embeds"]
        n = len(audio)
        metrics = {}
        # one image per clip: the record's own
        for key, value in recall_at_k(audio, images, np.arange(n)).items():
            metrics[key.replace("image_to_text", "audio_to_image").replace("text_to_image", "image_to_audio")] = value
        has_caption, texts, owner = self.captions(feats)
        if len(texts):
            for key, value in recall_at_k(audio[has_caption], texts, owner).items():
                metrics[key.replace("image_to_text", "audio_to_text").replace("text_to_image", "text_to_audio")] = value
        metrics = {f"retrieval_audio/{self.named(info.name)}/{k}": v for k, v in metrics.items()}
        return metrics, {"clips": int(n), "captions": int(len(texts)),
                         "clips_without_caption": int((~has_caption).sum())}
