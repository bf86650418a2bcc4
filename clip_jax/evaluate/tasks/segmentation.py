"""segmentation=DATA: open-vocabulary semantic segmentation of a split's images against prompt-ensembled
class embeddings, scored by mmsegmentation's mIoU (clip_jax.evaluate.segmentation_metrics).

Options: labels=shape|color|combo (the mask's label set, feature 'mask_png/LABELS'; default shape) or
labels=record with classes=FILE.json (the record's own class ids 1..K, its names in that order);
background=threshold (default; MaskCLIP's head with bg_thresh: a pixel is background where the highest
softmax probability over the classes, at the model's logit scale, is below bg_thresh, default 0.5) or
background=prompt (background is one more class, "background" embedded with the templates) or
background=model (the method's segmenter scores background itself, as LSeg with a learned background embedding);
form=maskclip|patch (the dense features of a CLIP model; default the method's own segmenter, MaskCLIP's for
CLIP); window=resize|slide and stride= for images larger than the model's (GroupViT's sliding window);
predictions=DIR writes DIR/segmentation/DATASET.SPLIT/KEY.png (8-bit class indices at the record's image
resolution, 0 = background), classes.json and a picture of the first images with true and predicted masks
(picture.png).

The segmenter is the method's prediction 'segment_logits', fn(variables, images, class_embeds [C, E]) ->
logits [N, h, w, C] (clip_jax.methods.base.two_tower_predictions: MaskCLIP's cosine of the value-path
features), run on the whole record image resized to the model's size ('image/whole'); its logits are
upsampled bilinearly to each record's own mask size, where the metric counts them (mmseg's and GroupViT's
evaluation against the original masks). Metrics: segmentation/DATASET.SPLIT/{miou, pixel_acc,
iou/CLASS}; details: per-class IoU (None where a class is absent from truth and prediction)."""

from __future__ import annotations

import io
import json
import os
from typing import Callable, Optional

import numpy as np

from clip_jax.evaluate.segmentation_metrics import IGNORE_INDEX, ConfusionMatrix, scores
from clip_jax.evaluate.tasks.base import TASKS, Read, Task

LABEL_SETS = ("shape", "color", "combo", "record")
BACKGROUND_RULES = ("threshold", "prompt", "model")
WINDOWS = ("resize", "slide")
DEFAULT_BG_THRESH = 0.5
BATCH = 64  # images per segmenter call (rounded to the mesh)


def _plain_classes(labels: str):
    """(names with 'background' first, prompts [class][k] of the foreground classes) of a built-in label set."""
    from clip_jax.input import segmentation

    return segmentation.class_names(labels), segmentation.class_prompts(labels)


