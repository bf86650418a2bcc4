"""ViLD (Gu et al. 2022, "Open-vocabulary Object Detection via Vision and Language Knowledge Distillation") as a
method of the one trainer.

A Faster R-CNN with FPN on the CLIP image tower (a ModifiedResNet's four stages, or a simple feature pyramid on
a ViT's last patch map; clip_jax.models.detector): an RPN, RoIAlign of each region on its pyramid level, and a
region head whose output is projected to the CLIP embedding space and L2-normalized. Facts from the reference
(tensorflow/tpu's projects/vild):

- ViLD-text: logits = T * cos(region, [background; base classes]) with T = 100; the classes are the frozen text
  tower's prompt-ensembled embeddings (computed once at the start, `vild/classifier`, never trained), background a
  trained vector (N(0, 0.01) at init, normalized). Softmax cross-entropy over the sampled regions.
- ViLD-image: for precomputed proposals (batch key `regions`) with the teacher's embeddings of their 1x and 1.5x
  crops (`regions/embeds`, `python -m clip_jax.embed regions`), the L1 distance of the normalized region embedding
  to the teacher's, averaged over valid regions, weighted by config.vild.distill_weight (0.5 for R50).
- ViLD-ensemble (config.vild.ensemble): a second region head and projection (the distillation branch) trained by
  ViLD-image only; at inference a class's score is the geometric mean p_text^(2/3) p_img^(1/3) for base classes and
  p_text^(1/3) p_img^(2/3) for novel ones. Without it, one head takes both losses and p_text scores.
- Class-agnostic box regression; the RPN and Fast R-CNN losses and samplers are Mask R-CNN's (RPN: 256 anchors per
  image, half foreground at IoU >= 0.7, background below 0.3, each true box's best anchors foreground too; RoIs:
  512 per image, a quarter foreground at IoU >= 0.5, the true boxes added to the proposals). Smooth L1 box losses
  (beta 1/9 for the RPN, 1 for the regions), each summed and divided by the sampled count (torchvision's rule).
  The mask head is left out: the evaluation here is of boxes.

Open vocabulary: training reads the boxes of the base classes only (the `boxes` op drops config.vild.novel's:
option exclude); at evaluation the `detection` task gives every class's text embedding to 'detect'.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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
from clip_jax.models import box_ops, dummy_inputs, l2_normalize
from clip_jax.models import detector as det
from clip_jax.preprocessing import model_images

HEAD = "vild"  # every detector param (and the frozen classifier) sits under this top-level name
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_WEIGHTS = box_ops.BOX_CODER_WEIGHTS

# config.vild (facts: ViLD's vild_resnet.yaml for R50 on LVIS at 1024 px).
VILD_DEFAULTS = {
    "classes": ("circle", "square", "triangle", "star", "cross", "diamond"),  # the boxes' label order
    "classes_file": "",  # a text file of class names, one a line in label order, in place of `classes`
    "labels": "shape",  # the boxes op's label set ('record': the records' objects/label)
    "novel": ("star", "cross"),  # never trained on: clip_jax.input.shapes.NOVEL_SHAPES
    "templates": ("a photo of a {}.",),  # the class texts, prompt-ensembled (mean of unit embeddings)
    "max_objects": 100,
    "fpn_width": 256,
    "anchor_scale": 8.0,  # an anchor of level l is anchor_scale * 2**l wide (32 px on P2)
    "aspect_ratios": (0.5, 1.0, 2.0),
    "rpn_batch": 256, "rpn_fg_fraction": 0.5, "rpn_fg_iou": 0.7, "rpn_bg_iou": 0.3,
    "rpn_pre_nms": 2000, "rpn_nms": 0.7, "rpn_post_nms": 1000,  # training's proposals per image
    "test_rpn_pre_nms": 1000, "test_rpn_post_nms": 1000,
    "roi_batch": 512, "roi_fg_fraction": 0.25, "roi_fg_iou": 0.5,
    "roi_size": 7, "canonical_size": 224.0, "canonical_level": 4,
    "head_convs": 4, "head_conv_dim": 256, "head_fcs": 2, "head_fc_dim": 1024,
    "temperature": 100.0,
    "distill_weight": 0.5,  # ViLD-image's weight; 0 trains ViLD-text alone (no regions read)
    "text_weight": 1.0,  # ViLD-text's weight; 0 trains ViLD-image alone (the paper's ablation; boxes still regress)
    "max_regions": 300,  # precomputed proposals per image (batch key `regions`)
    "ensemble": False,
    "base_weight": 2 / 3,  # the ensemble's exponent of p_text on base classes (1 - it on novel ones)
    "detections": 100, "nms": 0.5, "score_threshold": 0.0,
}
RPN_LEVELS = (2, 3, 4, 5, 6)  # P6 (P5 subsampled) for the RPN only
ROI_LEVELS = (2, 3, 4, 5)


def class_list(settings) -> tuple[str, ...]:
    """config.vild's class names: those of `classes_file` where set."""
    return class_names(settings, "vild", "label order")


