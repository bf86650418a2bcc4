"""GroupViT's training loss and segmentation inference (NVlabs/GroupViT: models/multi_label_contrastive.py,
segmentation/evaluation/group_vit_seg.py), as functions of the global batch.

Loss: L = L_img-caption + multi_label_weight * L_multi-label. The first is CLIP's symmetric InfoNCE; the
second a soft-target cross-entropy between each image and all B * K prompt embeddings of the batch (K = 3
noun prompts per caption): image -> prompts with target 1/K on its own K prompts, each prompt -> images with
target 1 on its own image, averaged over rows and the two directions; it has its own learned temperature.
Under jit with the batch sharded over the mesh, these products of whole arrays are the global batch's (XLA
gathers the rows, with their gradients), as the reference's all_gather with gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.methods import METHODS
from clip_jax.methods.base import BatchInput, Prediction
from clip_jax.methods.clip import Clip
from clip_jax.preprocessing import model_images

MAX_SCALE = 100.0  # both temperatures are clamped there, as the reference


def _scale(logit_scale):
    return jnp.minimum(jnp.exp(logit_scale), MAX_SCALE)


def _soft_ce(logits, targets):
    """Mean over rows of -sum(targets * log_softmax(logits))."""
    return -(targets * jax.nn.log_softmax(logits, axis=-1)).sum(-1).mean()


def image_caption_loss(image_embeds, text_embeds, logit_scale):
    """CLIP's symmetric InfoNCE over the batch: unit-norm [B, E] and [B, E], the log temperature."""
    logits = _scale(logit_scale) * image_embeds.astype(jnp.float32) @ text_embeds.astype(jnp.float32).T
    eye = jnp.eye(logits.shape[0], dtype=jnp.float32)
    return 0.5 * (_soft_ce(logits, eye) + _soft_ce(logits.T, eye))


def multi_label_loss(image_embeds, prompt_embeds, logit_scale):
    """GroupViT's multi-label contrastive loss: unit-norm images [B, E] against unit-norm prompts [B, K, E]."""
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != image_embeds.shape[0]:
        raise ValueError(f"prompt_embeds must be [B, K, E] for B={image_embeds.shape[0]} images, got "
                         f"{prompt_embeds.shape}")
    batch, k = prompt_embeds.shape[:2]
    images = image_embeds.astype(jnp.float32)
    prompts = prompt_embeds.astype(jnp.float32).reshape(batch * k, -1)
    scale = _scale(logit_scale)
    owner = jnp.repeat(jnp.arange(batch), k)  # the image of each prompt row
    own = (owner[None, :] == jnp.arange(batch)[:, None]).astype(jnp.float32)  # [B, B*K]
    loss_image = _soft_ce(scale * images @ prompts.T, own / k)
    loss_text = _soft_ce(scale * prompts @ images.T, own.T)
    return 0.5 * (loss_image + loss_text)


def groupvit_loss(image_embeds, text_embeds, prompt_embeds, logit_scale, multi_label_scale,
                  multi_label_weight: float = 1.0):
    """(total, {'image_caption': ..., 'multi_label': ...}); prompt_embeds None: the image-caption loss only."""
    parts = {"image_caption": image_caption_loss(image_embeds, text_embeds, logit_scale)}
    total = parts["image_caption"]
    if prompt_embeds is not None and multi_label_weight:
        parts["multi_label"] = multi_label_loss(image_embeds, prompt_embeds, multi_label_scale)
        total = total + multi_label_weight * parts["multi_label"]
    return total, parts


def assignment_maps(assignments, image_size: int):
    """The product of the stages' soft assignments [N, G_i, T_i] (each next stage's tokens are the previous
    stage's groups) -> [N, image_size, image_size, G_last], bilinearly upsampled from the square patch grid
    (half-pixel centres: torch's align_corners=False)."""
    maps = jnp.swapaxes(assignments[0], 1, 2)  # [N, patches, G_1]
    for a in assignments[1:]:
        if a.shape[2] != maps.shape[2]:
            raise ValueError(f"stage assignments do not chain: {a.shape} after {maps.shape[2]} groups")
        maps = maps @ jnp.swapaxes(a, 1, 2)
    n, tokens, groups = maps.shape
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise ValueError(f"{tokens} patches are no square grid: segment() takes square images")
    maps = maps.reshape(n, grid, grid, groups).astype(jnp.float32)
    return jax.image.resize(maps, (n, image_size, image_size, groups), "bilinear")


