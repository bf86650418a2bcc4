"""ActionCLIP (Wang et al. 2021) as a method of the one trainer: action recognition as video-text matching, the
labels read as text.

Facts from the reference (sallymmx/ActionCLIP, train.py, utils/Text_Prompt.py, utils/KLLoss.py,
modules/Visual_Prompt.py):

- Each class name in 16 prompt templates (TEMPLATES); in training every clip's text is its label's name in one
  template drawn at random (here from the step's rng).
- The frames' CLIP embeddings (unnormalized) go through a temporal fusion (clip_jax.models.video.ActionFusion:
  meanP, LSTM, Conv_1D, Transf, Transf_cls); video and text are normalized and scored at CLIP's learned
  temperature.
- Several clips of a batch can share a label: the loss is the KL divergence between softmax(logits) and the
  batch's equal-label matrix (sharpened: softmax(10 x same)), both directions, averaged
  (clip_jax.methods.losses.make_kl_loss: over the global batch, as the reference's gathered outputs).
- The fusion trains at 10 x the lr of the CLIP weights (f_ratio; config.actionclip.fusion_lr_scale).

Batches: {'frames': [N, T, S, S, 3], 'frame_mask': int32 [N, T], 'labels': int [N, K]} with K =
config.data.label_keys, of which config.actionclip.label_key is the action's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.methods import METHODS
from clip_jax.methods.base import BatchInput, class_names
from clip_jax.methods.clip4clip import VideoMethod
from clip_jax.methods.losses import make_kl_loss
from clip_jax.models.layers import l2_normalize
from clip_jax.models.video import ACTIONCLIP_HEADS, video_head
from clip_jax.parallel.sharding import BATCH_AXES

# utils/Text_Prompt.py:9-13, in its order
TEMPLATES = ("a photo of action {}", "a picture of action {}", "Human action of {}", "{}, an action",
             "{} this is an action", "{}, a video of action", "Playing action of {}", "{}",
             "Playing a kind of action, {}", "Doing a kind of action, {}", "Look, the human is {}",
             "Can you recognize the action of {}?", "Video classification of {}", "A video of {}", "The man is {}",
             "The woman is {}")

# config.actionclip
ACTIONCLIP_DEFAULTS = {
    "fusion": "Transf",  # the temporal fusion (visual_prompt's sim_head): meanP, LSTM, Conv_1D, Transf, Transf_cls
    "fusion_layers": 6,  # Transf and Transf_cls's layers
    "fusion_lr_scale": 10.0,  # the fusion's lr multiplier over the CLIP weights' (f_ratio)
    "label_key": "label_action",  # the label feature (one of config.data.label_keys) the text is made from
    "classes": (),  # the class names, in label order
    "classes_file": "",  # or a text file of them, one a line
    "templates": TEMPLATES,  # the prompt templates ('{}' is the class name)
    "flip": True,  # one random left-right flip per training clip (the reference's GroupMultiScaleCrop + flip)
}


@METHODS.register("actionclip")
class ActionCLIP(VideoMethod):
    """Video-text KL loss over the global batch of clips and their labels' prompts."""

    section = "actionclip"
    batch_keys = ("frames", "frame_mask", "labels")

    def __init__(self, config, model, mesh, **options):
        super().__init__(config, model, mesh, **options)
        s = config.actionclip
        self.head_lr_mult = float(s.fusion_lr_scale)
        self.classes = class_names(s, "actionclip", "label order")
        self.column = list(config.data.label_keys).index(s.label_key)
        from clip_jax.tokenizers import tokenizer_for

        texts = [t.format(name) for name in self.classes for t in s.templates]
        tokens = tokenizer_for(model.config.text)(texts, model.config.text.context_length)
        self.tokens = np.asarray(tokens, np.int32).reshape(len(self.classes), len(s.templates), -1)
        self.loss_fn = make_kl_loss(mesh, BATCH_AXES, gather_by_sum=self.gather_by_sum)

    def make_head(self):
        s, text = self.config.actionclip, self.model.config.text
        return video_head(f"actionclip:{s.fusion}", heads=text.heads, frames=self.frames, layers=int(s.fusion_layers))

    def inputs(self):
        return self.clip_inputs() + (BatchInput("labels", "value", ("labels",)),)

    def batch_shapes(self, n):
        return {**self.video_shapes(n),
                "labels": jax.ShapeDtypeStruct((n, len(self.config.data.label_keys)), jnp.int32)}

    def templates(self):
        return tuple(self.config.actionclip.templates)

    def video_embeds(self, head_variables, features, mask, train=False, rng=None):
        rngs = {"dropout": rng} if train and rng is not None else None
        return l2_normalize(self.head.apply(head_variables, features, mask, deterministic=not train, rngs=rngs))

    def label_tokens(self, labels, rng, train: bool):
        """The text of each clip: its label's name in a random template (training), else in the first."""
        table = jnp.asarray(self.tokens)
        pick = (jax.random.randint(rng, labels.shape, 0, table.shape[1]) if train and rng is not None
                else jnp.zeros(labels.shape, jnp.int32))
        return table[labels, pick]

    def embed(self, params, model_state, batch, train: bool = True, rng=None):
        """(unit video embeddings [N, D], unit text embeddings [N, D], labels [N], exp(logit_scale), new state)."""
        clip, head = self.split({"params": params, **model_state})
        rngs = jax.random.split(rng, 4) if rng is not None else (None,) * 4
        labels = batch["labels"][:, self.column].astype(jnp.int32)
        features, state = self.frame_features(clip, batch["frames"], train, rngs[0])
        video = self.video_embeds(head, features, batch["frame_mask"], train, rngs[1])
        text = self.texts(clip, self.label_tokens(labels, rngs[2], train), train, rngs[3])
        return video, text, labels, self.scale(clip), state

    def loss(self, params, model_state, batch, rng, train: bool = True):
        video, text, labels, scale, state = self.embed(params, model_state, batch, train, rng)
        return self.loss_fn(video, text, labels, scale), {"logit_scale": scale}, state

    # -- config --
    config_sections = {"actionclip": ACTIONCLIP_DEFAULTS}
    config_ranges = {"actionclip.fusion_layers": (">=", 1), "actionclip.fusion_lr_scale": (">=", 0)}

    @classmethod
    def check_config(cls, config):
        s = config.actionclip
        if s.fusion not in ACTIONCLIP_HEADS:
            raise ValueError(f"config.actionclip.fusion={s.fusion!r}: use one of {ACTIONCLIP_HEADS}")
        if s.label_key not in tuple(config.data.label_keys):
            raise ValueError(f"config.actionclip.label_key={s.label_key!r} is not among config.data.label_keys="
                             f"{tuple(config.data.label_keys)}: add it to them (the text is made from its labels)")
        classes = class_names(s, "actionclip", "label order")
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"config.actionclip.classes (or classes_file) must name every class once, in label order "
                             f"(the texts are made from them), got {classes[:8]}")
        if not s.templates or any("{}" not in t for t in s.templates):
            raise ValueError(f"config.actionclip.templates={tuple(s.templates)[:4]}: give templates with '{{}}' where "
                             "the class name goes")