def region_logits(embeds, class_embeds, background, temperature: float):
    """T * cos(region, [background; classes]): embeds [..., E] (unit), class_embeds [C, E] (unit), background [E]
    -> [..., 1 + C]."""
    table = jnp.concatenate([l2_normalize(background.astype(jnp.float32))[None], class_embeds.astype(jnp.float32)])
    return temperature * jnp.einsum("...e,ce->...c", embeds.astype(jnp.float32), table)


def ensemble_scores(p_text, p_img, novel, base_weight: float):
    """ViLD-ensemble's per-class score [..., C] from the two branches' foreground probabilities [..., C]:
    p_text^w p_img^(1-w) on base classes, p_text^(1-w) p_img^w on novel ones (w = base_weight, 2/3)."""
    w = jnp.where(novel, 1.0 - base_weight, base_weight)
    return jnp.power(p_text, w) * jnp.power(p_img, 1.0 - w)


def distill_l1(embeds, teacher, valid):
    """ViLD-image: the mean over valid regions of ||embeds - normalize(teacher)||_1 (embeds already unit)."""
    dist = jnp.abs(embeds.astype(jnp.float32) - l2_normalize(teacher.astype(jnp.float32))).sum(-1)
    return jnp.where(valid, dist, 0.0).sum() / jnp.maximum(valid.sum(), 1)