@TASKS.register("segmentation")
class Segmentation(Task):
    options = frozenset({"limit", "labels", "classes", "background", "bg_thresh", "form", "window", "stride",
                         "predictions"})
    predictions = ("segment_logits", "text_embeds")

    def __init__(self, spec, data_config, log=print):
        super().__init__(spec, data_config, log)
        self.labels = spec.get("labels", "shape")
        if self.labels not in LABEL_SETS:
            raise ValueError(f"{spec}: labels={self.labels!r} is not one of {LABEL_SETS}")
        if self.labels == "record" and not spec.get("classes"):
            raise ValueError(f"{spec}: labels=record reads the record's own class ids: pass classes=FILE.json naming "
                             "classes 1..K in id order (0 is background)")
        self.background = spec.get("background", "threshold")
        if self.background not in BACKGROUND_RULES:
            raise ValueError(f"{spec}: background={self.background!r} is not one of {BACKGROUND_RULES}")
        self.bg_thresh = float(spec.get("bg_thresh", DEFAULT_BG_THRESH))
        if not 0.0 <= self.bg_thresh <= 1.0:
            raise ValueError(f"{spec}: bg_thresh={self.bg_thresh} must be a probability in [0, 1]")
        self.form = spec.get("form")
        if self.form not in (None, "maskclip", "patch"):
            raise ValueError(f"{spec}: form={self.form!r} is not 'maskclip' or 'patch'")
        self.window = spec.get("window", "resize")
        if self.window not in WINDOWS:
            raise ValueError(f"{spec}: window={self.window!r} is not one of {WINDOWS}")
        self.stride = int(spec["stride"]) if spec.get("stride") else None
        self.names, self.prompts = None, None

    @property
    def mask_feature(self) -> str:
        return f"mask_png/{self.labels}"  # at the record's own resolution (clip_jax.input.segmentation)

    def reads(self):
        from clip_jax.input.features import FEATURES

        extra = ("key",) if "key" in FEATURES else ()  # names the predictions' files where records carry one
        # image_embeds: a prediction every method offers (the pass needs one); the segmenter runs in evaluate on
        # the whole image at the model's size
        return {"data": Read(self.spec.data, self.limit, predictions=("image_embeds",),
                             features=("image/whole", self.mask_feature) + extra)}

    def prepare(self, infos):
        super().prepare(infos)
        if self.labels == "record":
            from clip_jax.input import catalog

            classes = catalog.from_file(self.spec.get("classes"))
            self.names, self.prompts = ["background"] + list(classes.names), list(classes.prompts)
        else:
            self.names, self.prompts = _plain_classes(self.labels)

    # -- running -------------------------------------------------------------------------------------
    def class_embeds(self, encoder) -> np.ndarray:
        """Unit rows [C, E]: the foreground classes', with background's first under background=prompt."""
        from clip_jax.evaluate import zero_shot

        segmenter = encoder.predictions.get("segment_logits")
        if self.background == "model" and (self.form is not None or not getattr(segmenter, "background", False)):
            raise ValueError(f"{self.spec}: background=model needs a segmenter that scores background itself (LSeg "
                             "with config.lseg.background='learned'); this one does not: use background=prompt or "
                             "threshold")
        own = self.form is None and getattr(segmenter, "templates", None)
        if own:  # the method's own class texts (LSeg: the bare names)
            names = self.names if self.background == "prompt" else self.names[1:]
            return zero_shot.classifier_weights(encoder.model, None, [[t.format(n) for t in own] for n in names],
                                                embed_texts=encoder.embed_texts)
        prompts = self.prompts
        if self.background == "prompt":  # the first class's templates, with "background" for its name
            templates = [p.replace(self.names[1], "{}", 1) for p in prompts[0] if self.names[1] in p]
            prompts = [[t.format("background") for t in templates or ["a photo of a {}."]]] + prompts
        return zero_shot.classifier_weights(encoder.model, None, prompts, embed_texts=encoder.embed_texts)

    def segmenter(self, encoder) -> Callable:
        """fn(variables, images, class_embeds) -> logits [N, h, w, C]: the method's, or by form= the cosine of a
        CLIP model's dense features at its logit scale."""
        if self.form is None:
            return encoder.predictions["segment_logits"].fn
        name = "image_dense" if self.form == "maskclip" else "image_dense_patch"
        encoder.require((name, "logit_scale"), str(self.spec))
        dense, scale = encoder.predictions[name].fn, encoder.predictions["logit_scale"].fn

        def fn(variables, images, class_embeds):
            import jax.numpy as jnp

            from clip_jax.models.clip import l2_normalize

            return scale(variables) * jnp.einsum("nhwe,ce->nhwc", l2_normalize(dense(variables, images)),
                                                 class_embeds)

        return fn

    def evaluate(self, features, encoder):
        info, feats = self.infos["data"], features["data"]
        images, masks = feats["image/whole"], decode_masks(feats[self.mask_feature])
        if len(masks) != len(images):
            raise ValueError(f"{self.spec}: {len(masks)} masks {self.mask_feature!r} for {len(images)} images")
        for row, mask in enumerate(masks):
            bad = (mask != IGNORE_INDEX) & (mask >= len(self.names))
            if mask.ndim != 2 or bad.any():
                key = feats["key"][row] if "key" in feats else row
                what = (f"holds class id {int(mask[bad].max())}, outside the {len(self.names)} classes {self.names}: "
                        "pick the label set (labels=) or the classes file (classes=) the masks were made with"
                        if mask.ndim == 2 else f"is {mask.shape}, not [H, W] class ids")
                raise ValueError(f"{self.spec}: the mask of example {key!r} {what}")
        classes = self.class_embeds(encoder)
        size = encoder.model.config.vision.image_size
        run = SegmenterRun(encoder, self.segmenter(encoder), len(self.names), self.background, self.bg_thresh,
                           size, self.window, self.stride)
        keep = bool(self.spec.get("predictions"))
        confusion, predicted = run(images, masks, classes, keep_rows=len(images) if keep else 8)
        result = scores(confusion, self.names)
        name = self.named(info.name)
        metrics = {f"segmentation/{name}/miou": result["miou"], f"segmentation/{name}/pixel_acc": result["pixel_acc"]}
        for cls, iou in result["iou_by_name"].items():
            if not np.isnan(iou):  # a class absent from truth and prediction has no IoU
                metrics[f"segmentation/{name}/iou/{cls}"] = iou
        details = {"examples": int(len(images)), "classes": self.names,
                   "iou": {c: (None if np.isnan(v) else v) for c, v in result["iou_by_name"].items()},
                   "background": self.background if self.background != "threshold" else f"threshold {self.bg_thresh}"}
        if keep:
            import jax

            if jax.process_index() == 0:
                out = os.path.join(self.spec.get("predictions"), "segmentation", name)
                write_predictions(out, predicted, feats.get("key"), self.names)
                picture(os.path.join(out, "picture.png"), images[:8], masks[:8], predicted[:8], self.names)
                details["predictions"] = out
        return metrics, details


