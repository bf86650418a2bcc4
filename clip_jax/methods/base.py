"""The method interface: what the one trainer needs from anything it trains.

A method declares the batch keys its step reads (each sharded on the batch axes and split
for gradient accumulation by the trainer), builds its variables, returns the loss and named
metrics from params + model state + batch + rng, names its default parameter groups, and may
fix params after each update. The trainer owns everything else: the optimizer and its
parameter groups, sharding, accumulation, the non-finite guard, checkpoints and logging.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax

Metrics = dict[str, jax.Array]


class Method:
    """Base class of the training methods (register a subclass in clip_jax.methods.METHODS).

    Constructed by clip_jax.train.build with (config, model, mesh): the run's config, the
    model built from config.model, and the device mesh; `gather_by_sum` is the mesh builder's
    choice for all-gathers in the loss (clip_jax.parallel.sharding.slow_all_gather).
    """

    # The keys of the global batch the step receives: every one has a leading batch axis.
    batch_keys: tuple[str, ...] = ()

    def __init__(self, config, model, mesh, *, gather_by_sum: bool = False):
        self.config, self.model, self.mesh = config, model, mesh
        self.gather_by_sum = gather_by_sum

    def batch_shapes(self, n: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The shape and dtype of each batch key for a global batch of `n` (what the input pipeline
        delivers): for compiling the step ahead of time and for synthetic batches."""
        raise NotImplementedError

    def init(self, rng: jax.Array) -> Mapping[str, Any]:
        """Variables {'params': ..., other collections...}, boxed with logical axes where the
        modules declare them (the trainer resolves them to shardings)."""
        raise NotImplementedError

    def loss(self, params, model_state: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array,
             train: bool = True) -> tuple[jax.Array, Metrics, Mapping[str, Any]]:
        """(scalar loss, named scalar metrics, new model state) on one (micro)batch."""
        raise NotImplementedError

    def param_groups(self) -> tuple[tuple[str, dict], ...]:
        """The method's own parameter groups, ((REGEX, {frozen, lr_mult, weight_decay}), ...),
        tried after the config's optim.param_groups."""
        return ()

    def lock(self, frozen: set, paths: list) -> None:
        """Told, before the step is built, which of its params (`paths`, '/'-joined) are frozen: a
        method may run a fully frozen part in inference mode (a locked tower's BatchNorm)."""

    def start_variables(self, variables: Mapping[str, Any]) -> Mapping[str, Any]:
        """The variables a fresh run starts from, given them once initialized and config.init_from loaded (not on a
        resume, which restores them): a method may derive some from the loaded weights (ViLD's frozen classifier
        from the text tower). The identity by default; called under jit with the variables' shardings kept."""
        return variables

    def weights(self, path: str) -> Optional[Mapping[str, Any]]:
        """A weights file of config.init_from read the method's own way (its released checkpoints' layout): its
        variables as the method's init lays them out (numpy leaves; a part may be missing), or None where the file
        is read as the model's (the default)."""
        return None

    def post_update(self, params):
        """Params after each applied update (a clamp, a projection); the identity by default."""
        return params

    def model_variables(self, params, model_state: Mapping[str, Any]) -> dict:
        """The model's variables for evaluation and export, from the method's params and state."""
        return {"params": params, **model_state}

    # -- evaluation --
    def predictions(self) -> dict[str, "Prediction"]:
        """The predict functions evaluation tasks may call, by name (each task declares the names it
        needs): for a method that trains a two-tower model, the towers' (two_tower_predictions)."""
        return two_tower_predictions(self.model)

    # -- export --
    def export(self, params, model_state: Mapping[str, Any], extras: bool = False) -> dict[str, Any]:
        """What an export of this method's run holds, by part: 'towers', the model's variables (written
        in open_clip's layout, the logit bias with them where the model has one), and any other part
        a {name: array} written beside them (OUT.PART.safetensors). `extras`: the parts only training
        uses too (SLIP's SSL head); none by default."""
        return {"towers": self.model_variables(params, model_state)}

    # -- input --
    def inputs(self) -> tuple["BatchInput", ...]:
        """How the input makes each of batch_keys from records: one BatchInput per key, by names that
        clip_jax.input resolves (its ops and record features). () for a method whose batches do not come
        from the training input (an adaptation's, in memory)."""
        return ()

    # -- config, model, phases, cost --

    # The config sections this method reads, {name: defaults}: clip_jax.config.base_config() holds every
    # registered method's, so `--config.SECTION.KEY=VALUE` works whatever the method.
    config_sections: dict[str, dict] = {}
    # The allowed values of its numeric settings, per '.'-joined key (rules as clip_jax.config.RANGES').
    config_ranges: dict[str, tuple] = {}
    # Top-level keys of older configs and their place now ('.'-joined), so an old workdir's config.json reads.
    config_moved: dict[str, str] = {}

    @classmethod
    def check_config(cls, config) -> None:
        """Raise a ValueError naming the setting and its fix for a bad combination of the method's
        settings; called by the trainer before data is read or anything compiles."""

    @classmethod
    def model_overrides(cls, config, overrides: dict) -> dict:
        """The open_clip-style model overrides to build with: `overrides` (config.model_overrides) with
        what the method or its loss brings to the architecture or its init."""
        return overrides

    @classmethod
    def phases(cls, config) -> tuple[Phase, ...]:
        """The phases of a run, in the order of their start steps: what changes during training."""
        return (Phase(0, "train"),)

    @classmethod
    def train_flops(cls, forward: Mapping[str, float], config=None) -> float:
        """Model FLOPs of one training step from the forward pass's parts over the batch
        ({'image', 'text', 'logits', 'forward', 'train_step'}, clip_jax.train.flops.clip_forward_flops):
        the backward pass counted as twice the forward; config: the run's, where the count depends on it."""
        return forward["train_step"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """A span of training from step `start` (the count of steps taken when it begins) to the next
    phase's start, and what changes there; a phase keeps what the earlier ones set unless it sets it
    again. The first phase starts at 0."""

    start: int
    name: str  # in logs and compiled programs' names
    frozen: Optional[str] = None  # config.optim.frozen from here ('': nothing frozen); None keeps it
    # A new optimizer state, and a warmup + schedule over the remaining steps; the params, the step and
    # the skipped-step counts carry on. Needed where `frozen` changes: the trained params change.
    fresh_optimizer: bool = False
    attributes: tuple[tuple[str, Any], ...] = ()  # (name, value) set on the method for its step
    note: str = ""  # what the trainer logs when the phase begins

    def __post_init__(self):
        if self.frozen is not None and not self.fresh_optimizer:
            raise ValueError(f"phase {self.name!r} changes what is frozen, which changes the optimizer state's "
                             "layout: give it fresh_optimizer=True")


@dataclasses.dataclass(frozen=True)
class BatchInput:
    """One batch key and how the input makes it: the input op `op` (clip_jax.input.ops: 'crop', 'tokenize',
    'simclr_views', 'value', 'cached', ...) applied to the record features `reads` (clip_jax.input.features:
    'image', 'caption', 'labels', 'segmentation', 'objects/shape', ...), with the op's `options`
    ((name, value) pairs). Names only: the methods do not import the input."""

    key: str
    op: str
    reads: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()


class Prediction:
    """One predict function of a method: fn(variables, inputs) -> one row per input item, where the
    inputs are the evaluation batch's `reads` key with items of rank `item_rank` (leading axes are
    flattened into rows); with reads=None, fn(variables) -> one value of the model. `also_reads`: further
    batch keys passed after it, fn(variables, inputs, *others), each with the same leading axes (a clip's
    frame mask beside its frames)."""

    def __init__(self, fn, reads: str | None = None, item_rank: int = 0, templates: tuple | None = None,
                 background: bool = False, class_inputs=None, also_reads: tuple = ()):
        self.fn, self.reads, self.item_rank = fn, reads, item_rank
        self.also_reads = tuple(also_reads)
        # A detector that reads its classes its own way (GLIP: a prompt of their names): fn(names) -> a dict of
        # arrays the detection task passes in place of the class embeddings, plus optionally 'prompt' (str, the
        # text read: the task shows it on its picture and in its details).
        self.class_inputs = class_inputs
        # A prediction over class embeddings ('segment_logits') trained on class names in these templates
        # (LSeg: the bare name, "{}"): evaluation embeds its classes so; None: the dataset's prompts.
        self.templates = templates
        # A segmenter that scores background itself: given the foreground classes' embeddings it returns
        # background's logit first (the segmentation task's background=model).
        self.background = background

    def with_fn(self, fn) -> "Prediction":
        """The same prediction (inputs, templates, ...) computed by `fn` (a wrapper of this one's)."""
        import copy

        out = copy.copy(self)
        out.fn = fn
        return out


def two_tower_predictions(model) -> dict[str, Prediction]:
    """CLIP's: 'image_embeds' (unit vectors of images [N, S, S, 3], uint8 or float, normalized on the
    device), 'text_embeds' (unit vectors of tokens [N, T]), 'logit_scale' (the learned temperature) and
    'video_embeds' (unit vectors of clips [N, T, S, S, 3] with their frame masks [N, T]: the mean of the frames'
    unit embeddings, CLIP4Clip's meanP without training);
    'image_dense' / 'image_dense_patch' (per-patch features [N, h, w, E], not normalized: MaskCLIP's value path
    / each patch token through the head) and 'segment_logits', the segmentation task's segmenter:
    fn(variables, images, class_embeds [C, E] unit rows) -> [N, h, w, C] logits (MaskCLIP: cosine of the
    'image_dense' features at the model's logit scale). A method with its own segmentation inference (GroupViT,
    LSeg) replaces 'segment_logits' with a function of the same signature. A detector (ViLD) adds 'detect', the
    detection task's: fn(variables, images, class_embeds [C, E], novel [C] bool) -> {'boxes' [N, K, 4] (x1, y1,
    x2, y2) in the input's pixels, 'scores' [N, K], 'classes' [N, K] int, 'valid' [N, K] bool}. A grounder (GLIP)
    adds 'ground', the grounding task's: fn(variables, images, tokens [N, L] int32, phrases [N, P, L] bool,
    phrase_valid [N, P] bool) -> {'boxes' [N, P, K, 4] in the input's pixels, 'scores' [N, P, K]}."""
    import jax.numpy as jnp

    from clip_jax.models.clip import l2_normalize
    from clip_jax.preprocessing import model_images

    def dense(form):
        def fn(variables, x):
            return model.apply(variables, model_images(x), form=form, method="encode_image_dense")

        return fn

    def segment_logits(variables, x, class_embeds):
        scale = model.apply(variables, method="temperature")[0]
        return scale * jnp.einsum("nhwe,ce->nhwc", l2_normalize(dense("maskclip")(variables, x)), class_embeds)

    def images(variables, x):
        return model.apply(variables, model_images(x), method="encode_image")

    def texts(variables, tokens):
        return model.apply(variables, tokens, method="encode_text")

    def logit_scale(variables):
        return model.apply(variables, method="temperature")[0]

    def videos(variables, frames, mask):
        # CLIP without a video head: CLIP4Clip's meanP on its frames (unit frames, masked mean, unit again)
        from clip_jax.models.video import pool_frames

        b, t = frames.shape[:2]
        flat = model.apply(variables, model_images(frames.reshape((b * t,) + frames.shape[2:])), method="encode_image")
        return pool_frames(flat.reshape(b, t, -1), mask)

    return {"image_embeds": Prediction(images, "image", 3), "text_embeds": Prediction(texts, "tokens", 1),
            "video_embeds": Prediction(videos, "frames", 4, also_reads=("frame_mask",)),
            "logit_scale": Prediction(logit_scale), "image_dense": Prediction(dense("maskclip"), "image", 3),
            "image_dense_patch": Prediction(dense("patch"), "image", 3),
            "segment_logits": Prediction(segment_logits, "image", 3)}


def class_names(settings, section: str, order: str) -> tuple[str, ...]:
    """A method section's class names (config.SECTION.classes), or those of its `classes_file` (one a line, blank
    lines skipped) where set; `order` says in the error what order the file must list them in."""
    if not settings.classes_file:
        return tuple(settings.classes)
    try:
        with open(settings.classes_file, encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    except OSError as e:
        raise ValueError(f"config.{section}.classes_file={settings.classes_file!r} cannot be read ({e}): give a text "
                         f"file of class names, one a line in {order}") from None


def check_class_names(settings, section: str, classes: tuple) -> None:
    """A detector section's classes are distinct names in label order, and its `novel` ones among them."""
    if len(classes) < 1 or len(set(classes)) != len(classes):
        raise ValueError(f"config.{section}.classes (or classes_file) must be distinct names in label order, got "
                         f"{classes[:8]}")
    unknown = [c for c in settings.novel if c not in classes]
    if unknown:
        raise ValueError(f"config.{section}.novel={tuple(settings.novel)}: {unknown} are not classes; name some of "
                         f"config.{section}.classes ({classes})")


def towers_only(variables, part: str) -> dict:
    """A method's variables without `part` (its head): what the towers' own modules take."""
    return {name: {k: v for k, v in tree.items() if k != part} for name, tree in variables.items()}


def without_part(fn, part: str):
    """A predict function of the towers alone, fed a method's variables that also hold `part` (its head)."""
    def wrapped(variables, *args):
        return fn(towers_only(variables, part), *args)

    return wrapped


def tower_predictions(predictions: dict, part: str) -> dict:
    """A detector method's two-tower predictions, fed its variables (head `part` left out); the dense and
    segmentation ones dropped (its image tower is the detector's backbone)."""
    return {name: p.with_fn(without_part(p.fn, part)) for name, p in predictions.items()
            if not name.startswith(("image_dense", "segment"))}


def export_with_head(params, model_state, part: str) -> dict:
    """'towers': the CLIP model (open_clip's layout); `part`: the head's params, '/'-joined names."""
    from flax import traverse_util

    towers = {k: v for k, v in params.items() if k != part}
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params[part]).items()}
    stats = model_state.get("batch_stats", {})
    return {"towers": {"params": towers, **({"batch_stats": stats} if stats else {})}, part: flat}