@METHODS.register("vild")
class ViLD(Method):
    """A two-stage detector on the image tower whose region embeddings are classified by the frozen text
    embeddings of the base classes (ViLD-text) and distilled from the teacher's crop embeddings (ViLD-image)."""

    def __init__(self, config, model, mesh, **options):
        super().__init__(config, model, mesh, **options)
        self.check_config(config)
        s = config.vild
        v = model.config.vision
        if v.kind not in ("vit", "resnet"):
            raise ValueError(f"config.method='vild' puts a detector on a ModifiedResNet's stages or a ViT's patches; "
                             f"the image tower is {v.kind!r}: pick a ResNet or ViT preset")
        self.cnn = v.is_resnet
        self.size = v.image_size
        self.classes = class_list(s)
        novel = set(s.novel)
        self.base = np.array([i for i, c in enumerate(self.classes) if c not in novel], np.int32)
        self.novel_ids = tuple(i for i, c in enumerate(self.classes) if c in novel)
        table = np.zeros(len(self.classes), np.int32)  # a label -> 1 + its index among the base classes
        table[self.base] = np.arange(1, len(self.base) + 1)
        self.label_table = table
        from clip_jax.tokenizers import tokenizer_for

        texts = [t.format(self.classes[i]) for i in self.base for t in s.templates]
        self.tokens = np.asarray(tokenizer_for(model.config.text)(texts, model.config.text.context_length))
        dtype = model.dtype
        self.anchors = det.pyramid_anchors(self.size, RPN_LEVELS, float(s.anchor_scale), tuple(s.aspect_ratios))
        self.pyramid = None if self.cnn else det.SimplePyramid(stride=v.patch_size, width=int(s.fpn_width),
                                                               dtype=dtype)
        self.fpn = det.FPN(width=int(s.fpn_width), extra=len(RPN_LEVELS) - len(ROI_LEVELS), dtype=dtype)
        self.rpn = det.RPNHead(anchors_per_cell=len(s.aspect_ratios), width=int(s.fpn_width), dtype=dtype)
        self.head = det.BoxHead(int(s.head_convs), int(s.head_conv_dim), int(s.head_fcs), int(s.head_fc_dim), dtype)
        self.project = nn.Dense(model.config.embed_dim, dtype=dtype)
        self.box = nn.Dense(4, dtype=dtype, kernel_init=nn.initializers.normal(0.001))
        self.distill = float(s.distill_weight) > 0

    # -- input --
    @property
    def batch_keys(self):
        keys = ("image", "boxes", "boxes/labels", "boxes/valid")
        return keys + (("regions", "regions/embeds", "regions/valid") if self.distill else ())

    def inputs(self):
        s = self.config.vild
        if s.labels == "record":
            boxes = BatchInput("boxes", "boxes", ("objects/bbox", "objects/label"),
                               (("labels", "record"), ("num_classes", len(self.classes)),
                                ("max_objects", int(s.max_objects)), ("exclude", self.novel_ids)))
        else:
            boxes = BatchInput("boxes", "boxes", ("objects/bbox", "objects/shape", "objects/color"),
                               (("labels", s.labels), ("max_objects", int(s.max_objects)),
                                ("exclude", self.novel_ids)))
        keys = (BatchInput("image", "crop", ("image",), (("flip", True),)), boxes)  # ViLD's horizontal flips
        if self.distill:
            keys += (BatchInput("regions", "regions", ("regions/bbox", "regions/embeds"),
                                (("max_regions", int(s.max_regions)), ("embed_dim", self.model.config.embed_dim))),)
        return keys

    def batch_shapes(self, n):
        s = self.config.vild
        dtype = {"uint8": jnp.uint8, "bfloat16": jnp.bfloat16}.get(self.config.data.image_dtype, jnp.float32)
        m, p, e = int(s.max_objects), int(s.max_regions), self.model.config.embed_dim
        shapes = {"image": jax.ShapeDtypeStruct((n, self.size, self.size, 3), dtype),
                  "boxes": jax.ShapeDtypeStruct((n, m, 4), jnp.float32),
                  "boxes/labels": jax.ShapeDtypeStruct((n, m), jnp.int32),
                  "boxes/valid": jax.ShapeDtypeStruct((n, m), jnp.bool_)}
        if self.distill:
            shapes.update({"regions": jax.ShapeDtypeStruct((n, p, 4), jnp.float32),
                           "regions/embeds": jax.ShapeDtypeStruct((n, p, e), jnp.float32),
                           "regions/valid": jax.ShapeDtypeStruct((n, p), jnp.bool_)})
        return shapes

    # -- variables --
    def init(self, rng):
        keys = jax.random.split(rng, 8)
        variables = dict(self.model.init(keys[0], *dummy_inputs(self.model)))
        s = self.config.vild
        e = self.model.config.embed_dim
        towers = nn.meta.unbox(variables)
        feats = jax.eval_shape(lambda: self.backbone(towers, jnp.zeros((1, self.size, self.size, 3))))
        zeros = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), t)  # noqa: E731
        head = {}
        maps = zeros(feats)
        if self.pyramid is not None:
            head["pyramid"] = self.pyramid.init(keys[1], maps[0])["params"]
            maps = zeros(jax.eval_shape(lambda: self.pyramid.apply({"params": head["pyramid"]}, maps[0])))
        head["fpn"] = self.fpn.init(keys[2], maps)["params"]
        levels = zeros(jax.eval_shape(lambda: self.fpn.apply({"params": head["fpn"]}, maps)))
        head["rpn"] = self.rpn.init(keys[3], levels)["params"]
        region = jnp.zeros((1, int(s.roi_size), int(s.roi_size), int(s.fpn_width)))
        feature = jnp.zeros((1, int(s.head_fc_dim)))
        branches = ("text", "image") if s.ensemble else ("text",)
        for i, branch in enumerate(branches):
            head[f"{branch}_head"] = self.head.init(jax.random.fold_in(keys[4], i), region)["params"]
            head[f"{branch}_project"] = self.project.init(jax.random.fold_in(keys[5], i), feature)["params"]
        head["box"] = self.box.init(keys[6], feature)["params"]
        head["background"] = 0.01 * jax.random.normal(keys[7], (e,), jnp.float32)  # ViLD's N(0, 0.01) init
        head["classifier"] = jnp.zeros((len(self.base), e), jnp.float32)  # start_variables fills it
        variables["params"] = {**variables["params"], HEAD: head}
        return variables

    def start_variables(self, variables):
        """The frozen classifier: the text tower's prompt-ensembled unit embeddings of the base classes."""
        params = dict(variables["params"])
        head = dict(params[HEAD])
        head["classifier"] = self.text_classifier({"params": params}, self.tokens, len(self.base))
        params[HEAD] = head
        return {**variables, "params": params}

    def text_classifier(self, variables, tokens, classes: int):
        towers = {k: v for k, v in variables["params"].items() if k != HEAD}
        text = self.model.apply({"params": towers}, jnp.asarray(tokens), method="encode_text")
        return l2_normalize(text.reshape(classes, -1, text.shape[-1]).astype(jnp.float32).mean(1))

    def param_groups(self):
        # the text tower only gave the classifier; the image tower's pooling head is never run
        return ((rf"text/.*|logit_scale|logit_bias|{HEAD}/classifier", {"frozen": True}),
                (r"visual/(ln_post|proj|attn_pool|attnpool)(/.*)?", {"frozen": True}))

    # -- the network --
    def backbone(self, variables, images):
        """The image tower's maps, shallow to deep: a ResNet's 4 stages (BatchNorm on its running statistics), or a
        ViT's last block as one patch map."""
        towers = towers_only(variables, HEAD)
        layers = (1, 2, 3, 4) if self.cnn else (self.model.config.vision.layers,)
        return list(self.model.apply(towers, images, layers, method="encode_image_intermediates"))

    def levels(self, variables, images):
        """The FPN levels P2..P6 of a batch of images."""
        p = variables["params"][HEAD]
        maps = self.backbone(variables, images)
        if self.pyramid is not None:
            maps = self.pyramid.apply({"params": p["pyramid"]}, maps[0])
        return self.fpn.apply({"params": p["fpn"]}, maps)

    def proposals(self, logits, deltas, pre: int, post: int):
        """Per image (boxes [post, 4], scores, valid) from the RPN's outputs, no gradient through them."""
        s = self.config.vild
        logits, deltas = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas)
        boxes = box_ops.clip_boxes(box_ops.decode_boxes(deltas, self.anchors[None], RPN_WEIGHTS), self.size, self.size)
        valid = box_ops.remove_small_boxes(boxes, 1e-3)

        def one(b, sc, ok):
            return box_ops.select_proposals(b, sc, ok, pre, float(s.rpn_nms), post)[:3]

        return jax.vmap(one)(boxes, logits, valid)

    def region_features(self, variables, levels, boxes, branch: str):
        """(unit region embeddings [N, R, E], head features [N, R, fc]) of boxes [N, R, 4] through one branch."""
        s = self.config.vild
        p = variables["params"][HEAD]
        n, r = boxes.shape[:2]

        def pool(maps, image_boxes):  # per image: its gathers keep the batch axis, which the mesh shards
            return det.multilevel_roi_align([m[None] for m in maps], ROI_LEVELS, image_boxes,
                                            jnp.zeros((r,), jnp.int32), int(s.roi_size), float(s.canonical_size),
                                            int(s.canonical_level))

        pooled = jax.vmap(pool)(levels[:len(ROI_LEVELS)], boxes).reshape(n * r, *([int(s.roi_size)] * 2), -1)
        h = self.head.apply({"params": p[f"{branch}_head"]}, pooled.astype(self.model.dtype))
        embeds = l2_normalize(self.project.apply({"params": p[f"{branch}_project"]}, h).astype(jnp.float32))
        return embeds.reshape(n, r, -1), h.reshape(n, r, -1)

    def loss(self, params, model_state, batch, rng, train: bool = True):
        s = self.config.vild
        variables = {"params": params, **model_state}
        head = params[HEAD]
        images = model_images(batch["image"])
        n = images.shape[0]
        gt, gt_valid = batch["boxes"].astype(jnp.float32), batch["boxes/valid"]
        labels = batch["boxes/labels"]
        # a label of a class the classifier lacks (a novel one, past the list) is left out of the truth
        known = (labels >= 0) & (labels < len(self.classes))
        gt_class = jnp.asarray(self.label_table)[jnp.clip(labels, 0, len(self.classes) - 1)]
        gt_valid = gt_valid & known & (gt_class > 0)
        levels = self.levels(variables, images)
        rpn_logits, rpn_deltas = self.rpn.apply({"params": head["rpn"]}, levels)
        rpn_rng, roi_rng = jax.random.split(rng)

        # RPN: matched and sampled anchors
        def rpn_targets(key, boxes, valid):
            index, label = det.match(self.anchors, boxes, valid, float(s.rpn_fg_iou), float(s.rpn_bg_iou),
                                     low_quality=True)
            pick, ok = det.sample(key, label, int(s.rpn_batch), float(s.rpn_fg_fraction))
            target = box_ops.encode_boxes(boxes[index[pick]], self.anchors[pick], RPN_WEIGHTS)
            return pick, ok, (label[pick] == 1) & ok, target

        pick, ok, fg, target = jax.vmap(rpn_targets)(jax.random.split(rpn_rng, n), gt, gt_valid)
        logit = jnp.take_along_axis(rpn_logits, pick, 1)
        sampled = jnp.maximum(ok.sum(), 1)
        rpn_cls = jnp.where(ok, optax.sigmoid_binary_cross_entropy(logit, fg.astype(jnp.float32)), 0.0).sum() / sampled
        delta = jnp.take_along_axis(rpn_deltas, pick[..., None], 1)
        rpn_box = jnp.where(fg[..., None], det.smooth_l1(delta - target, 1 / 9), 0.0).sum() / sampled

        # Fast R-CNN: proposals and the true boxes, matched and sampled
        boxes, _, valid = self.proposals(rpn_logits, rpn_deltas, int(s.rpn_pre_nms), int(s.rpn_post_nms))
        candidates = jnp.concatenate([boxes, gt], 1)
        cand_valid = jnp.concatenate([valid, gt_valid], 1)

        def roi_targets(key, cands, cvalid, boxes, bvalid, classes):
            index, label = det.match(cands, boxes, bvalid, float(s.roi_fg_iou), float(s.roi_fg_iou))
            label = jnp.where(cvalid, label, det.IGNORE)
            pick, ok = det.sample(key, label, int(s.roi_batch), float(s.roi_fg_fraction))
            cls = jnp.where(label[pick] == 1, classes[index[pick]], 0)
            target = box_ops.encode_boxes(boxes[index[pick]], cands[pick], ROI_WEIGHTS)
            return cands[pick], ok, jnp.where(ok, cls, -1), target

        rois, roi_ok, roi_cls, roi_target = jax.vmap(roi_targets)(jax.random.split(roi_rng, n), candidates,
                                                                  cand_valid, gt, gt_valid, gt_class)
        embeds, features = self.region_features(variables, levels, jax.lax.stop_gradient(rois), "text")
        logits = region_logits(embeds, head["classifier"], head["background"], float(s.temperature))
        logp = jax.nn.log_softmax(logits, -1)
        safe = jnp.maximum(roi_cls, 0)
        count = jnp.maximum(roi_ok.sum(), 1)
        text_loss = -jnp.where(roi_ok, jnp.take_along_axis(logp, safe[..., None], -1)[..., 0], 0.0).sum() / count
        deltas = self.box.apply({"params": head["box"]}, features).astype(jnp.float32)
        roi_fg = roi_ok & (roi_cls > 0)
        box_loss = jnp.where(roi_fg[..., None], det.smooth_l1(deltas - roi_target, 1.0), 0.0).sum() / count
        accuracy = jnp.where(roi_ok, jnp.argmax(logits, -1) == safe, False).sum() / count

        loss = rpn_cls + rpn_box + float(s.text_weight) * text_loss + box_loss
        metrics = {"rpn_cls": rpn_cls, "rpn_box": rpn_box, "text_loss": text_loss, "box_loss": box_loss,
                   "region_acc": accuracy, "fg_regions": roi_fg.sum() / n, "rpn_fg": fg.sum() / n}
        if self.distill:
            branch = "image" if s.ensemble else "text"
            region_embeds, _ = self.region_features(variables, levels, batch["regions"].astype(jnp.float32), branch)
            image_loss = distill_l1(region_embeds, batch["regions/embeds"], batch["regions/valid"])
            loss = loss + float(s.distill_weight) * image_loss
            metrics["image_loss"] = image_loss
        return loss, metrics, model_state

    # -- evaluation and export --
    def model_variables(self, params, model_state):
        return {"params": params, **model_state}  # the detector is part of the model: evaluation runs it

    def detect(self, variables, images, class_embeds, novel):
        """The 'detect' prediction (clip_jax.evaluate.tasks.detection): images [N, S, S, 3] x class_embeds [C, E] ->
        {boxes [N, K, 4], scores [N, K], classes [N, K], valid [N, K]} with K = config.vild.detections."""
        s = self.config.vild
        head = variables["params"][HEAD]
        x = model_images(images)
        levels = self.levels(variables, x)
        logits, deltas = self.rpn.apply({"params": head["rpn"]}, levels)
        rois, _, roi_valid = self.proposals(logits, deltas, int(s.test_rpn_pre_nms), int(s.test_rpn_post_nms))
        embeds, features = self.region_features(variables, levels, rois, "text")
        class_embeds = class_embeds.astype(jnp.float32)
        p_text = jax.nn.softmax(region_logits(embeds, class_embeds, head["background"], float(s.temperature)))[..., 1:]
        scores = p_text
        if s.ensemble:
            image_embeds, _ = self.region_features(variables, levels, rois, "image")
            p_img = jax.nn.softmax(region_logits(image_embeds, class_embeds, head["background"],
                                                 float(s.temperature)))[..., 1:]
            scores = ensemble_scores(p_text, p_img, novel, float(s.base_weight))
        deltas = self.box.apply({"params": head["box"]}, features).astype(jnp.float32)
        boxes = box_ops.clip_boxes(box_ops.decode_boxes(deltas, rois, ROI_WEIGHTS), self.size, self.size)
        k = int(s.detections)
        c = class_embeds.shape[0]

        def one(boxes, scores, valid):
            # every (region, class) pair, the best k * 4 of them through per-class NMS, k kept
            flat = jnp.where(valid[:, None], scores, -1.0).reshape(-1)
            top = min(flat.shape[0], 4 * k)
            best, where = jax.lax.top_k(flat, top)
            region, cls = where // c, where % c
            ok = (best > float(s.score_threshold)) & (best >= 0)
            keep, kept = box_ops.batched_nms(boxes[region], best, cls, ok, float(s.nms), k)
            safe = jnp.maximum(keep, 0)
            return {"boxes": jnp.where(kept[:, None], boxes[region][safe], 0.0),
                    "scores": jnp.where(kept, best[safe], 0.0),
                    "classes": jnp.where(kept, cls[safe], 0).astype(jnp.int32), "valid": kept}

        return jax.vmap(one)(boxes, scores, roi_valid)

    def region_proposals(self, variables, images):
        """The 'proposals' prediction: images -> {boxes [N, P, 4], scores [N, P], valid [N, P]} (the RPN's, at
        its test settings), in the model input's pixels."""
        s = self.config.vild
        head = variables["params"][HEAD]
        levels = self.levels(variables, model_images(images))
        logits, deltas = self.rpn.apply({"params": head["rpn"]}, levels)
        boxes, scores, valid = self.proposals(logits, deltas, int(s.test_rpn_pre_nms), int(s.test_rpn_post_nms))
        return {"boxes": boxes, "scores": jax.nn.sigmoid(scores), "valid": valid}

    def predictions(self):
        """The two towers' predictions (without the detector), 'detect' and 'proposals'."""
        towers = tower_predictions(super().predictions(), HEAD)
        return {**towers, "detect": Prediction(self.detect, "image", 3, templates=tuple(self.config.vild.templates)),
                "proposals": Prediction(self.region_proposals, "image", 3)}

    def export(self, params, model_state, extras=False):
        """'towers': the CLIP model (open_clip's layout); 'vild': the detector's params, '/'-joined names."""
        return export_with_head(params, model_state, HEAD)

    # -- config --
    config_sections = {"vild": VILD_DEFAULTS}
    config_ranges = {"vild.temperature": (">", 0), "vild.distill_weight": (">=", 0),
                     "vild.text_weight": (">=", 0), "vild.rpn_batch": (">=", 1),
                     "vild.roi_batch": (">=", 1), "vild.max_regions": (">=", 1), "vild.detections": (">=", 1),
                     "vild.fpn_width": (">=", 1), "vild.roi_size": (">=", 1), "vild.max_objects": (">=", 1)}

    @classmethod
    def train_flops(cls, forward, config=None):
        # the image tower forward and backward; the detector's heads are not counted: a lower bound
        return 3 * forward["image"]

    @classmethod
    def check_config(cls, config):
        s = config.vild
        classes = class_list(s)
        check_class_names(s, "vild", classes)
        if len(classes) - len(set(s.novel)) < 1:
            raise ValueError(f"config.vild.novel={tuple(s.novel)} leaves no base class to train on")
        if not s.templates or any("{}" not in t for t in s.templates):
            raise ValueError(f"config.vild.templates={tuple(s.templates)}: each template needs a '{{}}' for the "
                             "class name")
        for name in ("rpn_fg_fraction", "roi_fg_fraction", "rpn_fg_iou", "rpn_bg_iou", "roi_fg_iou", "rpn_nms",
                     "nms", "base_weight"):
            if not 0.0 <= float(s[name]) <= 1.0:
                raise ValueError(f"config.vild.{name}={s[name]} must be in [0, 1]")
        if float(s.text_weight) == 0 and float(s.distill_weight) == 0:
            raise ValueError("config.vild.text_weight=0 and distill_weight=0 train no region classifier; set one "
                             "above 0 (text_weight=1 for ViLD-text, distill_weight=0.5 for ViLD-image)")
        if float(s.rpn_bg_iou) > float(s.rpn_fg_iou):
            raise ValueError(f"config.vild.rpn_bg_iou={s.rpn_bg_iou} is above rpn_fg_iou={s.rpn_fg_iou}")