def segment(assignments, group_embeds, image_embeds, class_embeds, logit_scale, image_size: int, top_k: int = 5,
            bg_thresh: float = 0.95):
    """GroupViT's zero-shot segmentation -> (class ids [N, H, W] int32, 0 = background and c + 1 = class c;
    logits [N, 1 + C, H, W]).

    assignments: the grouping stages' soft assignments (clip_jax.models.groupvit.encode_groups); group_embeds
    [N, G, E] and image_embeds [N, E] unit-norm; class_embeds [C, E] unit-norm; logit_scale: the log
    temperature (clamped at 100). Each pixel takes the group its assignment-product map favours; a group's
    class scores are the softmax over the image's top_k classes (by the image embedding) times the softmax over
    all classes; background where a pixel's best score is under min(bg_thresh, the image's best group score)
    (bg_thresh 0.95 for VOC and COCO, 0.35 for Context).
    """
    scale = _scale(logit_scale)
    classes = class_embeds.astype(jnp.float32)
    num_classes = classes.shape[0]
    group = scale * jnp.einsum("nge,ce->ngc", group_embeds.astype(jnp.float32), classes)
    pre = jax.nn.softmax(group, axis=-1)
    image = jax.nn.softmax(scale * image_embeds.astype(jnp.float32) @ classes.T, axis=-1)
    top = jax.lax.top_k(image, min(top_k, num_classes))[1]
    keep = jnp.zeros_like(image, bool).at[jnp.arange(image.shape[0])[:, None], top].set(True)
    affinity = jax.nn.softmax(jnp.where(keep[:, None, :], group, -jnp.inf), axis=-1) * pre  # [N, G, C]
    maps = assignment_maps(assignments, image_size)
    onehot = jax.nn.one_hot(jnp.argmax(maps, axis=-1), maps.shape[-1], dtype=jnp.float32)
    scores = jnp.einsum("nhwg,ngc->nchw", onehot, affinity)
    thresh = jnp.minimum(bg_thresh, affinity.max(axis=(1, 2)))[:, None, None]
    background = (scores.max(axis=1) < thresh).astype(jnp.float32)
    logits = jnp.concatenate([background[:, None], scores], axis=1)
    return jnp.argmax(logits, axis=1).astype(jnp.int32), logits


# config.groupvit: the multi-label branch beside the image-caption loss (facts: GroupViT's configs).
GROUPVIT_DEFAULTS = {
    "multi_label_weight": 1.0,  # total = image_caption + this * multi_label (0: the image-caption loss only)
    "prompts": 3,  # noun prompts per caption (the published config's multi_label)
    "noun_vocabulary": "",  # a text file of one noun a line; '' = the shape names (clip_jax.input.noun_prompts)
    "top_k": 5,  # segmentation: classes restricted to the image's top-k (the reference's)
    "bg_thresh": 0.95,  # segmentation: background below min(this, the image's best group score) (VOC, COCO)
}
# A foreground pixel's class logit in 'segment_logits' (others 0; a background pixel's all 0): under the
# segmentation task's threshold rule, any bg_thresh in (1/C, 1) then gives GroupViT's own decision.
DECIDED = 30.0
ML_SCALE = "multi_label_logit_scale"  # the multi-label loss's own log temperature, a top-level param
INIT_ML_SCALE = float(np.log(1 / 0.07))


