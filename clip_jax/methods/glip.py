"""GLIP (Li et al. 2022, "Grounded Language-Image Pre-training") as a method of the one trainer.

Detection as grounding: a one-stage detector on a feature pyramid of the image tower whose classifier is the
alignment of every anchor with every token of a prompt (class names joined by ". " for detection data, the
caption for grounding data), so a class is detected by typing its name. Facts from the reference
(microsoft/GLIP, maskrcnn_benchmark; clip_jax.models.atss holds the assigner and losses):

- Backbone and pyramid: the image tower's four stages (ModifiedResNet, Swin as GLIP-T, or a ViT through a simple
  feature pyramid), an FPN on them and RetinaNet's P6, P7 (stride-2 convs); one square anchor a position, of
  side anchor_scale x stride (8, ATSS's).
- Head: num_convs layers shared over the levels, each a 3x3 conv, GroupNorm and ReLU (GLIP's DyHead layers
  replaced by this ATSS tower: no deformable convs). With deep fusion (config.glip.fusion, GLIP-T(B)) a
  bidirectional image-text cross-attention block runs before each layer over all levels' positions at once
  and the prompt's tokens (fuse_helper's BiMultiHeadAttention: both directions share one attention matrix,
  stabilized by subtracting its max and clamped to +-50000, padding tokens masked on the image side, layer
  scales gamma_v, gamma_l at 1 / num_convs); off is GLIP-T(A).
- Outputs: per anchor the alignment logit with every token (O . Linear(norm(e) / 2)^T / exp(log_scale) +
  norm(e) . bias_lang + bias0), ATSS box deltas (a learned scale per level) and a centerness logit.
- Loss: ATSS assignment, sigmoid focal loss over (anchor, token) against the prompt's positive map, GIoU
  weighted by centerness, centerness BCE (clip_jax.models.atss.atss_losses).
- Inference: a class's probability is the mean of its tokens' sigmoids (the evaluation prompt is every class
  name in order); score = sqrt(p_class x p_centerness) where p_class > score_threshold; the best pre_nms
  (anchor, class) pairs through per-class NMS, `detections` kept.

Language: the text tower's per-token states (encode_text_tokens: CLIP's through ln_final and the projection, or
BERT's last hidden states, the reference's, through the projection), trained at
config.glip.text_lr_mult of the learning rate (GLIP: 1e-5 against 1e-4). Open vocabulary: detection prompts
name the base classes only (the boxes of config.glip.novel are dropped from detection records); grounding
records keep every box, so novel classes are learned from the captions' words.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.methods import METHODS
from clip_jax.methods.base import (
    BatchInput,
    Method,
    Prediction,
    check_class_names,
    class_names,
    export_with_head,
    tower_predictions,
    towers_only,
)
from clip_jax.models import atss, box_ops, dummy_inputs
from clip_jax.models import detector as det
from clip_jax.preprocessing import model_images

HEAD = "glip"  # every detector param sits under this top-level name
LOGIT_CLAMP = 50000.0  # fuse_helper's clamp of the attention logits

# config.glip (facts: GLIP-T's glip_Swin_T_O365_GoldG.yaml and maskrcnn_benchmark's defaults)
GLIP_DEFAULTS = {
    "classes": ("circle", "square", "triangle", "star", "cross", "diamond"),  # the boxes' label order
    "classes_file": "",  # a text file of class names, one a line in label order, in place of `classes`
    "labels": "shape",  # the boxes op's label set ('record': the records' objects/label)
    "novel": ("star", "cross"),  # never in a detection prompt, their boxes dropped from detection records
    "prompts": "mix",  # 'detection', 'grounding' (the record's caption and phrase spans) or 'mix'
    "grounding_fraction": 0.5,  # the share of grounding records under 'mix'
    # 'grounding': under 'mix' a record holding a novel object is always a grounding record (as a detection record
    # its novel objects would be background); 'detection': drawn as any other
    "novel_records": "detection",
    "negatives": 85,  # negative class names sampled into a detection prompt (DATASETS.RANDOM_SAMPLE_NEG)
    "query_length": 256,  # MAX_QUERY_LEN; capped by the text tower's context length
    "max_objects": 100,
    "levels": (3, 4, 5, 6, 7),  # the pyramid levels the head sees (P6, P7 from P5 by stride-2 convs)
    "fpn_width": 256,
    "anchor_scale": 8.0,  # an anchor of level l is anchor_scale * 2**l wide (ATSS: 64 px on P3)
    "top_k": 9,  # ATSS's candidates per level
    "num_convs": 6,  # DYHEAD.NUM_CONVS
    "gn_groups": 32,
    "fusion": True,  # deep fusion (GLIP-T(B)); False: GLIP-T(A)
    "fusion_dim": 2048, "fusion_heads": 8,  # the bi-attention's width and heads (MHA-B)
    "fusion_dropout": 0.1,  # on both of its attention maps while training (fuse_helper's)
    "text_heads": 8,  # the language layer's after each fusion (GLIP with a CLIP text tower: MODEL.CLIP.HEADS)
    "text_lr_mult": 0.1,  # the language tower's learning rate relative to the rest (1e-5 / 1e-4)
    "score_threshold": 0.05, "pre_nms": 1000, "nms": 0.6, "detections": 100,  # the ATSS post-processor's
}


def class_list(settings) -> tuple[str, ...]:
    return class_names(settings, "glip", "label order")


MASK_FILL = -9e15  # fuse_helper's additive mask of padding tokens


class BiAttention(nn.Module):
    """fuse_helper's BiMultiHeadAttention: image positions v [N, V, Dv] and tokens l [N, L, Dl] attend to each
    other through one matrix of scaled dot products in `dim` (heads split it) -> (delta_v, delta_l). Its linears
    start Xavier-uniform with zero biases; dropout on both attention maps while training."""

    dim: int
    heads: int
    dropout: float = 0.1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, v, lang, lang_mask, deterministic: bool = True):
        n, nv, dv = v.shape
        nl, dl = lang.shape[1], lang.shape[2]
        hd = self.dim // self.heads
        dense = lambda d, name: nn.Dense(d, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),  # noqa
                                         name=name)
        split = lambda x, length: x.reshape(n, length, self.heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
        q = split(dense(self.dim, "v_proj")(v) * hd ** -0.5, nv)
        k = split(dense(self.dim, "l_proj")(lang), nl)
        value_v = split(dense(self.dim, "values_v_proj")(v), nv)
        value_l = split(dense(self.dim, "values_l_proj")(lang), nl)
        w = jnp.clip(jnp.einsum("nhvd,nhld->nhvl", q, k).astype(jnp.float32), -LOGIT_CLAMP, LOGIT_CLAMP)
        w_l = jnp.swapaxes(w, -1, -2)
        w_l = jnp.clip(w_l - w_l.max(-1, keepdims=True), -LOGIT_CLAMP, LOGIT_CLAMP)
        p_l = jax.nn.softmax(w_l, -1)  # each token over the image positions
        p_v = jax.nn.softmax(w + jnp.where(lang_mask, 0.0, MASK_FILL)[:, None, None, :], -1)  # positions over tokens
        drop = nn.Dropout(self.dropout, deterministic=deterministic)
        out_v = jnp.einsum("nhvl,nhld->nvhd", drop(p_v).astype(self.dtype), value_l).reshape(n, nv, self.dim)
        out_l = jnp.einsum("nhlv,nhvd->nlhd", drop(p_l).astype(self.dtype), value_v).reshape(n, nl, self.dim)
        return dense(dv, "out_v_proj")(out_v), dense(dl, "out_l_proj")(out_l)


class FusionBlock(nn.Module):
    """fuse_helper's BiAttentionBlock: both inputs layer-normed, attended, and the deltas added to the normed
    inputs through layer scales (gamma_v, gamma_l)."""

    dim: int
    heads: int
    init_scale: float
    dtype: jnp.dtype = jnp.float32
    dropout: float = 0.1

    @nn.compact
    def __call__(self, v, lang, lang_mask, deterministic: bool = True):
        v = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="layer_norm_v")(v)
        lang = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="layer_norm_l")(lang)
        delta_v, delta_l = BiAttention(self.dim, self.heads, self.dropout, self.dtype, name="attn")(v, lang, lang_mask,
                                                                                           deterministic)
        gamma_v = self.param("gamma_v", nn.initializers.constant(self.init_scale), (v.shape[-1],))
        gamma_l = self.param("gamma_l", nn.initializers.constant(self.init_scale), (lang.shape[-1],))
        return v + gamma_v * delta_v, lang + gamma_l * delta_l


class LanguageLayer(nn.Module):
    """vldyhead's CLIPTransformerLayer: a pre-LayerNorm self-attention block (QuickGELU MLP of 4x) over the
    prompt's tokens, padding keys masked; after each fusion the language side's own layer."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        d = x.shape[-1]
        init = nn.initializers.truncated_normal(0.02)
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_1")(x)
        attention = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype, kernel_init=init,
                                                    name="attn")
        x = x + attention(h, h, mask=mask[:, None, None, :])
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_2")(x)
        h = nn.Dense(4 * d, dtype=self.dtype, kernel_init=init, name="c_fc")(h)
        h = h * jax.nn.sigmoid(1.702 * h)
        return x + nn.Dense(d, dtype=self.dtype, kernel_init=init, name="c_proj")(h)


