"""LSeg (Li et al. 2022, "Language-driven Semantic Segmentation") as a method of the one trainer.

A DPT head (clip_jax.models.dpt) on four blocks of a ViT image tower (or a ModifiedResNet's four
stages, DPT's hybrid form) gives an embedding per pixel;
its logits against the class names' text embeddings are s * norm(F) . norm(T)^T at LSeg's FIXED
s = 1/0.07 (its `nn.Parameter(...).exp()` is a plain tensor, never trained), computed at the head's
resolution and resized bilinearly (align_corners) to the input's, as LSeg's final Interpolate x2;
the loss is the per-pixel cross-entropy over the batch key `mask` with ignore index 255. The class
embeddings come from the frozen text tower on the raw class names, no template (LSeg's labels);
config.lseg.background='learned' adds a trained offset to class 0's (background's).

Open vocabulary: training sees the masks of the base classes only. The novel classes
(config.lseg.novel) are dropped from the training softmax and their pixels ignored, so at
evaluation (every class, `segment_logits`) their IoU is zero-shot.

Optimizer (LSeg's lsegmentation_module.py, set by configs/lseg.py): SGD momentum 0.9, weight decay
1e-4 on every trained param, lr 0.004 / 16 x batch, poly decay power 0.9; the head's `scratch`
part at 10x lr (this method's param_groups); the text tower, the temperature and the image tower's
pooling head (unused) frozen.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.methods import METHODS
from clip_jax.methods.base import BatchInput, Method, Prediction, class_names, without_part
from clip_jax.models import dummy_inputs, l2_normalize
from clip_jax.models.dpt import SCRATCH, DPTHead, resize_bilinear
from clip_jax.preprocessing import model_images

HEAD = "lseg_head"  # the DPT head's params and BatchNorm statistics sit under this top-level name
IGNORE = 255

# config.lseg (facts: LSeg's lseg_net.py, lseg_blocks.py, lseg_vit.py).
LSEG_DEFAULTS = {
    # 1-based image-tower blocks the head reads; () = ceil(k * depth / 4) for k = 1..4, LSeg's hooks
    # [5, 11, 17, 23] (0-based) for 24 blocks and [2, 5, 8, 11] for 12
    "layers": (),
    "features": 256,  # the fusion width (LSeg's `features`)
    "stage_features": (256, 512, 1024, 1024),  # the reassembled stages' widths (LSeg's ViT-L/16)
    "readout": "project",  # the class token folded into each patch token: 'project', 'add' or 'ignore'
    "logit_scale": 1 / 0.07,  # fixed, not trained
    # The class names in the mask's id order (0 = background, then the label set's names: the `mask` op's
    # `labels`, the embedded dataset's names for 'shape'), fed raw to the text tower.
    "labels": "shape",
    "classes": ("background", "circle", "square", "triangle", "star", "cross", "diamond"),
    "classes_file": "",  # a text file of the class names, one a line in id order, in place of `classes`
    # Class 0's embedding: 'text' (LSeg's: the text tower's embedding of classes[0], e.g. "background") or
    # 'learned' (trained, as ViLD's background embedding: that embedding plus a trained offset, starting at 0,
    # for a text tower that never saw the word).
    "background": "text",
    "novel": ("star", "cross"),  # never trained on: clip_jax.input.shapes.NOVEL_SHAPES (the methods import no input)
}


# LSeg's optimizer holds the backbone (`pretrained`, the reassemble ops with it) at 1x and the head's `scratch`
# at 10x; the text tower is left out of it (frozen), and so is what LSeg never runs (the tower's pooling head).
PARAM_GROUPS = ((r"text/.*|logit_scale|logit_bias", {"frozen": True}),
                (r"visual/(ln_post|proj|attn_pool|attnpool)(/.*)?", {"frozen": True}),
                (rf"{HEAD}/({SCRATCH}/.*|background)", {"lr_mult": 10.0}))


def tapped_layers(depth: int, layers=()) -> tuple[int, ...]:
    """The 4 blocks (1-based) the DPT head reads: `layers` when given, else evenly spaced ending at the
    last block, ceil(k * depth / 4) (LSeg's [6, 12, 18, 24] of 24 blocks)."""
    chosen = tuple(int(i) for i in layers) if layers else tuple(math.ceil(k * depth / 4) for k in range(1, 5))
    if len(chosen) != 4 or not all(1 <= i <= depth for i in chosen) or list(chosen) != sorted(chosen):
        raise ValueError(f"config.lseg.layers={tuple(layers)} must be 4 ascending block numbers in [1, {depth}] "
                         f"(1-based; () picks {tuple(math.ceil(k * depth / 4) for k in range(1, 5))})")
    return chosen


def backbone_maps(model, variables, images, layers):
    """(4 maps, shallow to deep; their class tokens or None): a ViT's blocks `layers` as token maps with their
    class tokens (LSeg's), or a ModifiedResNet's four stages (DPT's hybrid backbone: strides 4 to 32, no class
    token), its BatchNorm on the running statistics as segmentation fine-tuning at small batches does."""
    if model.config.vision.is_resnet:
        towers = {k: {n: t for n, t in tree.items() if n != HEAD} for k, tree in variables.items()}
        return model.apply(towers, images, (1, 2, 3, 4), method="encode_image_intermediates"), None
    return vit_intermediates(model, variables["params"], images, layers)


def vit_intermediates(model, params, images, layers):
    """(maps: the outputs of blocks `layers` (1-based) as patch-token maps [N, h, w, width]; their class
    tokens [N, width]) of a CLIP ViT image tower, running only the blocks up to the last one asked for,
    stacked (scan) or not. LSeg's readout needs the class tokens beside the maps, which the tower's
    `encode_image_intermediates` (patch maps only) does not return."""
    from clip_jax.models.clip import VISION_TOWERS
    from clip_jax.models.layers import LayerNorm, Transformer, remat_policy
    from clip_jax.models.vit import PatchEmbed

    if model.config.vision.kind != "vit":
        raise ValueError(f"LSeg's DPT head reads a ViT's patch tokens; the image tower is "
                         f"{model.config.vision.kind!r}: pick a ViT preset")
    tower = VISION_TOWERS.get("vit")(model)
    p = params["visual"]
    x = PatchEmbed(tower.patch_size, tower.width, tower.dtype).apply({"params": p["conv1"]}, images)
    n, grid = x.shape[0], tower.image_size // tower.patch_size
    cls = jnp.broadcast_to(p["class_embedding"].astype(x.dtype), (n, 1, tower.width))
    x = jnp.concatenate([cls, x], axis=1) + p["positional_embedding"].astype(x.dtype)
    x = LayerNorm(tower.dtype).apply({"params": p["ln_pre"]}, x)
    fields = ("layers", "heads", "mlp_ratio", "quick_gelu", "dtype", "attn_impl", "remat", "scan")
    stack = Transformer(causal=False, **{f: getattr(tower, f) for f in fields})
    block = stack.Block(**stack._block_kwargs())
    apply = lambda q, h: block.apply({"params": q}, h)  # noqa: E731
    if tower.remat != "none":
        apply = jax.checkpoint(apply, policy=remat_policy(tower.remat))
    t = p["transformer"]
    maps, tokens = [], []
    for i in range(max(layers)):
        q = jax.tree.map(lambda a: a[i], t["resblocks"]) if "resblocks" in t else t[f"resblocks_{i}"]
        x = apply(q, x)
        for _ in range(list(layers).count(i + 1)):
            maps.append(x[:, 1:].reshape(n, grid, grid, tower.width))
            tokens.append(x[:, 0])
    return maps, tokens


def pixel_logits(features, class_embeds, scale: float):
    """s * norm(features) . norm(class_embeds)^T: features [N, H, W, E], class_embeds [K, E] -> [N, H, W, K]."""
    return scale * jnp.einsum("nhwe,ke->nhwk", l2_normalize(features), l2_normalize(class_embeds))


def masked_cross_entropy(logits, labels, ignore: int = IGNORE):
    """(mean cross-entropy over the pixels whose label is not `ignore`, pixel accuracy there): logits
    [N, H, W, K], labels [N, H, W] int; torch's CrossEntropyLoss(ignore_index) (0 for no valid pixel)."""
    valid = labels != ignore
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = jnp.maximum(valid.sum(), 1)
    correct = (jnp.argmax(logits, axis=-1) == safe) & valid
    return jnp.where(valid, nll, 0.0).sum() / count, correct.sum() / count


@METHODS.register("lseg")
class LSeg(Method):
    """A DPT head on the image tower, per-pixel logits against the frozen text tower's class-name
    embeddings, cross-entropy over {'image': [N, S, S, 3], 'mask': [N, S, S] class ids, 255 = ignore}."""

    batch_keys = ("image", "mask")

    def __init__(self, config, model, mesh, **options):
        super().__init__(config, model, mesh, **options)
        self.check_config(config)
        s = config.lseg
        v = model.config.vision
        if v.kind not in ("vit", "resnet"):
            raise ValueError(f"config.method='lseg' puts a DPT head on a ViT's blocks or a ResNet's stages; the "
                             f"image tower is {v.kind!r}: pick a ViT or ModifiedResNet preset "
                             "(e.g. --config.model=ViT-Shapes-S)")
        self.cnn = v.is_resnet
        if self.cnn and (tuple(s.layers) not in ((), (1, 2, 3, 4)) or len(v.layers) != 4):
            raise ValueError(f"config.lseg.layers={tuple(s.layers)}: on a ModifiedResNet the DPT head reads its 4 "
                             "stages; leave config.lseg.layers=()")
        self.layers = (1, 2, 3, 4) if self.cnn else tapped_layers(v.layers, s.layers)
        self.scale = float(s.logit_scale)
        self.classes = class_list(s)
        # a CNN's stages already halve one by one, and carry no class token to read out
        self.head = DPTHead(out_dim=model.config.embed_dim, features=int(s.features),
                            stage_features=tuple(int(f) for f in s.stage_features),
                            readout="ignore" if self.cnn else s.readout,
                            scales=(1, 1, 1, 1) if self.cnn else (4, 2, 1, 0.5), dtype=model.dtype)
        from clip_jax.tokenizers import tokenizer_for

        self.tokens = np.asarray(tokenizer_for(model.config.text)(list(self.classes), model.config.text.context_length))
        # training: the background and base classes only; a mask id -> its index among them, else ignored
        novel = set(s.novel)
        self.train_classes = np.array([i for i, c in enumerate(self.classes) if c not in novel], np.int32)
        table = np.full(256, IGNORE, np.int32)
        table[self.train_classes] = np.arange(len(self.train_classes))
        self.label_table = table

    # -- input --
    def inputs(self):
        labels = self.config.lseg.labels
        if labels == "record":  # class ids stored in the record (VOC / ADE20K style), checked against the classes
            mask = BatchInput("mask", "mask", ("segmentation_mask",),
                              (("labels", "record"), ("num_classes", len(self.classes))))
        else:  # a shapes record's object map and objects, as the label set's ids
            mask = BatchInput("mask", "mask", ("segmentation", "objects/shape", "objects/color"), (("labels", labels),))
        return (BatchInput("image", "crop", ("image",)), mask)

    def batch_shapes(self, n):
        size = self.model.config.vision.image_size
        dtype = {"uint8": jnp.uint8, "bfloat16": jnp.bfloat16}.get(self.config.data.image_dtype, jnp.float32)
        return {"image": jax.ShapeDtypeStruct((n, size, size, 3), dtype),
                "mask": jax.ShapeDtypeStruct((n, size, size), jnp.uint8)}

    # -- variables --
    def init(self, rng):
        model_rng, head_rng = jax.random.split(rng)
        variables = dict(self.model.init(model_rng, *dummy_inputs(self.model)))
        size = self.model.config.vision.image_size
        maps, cls = jax.eval_shape(lambda: backbone_maps(self.model, nn.meta.unbox(variables),
                                                         jnp.zeros((1, size, size, 3)), self.layers))
        zeros = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), t)  # noqa: E731
        head = self.head.init(head_rng, zeros(maps), zeros(cls), train=False)
        head_params = dict(head["params"])
        if self.config.lseg.background == "learned":
            head_params["background"] = jnp.zeros((self.model.config.embed_dim,), jnp.float32)
        variables["params"] = {**variables["params"], HEAD: head_params}
        variables["batch_stats"] = {**variables.get("batch_stats", {}), HEAD: head["batch_stats"]}
        return variables

    def param_groups(self):
        return PARAM_GROUPS

    # -- the network --
    def dense_features(self, variables, images, train: bool = False):
        """(per-pixel embeddings [N, h', w', E] from the head, not normalized; new head statistics or None)."""
        if HEAD not in variables["params"]:
            raise ValueError(f"these variables hold the CLIP towers only, not LSeg's DPT head ({HEAD!r}): pass the "
                             "method's model_variables(params, model_state) of the run")
        params, stats = variables["params"], variables["batch_stats"][HEAD]
        maps, cls = backbone_maps(self.model, variables, images, self.layers)
        head_vars = {"params": {k: v for k, v in params[HEAD].items() if k != "background"}, "batch_stats": stats}
        if train:
            out, updated = self.head.apply(head_vars, maps, cls, train=True, mutable=["batch_stats"])
            return out, updated["batch_stats"]
        return self.head.apply(head_vars, maps, cls, train=False), None

    def class_embeddings(self, variables, tokens=None):
        """The text tower's unit embeddings [K, E] of the class names (`tokens`, default config.lseg.classes,
        with the learned background's in row 0 under config.lseg.background='learned'); frozen."""
        tokens = self.tokens if tokens is None else tokens
        text = self.model.apply({"params": {k: v for k, v in variables["params"].items() if k != HEAD}},
                                jnp.asarray(tokens), method="encode_text")
        text = jax.lax.stop_gradient(text)
        return self.with_background(variables, text) if tokens is self.tokens else text

    def with_background(self, variables, class_embeds):
        """class_embeds [K, E] (row 0 the text tower's embedding of classes[0]) with row 0 plus the learned
        offset, normalized (config.lseg.background='learned')."""
        if self.config.lseg.background != "learned":
            return class_embeds
        offset = variables["params"][HEAD]["background"].astype(jnp.float32)
        background = l2_normalize(class_embeds[0].astype(jnp.float32) + offset)
        return class_embeds.at[0].set(background.astype(class_embeds.dtype))

    def logits(self, features, class_embeds, size: tuple[int, int]):
        """Per-pixel logits [N, *size, K] at the fixed scale, resized as LSeg's output Interpolate."""
        return resize_bilinear(pixel_logits(features, class_embeds, self.scale), *size)

    def loss(self, params, model_state, batch, rng, train: bool = True):
        images = model_images(batch["image"])
        if batch["mask"].shape != images.shape[:3]:
            raise ValueError(f"the batch's mask {batch['mask'].shape} is not one [N, H, W] per image {images.shape}: "
                             "make the `mask` input at the model's image size (nearest resize with the image)")
        variables = {"params": params, **model_state}
        features, stats = self.dense_features(variables, images, train)
        text = self.class_embeddings(variables)[self.train_classes]
        logits = self.logits(features, text, images.shape[1:3])
        ids = batch["mask"].astype(jnp.int32)
        labels = jnp.asarray(self.label_table)[ids]
        loss, accuracy = masked_cross_entropy(logits, labels)
        if stats is not None:
            model_state = {**model_state, "batch_stats": {**model_state["batch_stats"], HEAD: stats}}
        # ids past the class list are ignored like 255, and counted so that a wrong label set shows in the logs
        unknown = ((ids >= len(self.classes)) & (ids != IGNORE)).sum().astype(jnp.float32)
        return loss, {"pixel_acc": accuracy, "unknown_label_pixels": unknown}, model_state

    # -- evaluation and export --
    def model_variables(self, params, model_state):
        return {"params": params, **model_state}  # the head is part of the model here: evaluation runs it

    def predictions(self):
        """The two towers' predictions, and 'segment_logits': fn(variables, images [N, S, S, 3], class_embeds
        [K, E] or None: every config.lseg.classes) -> per-pixel logits float32 [N, S, S, K], every class."""
        towers = {}
        for name, p in super().predictions().items():
            towers[name] = p.with_fn(without_part(p.fn, HEAD))

        learned = self.config.lseg.background == "learned"

        def segment_logits(variables, images, class_embeds=None):
            x = model_images(images)
            features, _ = self.dense_features(variables, x, train=False)
            if class_embeds is None:
                embeds = self.class_embeddings(variables)
            elif learned:  # the foreground classes' embeddings: the learned background goes first
                text = self.class_embeddings(variables, self.tokens[:1])
                embeds = self.with_background(variables, jnp.concatenate([text.astype(class_embeds.dtype),
                                                                          class_embeds]))
            else:
                embeds = class_embeds
            return self.logits(features, embeds, x.shape[1:3])

        # LSeg's classes are the bare names, background one of them (or its own learned one)
        return {**towers, "segment_logits": Prediction(segment_logits, "image", 3, templates=("{}",),
                                                       background=learned)}

    def export(self, params, model_state, extras=False):
        """'towers': the CLIP model (open_clip's layout); 'lseg_head': the DPT head's params and statistics,
        '/'-joined names."""
        from flax import traverse_util

        towers = {k: v for k, v in params.items() if k != HEAD}
        stats = {k: v for k, v in model_state.get("batch_stats", {}).items() if k != HEAD}
        head = {"params": params[HEAD], "batch_stats": model_state["batch_stats"][HEAD]}
        flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(head).items()}
        return {"towers": {"params": towers, **({"batch_stats": stats} if stats else {})}, HEAD: flat}

    # -- config --
    config_sections = {"lseg": LSEG_DEFAULTS}
    config_ranges = {"lseg.features": (">=", 1), "lseg.logit_scale": (">", 0)}

    @classmethod
    def train_flops(cls, forward, config=None):
        # the image tower forward and backward; no per-example text pass, and the DPT head (its convolutions
        # depend on config.lseg) is not counted: a lower bound
        return 3 * forward["image"]

    @classmethod
    def check_config(cls, config):
        s = config.lseg
        if s.background not in ("text", "learned"):
            raise ValueError(f"config.lseg.background={s.background!r}: use 'text' (LSeg's: the text tower embeds "
                             "classes[0]) or 'learned' (a trained background embedding)")
        if s.readout not in ("project", "add", "ignore"):
            raise ValueError(f"config.lseg.readout={s.readout!r}: use 'project' (LSeg's), 'add' or 'ignore'")
        if len(tuple(s.stage_features)) != 4:
            raise ValueError(f"config.lseg.stage_features={tuple(s.stage_features)} needs 4 widths (one per stage)")
        classes = class_list(s)
        if len(classes) < 2 or len(set(classes)) != len(classes) or len(classes) > IGNORE:
            raise ValueError(f"config.lseg.classes (or classes_file) must be 2 to 255 distinct names in the mask's id "
                             f"order (0 = background first), got {len(classes)}: {classes[:8]}")
        unknown = [c for c in s.novel if c not in classes]
        if unknown or classes[0] in tuple(s.novel):
            raise ValueError(f"config.lseg.novel={tuple(s.novel)}: {unknown or [classes[0]]} is not a class that can "
                             f"be held out; name some of config.lseg.classes[1:] ({classes[1:]})")
        if len(classes) - len(set(s.novel)) < 2:
            raise ValueError(f"config.lseg.novel={tuple(s.novel)} leaves fewer than 2 classes to train on")


def class_list(settings) -> tuple[str, ...]:
    """config.lseg's class names: those of `classes_file` where set."""
    return class_names(settings, "lseg", "the mask's id order")