@METHODS.register("groupvit")
class GroupViT(Clip):
    """GroupViT's training over the global batch {'image', 'tokens', 'prompt_tokens' [N, prompts, T]}: the
    caption and its prompts go through the text tower in one pass (as the reference's encode_text of
    [N, 1 + prompts, T]), so the text projector's BatchNorm sees all of them. Its 'segment_logits' is GroupViT's
    own inference (`segment`, with config.groupvit.top_k and bg_thresh); its runs export in transformers'
    GroupViTModel layout (--format=hf)."""

    batch_keys = ("image", "tokens", "prompt_tokens")

    def __init__(self, config, model, mesh, **options):
        if model.config.vision.kind != "groupvit" or model.config.text.kind != "groupvit":
            raise ValueError("config.method='groupvit' trains GroupViT's towers: pick a GroupViT preset "
                             "(--config.model=GroupViT-Shapes or GroupViT-S-16)")
        super().__init__(config, model, mesh, **options)
        section = config.get("groupvit", None) or {}
        settings = {**GROUPVIT_DEFAULTS, **dict(section)}
        self.prompts = int(settings["prompts"])
        self.multi_label_weight = float(settings["multi_label_weight"])
        self.vocabulary = str(settings["noun_vocabulary"])
        self.top_k, self.bg_thresh = int(settings["top_k"]), float(settings["bg_thresh"])

    def inputs(self):
        return super().inputs() + (
            BatchInput("prompt_tokens", "noun_prompts", ("caption",),
                       (("prompts", self.prompts), ("vocabulary", self.vocabulary))),)

    def batch_shapes(self, n):
        shapes = super().batch_shapes(n)
        shapes["prompt_tokens"] = jax.ShapeDtypeStruct((n, self.prompts, self.model.config.text.context_length),
                                                       jnp.int32)
        return shapes

    def init(self, rng):
        variables = dict(super().init(rng))
        variables["params"] = {**variables["params"], ML_SCALE: jnp.asarray(INIT_ML_SCALE, jnp.float32)}
        return variables

    def model_variables(self, params, model_state):
        return {"params": {k: v for k, v in params.items() if k != ML_SCALE}, **model_state}

    def loss(self, params, model_state, batch, rng, train: bool = True):
        variables = self.model_variables(params, model_state)
        tokens, prompts = batch["tokens"], batch["prompt_tokens"]
        n = tokens.shape[0]
        texts = jnp.concatenate([tokens[:, None], prompts], axis=1).reshape(n * (1 + self.prompts), -1)
        rngs = None
        if train and rng is not None:
            rngs = {"dropout": rng, "gumbel": jax.random.fold_in(rng, 1)}
        mutable = list(model_state) if train and model_state else False
        image_train = train and not self.image_locked

        def towers(module, images, texts):
            return module.encode_image(images, image_train), module.encode_text(texts, train), module.temperature()[0]

        out = self.model.apply(variables, model_images(batch["image"]), texts, method=towers, rngs=rngs,
                               mutable=mutable)
        (image, text, scale), state = (out[0], dict(out[1])) if mutable else (out, model_state)
        text = text.reshape(n, 1 + self.prompts, -1)
        total, parts = groupvit_loss(image, text[:, 0], text[:, 1:], jnp.log(scale), params[ML_SCALE],
                                     self.multi_label_weight)
        metrics = {**{f"{k}_loss": v for k, v in parts.items()}, "logit_scale": scale,
                   "multi_label_logit_scale": _scale(params[ML_SCALE])}
        return total, metrics, {**model_state, **state}

    def post_update(self, params):
        params = super().post_update(params)
        return dict(params, **{ML_SCALE: jnp.clip(params[ML_SCALE], 0.0, np.log(MAX_SCALE))})

    def predictions(self):
        """The two towers' predictions, with 'segment_logits' GroupViT's segmentation: [N, S, S, C] logits that
        are DECIDED on the pixel's class where `segment` finds one and 0 everywhere on background."""
        from clip_jax.models.groupvit import encode_groups

        out = super().predictions()
        model, top_k, bg_thresh = self.model, self.top_k, self.bg_thresh

        def segment_logits(variables, images, class_embeds):
            images = model_images(images)
            groups = encode_groups(model, variables, images)
            scale = model.apply(variables, method="temperature")[0]
            ids, _ = segment(groups["assignments"], groups["group_embeds"], groups["image_embeds"], class_embeds,
                             jnp.log(scale), images.shape[1], top_k, bg_thresh)
            onehot = jax.nn.one_hot(ids - 1, class_embeds.shape[0], dtype=jnp.float32)  # background: all zero
            return DECIDED * onehot

        out["segment_logits"] = Prediction(segment_logits, "image", 3)
        return out

    @classmethod
    def train_flops(cls, forward, config=None):
        """CLIP's step plus the default `prompts` texts per image more through the text tower and the multi-label
        logits (B x B * prompts), each with its backward (twice the forward)."""
        prompts = GROUPVIT_DEFAULTS["prompts"]
        return forward["train_step"] + 3.0 * prompts * (forward["text"] + forward["logits"])

    config_sections = {**Clip.config_sections, "groupvit": GROUPVIT_DEFAULTS}
    config_ranges = {**Clip.config_ranges, "groupvit.multi_label_weight": (">=", 0), "groupvit.prompts": (">=", 1),
                     "groupvit.top_k": (">=", 1), "groupvit.bg_thresh": ("[0,1]",)}