class GroundingHead(nn.Module):
    """The tower and its outputs: levels [[N, h, w, C]], tokens [N, L, Dt], token_mask [N, L] -> (token logits
    [N, A, L], box deltas [N, A, 4], centerness logits [N, A]) with A the levels' positions, level by level,
    row-major. Each of num_convs layers: (deep fusion: the bi-attention over all levels' positions at once and
    the tokens, then the language layer) and a 3x3 conv, GroupNorm and ReLU shared over levels. Box and
    centerness from 1x1 convs (a learned scale per level on the box), the token logits from the alignment head
    on the final tokens."""

    num_convs: int
    width: int
    groups: int
    fusion: bool
    fusion_dim: int
    fusion_heads: int
    text_heads: int
    dtype: jnp.dtype = jnp.float32
    fusion_dropout: float = 0.1

    @nn.compact
    def __call__(self, levels, tokens, token_mask, deterministic: bool = True):
        n = tokens.shape[0]
        shapes = [x.shape[1:3] for x in levels]
        init = nn.initializers.normal(0.01)  # the head's conv init (bias 0)
        for i in range(self.num_convs):
            if self.fusion:
                flat = jnp.concatenate([x.reshape(n, -1, x.shape[-1]) for x in levels], 1)
                flat, tokens = FusionBlock(self.fusion_dim, self.fusion_heads, 1.0 / self.num_convs, self.dtype,
                                           self.fusion_dropout, name=f"fuse{i}")(flat, tokens, token_mask,
                                                                                 deterministic)
                tokens = LanguageLayer(self.text_heads, self.dtype, name=f"language{i}")(tokens, token_mask)
                cuts = np.cumsum([h * w for h, w in shapes])[:-1]
                levels = [x.reshape(n, h, w, -1) for x, (h, w) in zip(jnp.split(flat, cuts, 1), shapes)]
            conv = nn.Conv(self.width, (3, 3), dtype=self.dtype, kernel_init=init, name=f"conv{i}")
            norm = nn.GroupNorm(self.groups, dtype=self.dtype, name=f"norm{i}")
            levels = [nn.relu(norm(conv(x))) for x in levels]
        box = nn.Conv(4, (1, 1), dtype=self.dtype, kernel_init=init, name="bbox_pred")
        ctr = nn.Conv(1, (1, 1), dtype=self.dtype, kernel_init=init, name="centerness")
        deltas, centerness = [], []
        for level, x in enumerate(levels):
            scale = self.param(f"scale{level}", nn.initializers.ones, ())
            deltas.append((box(x) * scale).reshape(n, -1, 4))
            centerness.append(ctr(x).reshape(n, -1))
        visual = jnp.concatenate([x.reshape(n, -1, x.shape[-1]) for x in levels], 1)
        logits = atss.AlignmentHead(name="align")(visual, tokens.astype(jnp.float32), token_mask)
        return logits, jnp.concatenate(deltas, 1).astype(jnp.float32), jnp.concatenate(centerness, 1).astype(
            jnp.float32)