def decode_masks(values) -> list:
    """uint8 [H, W] class ids per example: 8-bit PNGs decoded (mask_png/LABELS), arrays as they are."""
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(v))) if isinstance(v, bytes) else np.asarray(v) for v in values]


class SegmenterRun:
    """A segmenter over host images and masks: the logits of rows split over the encoder's mesh (at the
    segmenter's output size, or the image's under window=slide), then on the host, image by image, upsampled
    bilinearly to that image's mask (the record's resolution, whatever the model's), reduced to class ids and
    counted in one confusion matrix."""

    def __init__(self, encoder, segment: Callable, num_classes: int, background: str, bg_thresh: float,
                 size: int, window: str = "resize", stride: Optional[int] = None):
        import jax

        self.encoder, self.size, self.num_classes = encoder, size, num_classes
        self.background, self.bg_thresh = background, bg_thresh
        self.window, self.stride = window, stride or max(1, size // 2)
        self.replicated = jax.sharding.NamedSharding(encoder.mesh, jax.sharding.PartitionSpec())
        self._step = jax.jit(lambda variables, images, class_embeds: self._logits(segment, variables, images,
                                                                                  class_embeds),
                             out_shardings=encoder.sharding)

    def _logits(self, segment, variables, images, class_embeds):
        """float32 [n, h, w, C]: the segmenter's output on the image at the model's size (larger ones resized to
        it, window=resize), or at the image's size from model-size windows every `stride` pixels whose logits
        are averaged where they overlap (window=slide, mmseg's slide inference)."""
        import jax
        import jax.numpy as jnp

        from clip_jax.preprocessing import model_images

        images = model_images(images)
        n, height, width = images.shape[:3]
        s = self.size
        if (height, width) == (s, s) or self.window == "resize":
            if (height, width) != (s, s):
                images = jax.image.resize(images, (n, s, s, images.shape[-1]), "bilinear")
            return segment(variables, images, class_embeds).astype(jnp.float32)
        if height < s or width < s:
            raise ValueError(f"window=slide needs images of at least the model's {s}x{s}; got {height}x{width}")
        total = jnp.zeros((n, height, width, class_embeds.shape[0]), jnp.float32)
        count = jnp.zeros((1, height, width, 1), jnp.float32)
        for top in window_starts(height, s, self.stride):
            for left in window_starts(width, s, self.stride):
                crop = images[:, top : top + s, left : left + s]
                logits = segment(variables, crop, class_embeds).astype(jnp.float32)
                total = total.at[:, top : top + s, left : left + s].add(
                    jax.image.resize(logits, (n, s, s, logits.shape[-1]), "bilinear"))
                count = count.at[:, top : top + s, left : left + s].add(1.0)
        return total / count

    def __call__(self, images: np.ndarray, masks, class_embeds: np.ndarray, keep_rows: int = 0):
        """(confusion [C, C] int64 over every row, the predicted class ids uint8 [H, W] of the first `keep_rows`
        rows, each at its mask's size). masks: one [H, W] map per image, of any size."""
        import jax

        from clip_jax.evaluate.features import host_copy

        encoder = self.encoder
        batch = encoder.round_batch(min(BATCH, max(len(images), 1)))
        matrix = ConfusionMatrix(self.num_classes)
        kept = []
        class_embeds = np.asarray(class_embeds, np.float32)
        embeds = jax.make_array_from_callback(class_embeds.shape, self.replicated, lambda idx: class_embeds[idx])
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            n = len(chunk)
            if n < batch:  # padding rows: their logits are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)])
            array = jax.make_array_from_callback(chunk.shape, encoder.sharding, lambda idx, a=chunk: a[idx])
            logits = np.asarray(host_copy(self._step(encoder.variables, array, embeds)))[:n]
            for row in range(n):  # every process counts every row: the same matrix everywhere
                mask = masks[start + row]
                predicted = class_ids(resize_bilinear(logits[row], mask.shape), self.background, self.bg_thresh)
                matrix.update(predicted, mask)
                if start + row < keep_rows:
                    kept.append(predicted)
        return matrix.matrix, kept


def linear_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of bilinear interpolation with half-pixel centres and clamped edges
    (torch's interpolate with align_corners=False, as mmseg resizes logits; no antialiasing)."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = (source - low).astype(np.float32)
    weights = np.zeros((size_out, size_in), np.float32)
    np.add.at(weights, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(size_out), high), frac)
    return weights


def resize_bilinear(logits: np.ndarray, size) -> np.ndarray:
    """logits [h, w, C] -> float32 [H, W, C], bilinear (linear_weights along each axis)."""
    logits = np.asarray(logits, np.float32)
    if tuple(size) == logits.shape[:2]:
        return logits
    rows, cols = linear_weights(logits.shape[0], size[0]), linear_weights(logits.shape[1], size[1])
    return np.einsum("Hh,hwc,Ww->HWc", rows, logits, cols, optimize=True)


def window_starts(length: int, window: int, stride: int) -> list:
    """mmseg's slide inference: windows every `stride` pixels, the last one flush with the far edge."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


def class_ids(logits, background: str, bg_thresh: float) -> np.ndarray:
    """logits [..., C] -> uint8 class ids: background=prompt or model, the argmax (class 0 is background's);
    threshold, 1 + the argmax over the C foreground classes, 0 where their highest softmax probability is
    below bg_thresh."""
    logits = np.asarray(logits, np.float32)
    best = np.argmax(logits, axis=-1)
    if background in ("prompt", "model"):
        return best.astype(np.uint8)
    top = np.exp(logits - logits.max(-1, keepdims=True))
    confident = 1.0 / top.sum(-1) >= bg_thresh  # the highest softmax probability
    return np.where(confident, best + 1, 0).astype(np.uint8)


# -- predictions and picture --------------------------------------------------------------------------
def write_predictions(directory: str, predicted, keys: Optional[np.ndarray], names) -> None:
    """DIR/KEY.png per image (8-bit class indices at its mask's size; the row number where records have no key)
    and classes.json."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    for i, classes in enumerate(predicted):
        key = keys[i] if keys is not None else f"{i:06d}"
        key = key.decode() if isinstance(key, bytes) else str(key)
        Image.fromarray(np.asarray(classes, np.uint8), mode="L").save(os.path.join(directory, f"{key}.png"))
    with open(os.path.join(directory, "classes.json"), "w") as f:
        json.dump(list(names), f)


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours, background black; ignore pixels are drawn white."""
    from clip_jax.evaluate.summary import PALETTE

    colours = [(0, 0, 0)] + [PALETTE[i % len(PALETTE)] for i in range(max(n - 1, 0))]
    return np.asarray(colours, np.uint8)


def pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] of an evaluation image: uint8 as it is, normalized floats back to pixels."""
    from clip_jax.preprocessing import MEAN, STD

    if image.dtype != np.uint8:
        image = np.clip((image * np.asarray(STD) + np.asarray(MEAN)) * 255, 0, 255).astype(np.uint8)
    return image


def picture(path: str, images: np.ndarray, masks, predicted, names, scale: int = 2):
    """Rows of (image, true mask, predicted mask: [H, W] maps of any size) and a legend of the class colours, as a
    PNG."""
    from PIL import Image, ImageDraw, ImageFont

    colours = palette(len(names))

    def colour(mask):
        out = np.full(mask.shape + (3,), 255, np.uint8)
        known = mask < len(names)
        out[known] = colours[mask[known]]
        return out

    side = min(max((max(m.shape) for m in masks), default=32) * scale, 256)  # masks of any sizes, one square
    width, legend = 3 * (side + 6) + 6, 14 * len(names) + 24
    canvas = Image.new("RGB", (max(width, 160), 18 + len(images) * (side + 6) + legend), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for j, title in enumerate(("image", "true", "predicted")):
        draw.text((6 + j * (side + 6), 3), title, fill="black", font=font)
    for i in range(len(images)):
        y = 18 + i * (side + 6)
        tiles = (pixels(images[i]), colour(masks[i]), colour(predicted[i]))
        for j, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile).resize((side, side), Image.NEAREST), (6 + j * (side + 6), y))
    y = 18 + len(images) * (side + 6) + 6
    for k, name in enumerate(names):
        draw.rectangle((6, y + 14 * k, 16, y + 14 * k + 10), fill=tuple(int(c) for c in colours[k]))
        draw.text((22, y + 14 * k), name, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


__all__ = ["ConfusionMatrix", "Segmentation", "SegmenterRun", "class_ids", "resize_bilinear", "window_starts"]