@METHODS.register("glip")
class GLIP(Method):
    """A one-stage detector on the image tower whose classes are the words of a prompt read by the text tower."""

    def __init__(self, config, model, mesh, **options):
        super().__init__(config, model, mesh, **options)
        self.check_config(config)
        s = config.glip
        v = model.config.vision
        if v.kind not in ("vit", "resnet", "swin"):
            raise ValueError(f"config.method='glip' puts its head on a ModifiedResNet's or Swin's stages or a ViT's "
                             f"patches; the image tower is {v.kind!r}: pick a ResNet, Swin or ViT preset")
        if model.config.text.kind not in ("clip", "bert"):
            raise ValueError(f"config.method='glip' reads the prompt's tokens through a CLIP or BERT text tower; the "
                             f"preset's is {model.config.text.kind!r}: pick a preset with one of those")
        if s.fusion and model.config.embed_dim % int(s.text_heads):
            raise ValueError(f"config.glip.text_heads={s.text_heads} must divide the prompt tokens' width, the "
                             f"model's embed_dim={model.config.embed_dim} (the language layer after each fusion): "
                             "pick a divisor, or set model_overrides.embed_dim")
        self.stages = v.kind in ("resnet", "swin")
        self.size = v.image_size
        self.classes = class_list(s)
        self.levels_used = tuple(int(x) for x in s.levels)
        self.length = min(int(s.query_length), model.config.text.context_length)
        novel = set(s.novel)
        self.novel_ids = tuple(i for i, c in enumerate(self.classes) if c in novel)
        dtype = model.dtype
        self.anchors = det.pyramid_anchors(self.size, self.levels_used, float(s.anchor_scale), (1.0,))
        self.level_sizes = tuple(det.level_size(self.size, lv) ** 2 for lv in self.levels_used)
        low = min(self.levels_used)
        self.fpn_inputs = tuple(range(low, 6))  # the stages C_low..C5 feed the FPN
        self.pyramid = None if self.stages else det.SimplePyramid(
            stride=v.patch_size, strides=tuple(2 ** lv for lv in self.fpn_inputs), width=int(s.fpn_width),
            dtype=dtype)
        self.fpn = det.FPN(width=int(s.fpn_width), extra=max(self.levels_used) - 5, extra_convs=True, dtype=dtype)
        self.head = GroundingHead(int(s.num_convs), int(s.fpn_width), int(s.gn_groups), bool(s.fusion),
                                  int(s.fusion_dim), int(s.fusion_heads), int(s.text_heads), dtype,
                                  float(s.fusion_dropout))

    # -- input --
    @property
    def batch_keys(self):
        return ("image", "boxes", "boxes/valid", "glip/tokens", "glip/positive")

    def inputs(self):
        s = self.config.glip
        if s.labels == "record":
            box_features, labels = ("objects/bbox", "objects/label"), (("labels", "record"),
                                                                       ("num_classes", len(self.classes)))
        else:
            box_features, labels = ("objects/bbox", "objects/shape", "objects/color"), (("labels", s.labels),)
        options = labels + (("max_objects", int(s.max_objects)),)
        # One op makes the boxes and their text (clip_jax.input.prompts): detection records drop the novel classes'
        # boxes, grounding records keep every box, so which boxes a record keeps depends on its drawn mode.
        boxes = BatchInput("boxes", "glip_text", box_features + ("caption", "objects/phrase_span"),
                           options + (("classes", self.classes), ("exclude", self.novel_ids),
                                      ("mode", s.prompts), ("grounding_fraction", float(s.grounding_fraction)),
                                      ("novel_records", str(s.novel_records)),
                                      ("negatives", int(s.negatives)), ("length", self.length)))
        return (BatchInput("image", "crop", ("image",), (("flip", True),)), boxes)

    def batch_shapes(self, n):
        s = self.config.glip
        dtype = {"uint8": jnp.uint8, "bfloat16": jnp.bfloat16}.get(self.config.data.image_dtype, jnp.float32)
        m = int(s.max_objects)
        return {"image": jax.ShapeDtypeStruct((n, self.size, self.size, 3), dtype),
                "boxes": jax.ShapeDtypeStruct((n, m, 4), jnp.float32),
                "boxes/valid": jax.ShapeDtypeStruct((n, m), jnp.bool_),
                "glip/tokens": jax.ShapeDtypeStruct((n, self.length), jnp.int32),
                "glip/positive": jax.ShapeDtypeStruct((n, m, self.length), jnp.bool_)}

    # -- variables --
    def init(self, rng):
        keys = jax.random.split(rng, 4)
        variables = dict(self.model.init(keys[0], *dummy_inputs(self.model)))
        towers = nn.meta.unbox(variables)
        zeros = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), t)  # noqa: E731
        head = {}
        maps = zeros(jax.eval_shape(lambda: self.backbone(towers, jnp.zeros((1, self.size, self.size, 3)))))
        if self.pyramid is not None:
            head["pyramid"] = self.pyramid.init(keys[1], maps[0])["params"]
            maps = zeros(jax.eval_shape(lambda: self.pyramid.apply({"params": head["pyramid"]}, maps[0])))
        head["fpn"] = self.fpn.init(keys[2], maps)["params"]
        levels = zeros(jax.eval_shape(lambda: self.fpn.apply({"params": head["fpn"]}, maps)))
        levels = levels[len(levels) - len(self.levels_used):]
        tokens = jnp.zeros((1, self.length), jnp.int32)
        lang = zeros(jax.eval_shape(lambda: self.language(towers, tokens)))
        head["head"] = self.head.init(keys[3], levels, lang, jnp.ones((1, self.length), bool))["params"]
        variables["params"] = {**variables["params"], HEAD: head}
        return variables

    def param_groups(self):
        # the image tower's pooling head is never run; the language tower learns at text_lr_mult
        return ((r"logit_scale|logit_bias|visual/(ln_post|proj|attn_pool|attnpool|head|norm)(/.*)?",
                 {"frozen": True}),
                (r"text/.*", {"lr_mult": float(self.config.glip.text_lr_mult)}))

    # -- the network --
    def backbone(self, variables, images):
        """The image tower's maps, shallow to deep: the stages C_low..C5 (ResNet: BatchNorm on its running
        statistics), or a ViT's last block as one patch map."""
        towers = towers_only(variables, HEAD)
        layers = tuple(i - 1 for i in self.fpn_inputs) if self.stages else (self.model.config.vision.layers,)
        return list(self.model.apply(towers, images, layers, method="encode_image_intermediates"))

    def language(self, variables, tokens):
        towers = towers_only(variables, HEAD)
        return self.model.apply(towers, tokens, method="encode_text_tokens")[0]

    def levels(self, variables, images):
        p = variables["params"][HEAD]
        maps = self.backbone(variables, images)
        if self.pyramid is not None:
            maps = self.pyramid.apply({"params": p["pyramid"]}, maps[0])
        out = self.fpn.apply({"params": p["fpn"]}, maps)
        return out[len(out) - len(self.levels_used):]

    def forward(self, variables, images, tokens, rng=None):
        """(token logits [N, A, L], box deltas [N, A, 4], centerness logits [N, A], token mask [N, L]); with rng
        the fusion's attention dropout is on (training)."""
        token_mask = self.token_mask(tokens)
        levels = self.levels(variables, images)
        lang = self.language(variables, tokens)
        logits, deltas, centerness = self.head.apply(
            {"params": variables["params"][HEAD]["head"]}, levels, lang, token_mask, rng is None,
            rngs=None if rng is None else {"dropout": rng})
        return logits, deltas, centerness, token_mask

    def token_mask(self, tokens):
        """The prompt's positions, its start and end tokens included (BERT's attention mask in the reference)."""
        positions = jnp.arange(tokens.shape[1])
        last = jnp.max(jnp.where(tokens != self.pad_id, positions, 0), axis=1)  # CLIP pads with 0 after its EOT
        return positions[None, :] <= last[:, None]

    @property
    def pad_id(self) -> int:
        return int(self.model.config.text.pad_id)

    def loss(self, params, model_state, batch, rng, train: bool = True):
        s = self.config.glip
        variables = {"params": params, **model_state}
        images = model_images(batch["image"])
        tokens = batch["glip/tokens"]
        positive = batch["glip/positive"].astype(bool)
        logits, deltas, centerness, token_mask = self.forward(variables, images, tokens, rng if train else None)
        gt = batch["boxes"].astype(jnp.float32)
        valid = batch["boxes/valid"] & positive.any(-1)  # a box without a token has nothing to align with
        targets = jax.vmap(lambda b, ok: atss.atss_assign(self.anchors, b, ok, self.level_sizes, int(s.top_k)))(
            gt, valid)
        labels = atss.token_targets(targets.matched, positive)
        parts = atss.atss_losses(logits, deltas, centerness, self.anchors, targets, labels, token_mask)
        loss = parts["token"] + parts["reg"] + parts["centerness"]
        metrics = {"token_loss": parts["token"], "reg_loss": parts["reg"], "centerness_loss": parts["centerness"],
                   "positive_anchors": (targets.matched >= 0).sum() / images.shape[0],
                   "boxes_aligned": valid.sum() / images.shape[0]}
        return loss, metrics, model_state

    # -- evaluation and export --
    def model_variables(self, params, model_state):
        return {"params": params, **model_state}

    def class_inputs(self, names):
        """The detection task's classes as GLIP reads them: the evaluation prompt (every name in order, ". "
        joined) as tokens [1, L] and each class's token weights [C, L] (the mean over its tokens), and its text."""
        from clip_jax import phrases
        from clip_jax.tokenizers import tokenizer_for

        tokenizer = tokenizer_for(self.model.config.text)
        text, spans = phrases.DetectionPrompts(names, tokenizer, self.length).evaluation()
        ids, offsets = phrases.query_tokens(tokenizer, text, self.length)
        return {"tokens": ids[None].astype(np.int32),
                "weights": phrases.class_token_weights(offsets, spans, self.length).astype(np.float32),
                "prompt": text}

    def detect(self, variables, images, classes, novel):
        """The 'detect' prediction: images [N, S, S, 3] x class_inputs' {tokens [1, L], weights [C, L]} ->
        {boxes [N, K, 4], scores, classes, valid [N, K]}, K = config.glip.detections."""
        del novel  # GLIP scores base and novel classes alike
        s = self.config.glip
        x = model_images(images)
        n = x.shape[0]
        tokens = jnp.broadcast_to(classes["tokens"], (n, classes["tokens"].shape[-1]))
        logits, deltas, centerness, _ = self.forward(variables, x, tokens)
        p_class = jax.nn.sigmoid(logits) @ classes["weights"].T  # [N, A, C]
        p_ctr = jax.nn.sigmoid(centerness)[..., None]
        scores = jnp.where(p_class > float(s.score_threshold), jnp.sqrt(p_class * p_ctr), -1.0)
        boxes = box_ops.clip_boxes(atss.decode(deltas, self.anchors[None]), self.size, self.size)
        k, c = int(s.detections), classes["weights"].shape[0]

        def one(boxes, scores):
            flat = scores.reshape(-1)
            best, where = jax.lax.top_k(flat, min(flat.shape[0], int(s.pre_nms)))
            anchor, cls = where // c, where % c
            keep, kept = box_ops.batched_nms(boxes[anchor], best, cls, best > 0, float(s.nms), k)
            safe = jnp.maximum(keep, 0)
            return {"boxes": jnp.where(kept[:, None], boxes[anchor][safe], 0.0),
                    "scores": jnp.where(kept, best[safe], 0.0),
                    "classes": jnp.where(kept, cls[safe], 0).astype(jnp.int32), "valid": kept}

        return jax.vmap(one)(boxes, scores)

    def ground(self, variables, images, tokens, phrases, phrase_valid):
        """The 'ground' prediction (clip_jax.evaluate.tasks.grounding): images [N, S, S, 3], tokens [N, L],
        phrases [N, P, L] bool -> {boxes [N, P, K, 4], scores [N, P, K]}: per phrase the K best boxes by the mean
        of its tokens' probabilities times centerness (square-rooted), through NMS."""
        s = self.config.glip
        x = model_images(images)
        logits, deltas, centerness, _ = self.forward(variables, x, tokens)
        weights = phrases.astype(jnp.float32)
        weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
        p_phrase = jnp.einsum("nal,npl->npa", jax.nn.sigmoid(logits), weights)
        scores = jnp.sqrt(p_phrase * jax.nn.sigmoid(centerness)[:, None, :])
        boxes = box_ops.clip_boxes(atss.decode(deltas, self.anchors[None]), self.size, self.size)
        k = 10

        def one(boxes, scores):
            def phrase(row):
                best, where = jax.lax.top_k(row, min(row.shape[0], int(s.pre_nms)))
                keep, kept = box_ops.batched_nms(boxes[where], best, jnp.zeros_like(where), best >= 0,
                                                 float(s.nms), k)
                safe = jnp.maximum(keep, 0)
                return jnp.where(kept[:, None], boxes[where][safe], 0.0), jnp.where(kept, best[safe], -1.0)

            return jax.vmap(phrase)(scores)

        out_boxes, out_scores = jax.vmap(one)(boxes, scores)
        return {"boxes": out_boxes, "scores": jnp.where(phrase_valid[..., None], out_scores, -1.0)}

    def predictions(self):
        """The two towers' predictions (without the detector), 'detect' and 'ground'."""
        towers = tower_predictions(super().predictions(), HEAD)
        ground = Prediction(self.ground, "image", 3)
        ground.query_length = self.length  # the grounding task tokenizes captions to the method's query length
        return {**towers, "detect": Prediction(self.detect, "image", 3, class_inputs=self.class_inputs),
                "ground": ground}

    def export(self, params, model_state, extras=False):
        """'towers': the CLIP model (open_clip's layout); 'glip': the detector's params, '/'-joined names."""
        return export_with_head(params, model_state, HEAD)

    # -- config --
    config_sections = {"glip": GLIP_DEFAULTS}
    config_ranges = {"glip.max_objects": (">=", 1), "glip.detections": (">=", 1), "glip.fpn_width": (">=", 1),
                     "glip.num_convs": (">=", 1), "glip.top_k": (">=", 1), "glip.query_length": (">=", 2),
                     "glip.negatives": (">=", 0), "glip.pre_nms": (">=", 1), "glip.text_lr_mult": (">=", 0)}

    @classmethod
    def train_flops(cls, forward, config=None):
        # the image tower forward and backward; the head is not counted: a lower bound
        return 3 * forward["image"]

    @classmethod
    def check_config(cls, config):
        s = config.glip
        classes = class_list(s)
        check_class_names(s, "glip", classes)
        if s.prompts not in ("detection", "grounding", "mix"):
            raise ValueError(f"config.glip.prompts={s.prompts!r}: pick 'detection', 'grounding' or 'mix'")
        if not 0.0 <= float(s.grounding_fraction) <= 1.0:
            raise ValueError(f"config.glip.grounding_fraction={s.grounding_fraction} must be in [0, 1]")
        levels = tuple(int(x) for x in s.levels)
        if not levels or list(levels) != list(range(levels[0], levels[0] + len(levels))) or not 2 <= levels[0] <= 5 \
                or levels[-1] < 5:
            raise ValueError(f"config.glip.levels={tuple(s.levels)} must be consecutive pyramid levels from 2..5 up "
                             "to at least 5 (GLIP: 3 to 7)")
        if int(s.fpn_width) % int(s.gn_groups):
            raise ValueError(f"config.glip.fpn_width={s.fpn_width} must be a multiple of gn_groups={s.gn_groups}")
        if not 0.0 <= float(s.fusion_dropout) < 1.0:
            raise ValueError(f"config.glip.fusion_dropout={s.fusion_dropout} is a rate: give one in [0, 1) "
                             "(GLIP's 0.1)")
        if s.fusion and (int(s.fusion_dim) % int(s.fusion_heads) or int(s.text_heads) < 1):
            raise ValueError(f"config.glip.fusion_dim={s.fusion_dim} must be a multiple of fusion_heads="
                             f"{s.fusion_heads}, and text_heads={s.text_heads} at least 1")
        if not 0.0 <= float(s.nms) <= 1.0:
            raise ValueError(f"config.glip.nms={s.nms} must be in [0, 1]")
        if math.isnan(float(s.score_threshold)):
            raise ValueError("config.glip.score_threshold is NaN")
