"""Input ops by name: how a batch key is made from the record features a method reads.

A method declares its batch keys (clip_jax.methods.base.BatchInput: key, op, reads, options) by
name; `resolve` looks the names up here and in clip_jax.input.features. An op works at one stage:

- 'record': on each good record of the training stream, after its checks (decode, crop, SimCLR
  views); a record that is bad, a sentinel or a marker gets the op's `blank` instead, so only
  usable records are decoded. An op without a blank is cheap and runs on every record (a value
  passed through as it is).
- 'batch': on the batched rows (tokenize the chosen captions).
- 'store': whole batches from a store instead of records (precomputed image embeddings,
  clip_jax.input.embedding_cache); every key of such a method comes from the same store.

The spatial ops apply jointly: every 'crop' of a record (the image, its segmentation) uses the
image's geometry and one seed, and with options flip=True one flip decision.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from clip_jax.input import features as features_lib
from clip_jax.input.transforms import crop_mask, decode_and_crop, simclr_view
from clip_jax.registry import Registry

# Per-example random streams, by salt (clip_jax.input.pipeline._Stream._example_seed). The numbers are
# those the stream has always used (the SimCLR views' first salt is also the caption choice's): a
# change would change every batch.
CROP_SALT = 3
VIEWS_SALT = 4  # view v: VIEWS_SALT + v
FLIP_SALT = 16
AUDIO_SALT = 24  # the audio op's draws (clip_jax.input.audio); noun_prompts' and prompts' salts are 21-23
VIDEO_SALT = 25  # the frames op's sampling (clip_jax.input.video; its crop and flip: CROP_SALT, FLIP_SALT)
# Batch-stream bookkeeping, not batch keys.
RESERVED = ("epoch", "position", "counts", "status")


@dataclasses.dataclass(frozen=True)
class Wanted:
    """One declared batch key, normalized: made by the op `op` from the features `reads`."""

    key: str
    op: str
    reads: tuple = ()
    options: tuple = ()  # ((name, value), ...)

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)


@dataclasses.dataclass(frozen=True)
class OpContext:
    """What an op works with: the run's image size, mode and data settings; per record, `seed(salt)`
    is the example's stateless seed; per batch, the tokenizer."""

    image_size: int
    train: bool
    config: dict
    dtype: Any = None  # the image dtype (tf)
    seed: Optional[Callable[[int], Any]] = None
    tokenizer: Any = None
    context_length: int = 77


@dataclasses.dataclass(frozen=True)
class Op:
    stage: str  # 'record' | 'batch' | 'store'
    make: Optional[Callable] = None  # (OpContext, {feature: value}, Wanted) -> the key's value of one record / batch
    blank: Optional[Callable] = None  # record ops that decode: (OpContext, Wanted) -> zeros shaped as make's
    needs: tuple = ()  # features read besides the declared ones (a crop: the image's geometry)
    # ((bad kind in pipeline.BAD_KINDS, ({feature: picked value}, Wanted) -> bool tensor), ...): checks of a
    # record across the key's features, run on every record (sentinels too): they must never raise
    checks: tuple = ()
    joint: bool = False  # follows the record's crop: given the 'crop' keys' flip option
    validate: Optional[Callable] = None  # (Wanted) -> None, raising a ValueError on bad reads or options
    # A record op that makes several batch keys from one declaration (boxes with their labels): (Wanted) -> the
    # keys, the declared one first; its make and blank then return {key: value}. None: the declared key alone.
    makes: Optional[Callable] = None
    # (Wanted) -> {made key: names}: keys of per-record int counts (entry i counted under names[i]) that the
    # stream sums over the records it yields into its state (InputPipeline.tallies), like its bad-record counts.
    tallies: Optional[Callable] = None
    # (the source's files, None for tfds; Wanted) -> None, raising a ValueError naming the fix where the source
    # cannot make the key (region embeddings not written yet): run by the training input before it reads
    probe: Optional[Callable] = None

    def keys(self, wanted: "Wanted") -> tuple:
        """The batch keys one declaration of this op makes."""
        return tuple(self.makes(wanted)) if self.makes is not None else (wanted.key,)

    def made(self, wanted: "Wanted", value) -> dict:
        """{batch key: value} of what make or blank returned."""
        return dict(value) if self.makes is not None else {wanted.key: value}


OPS: Registry[Op] = Registry("input op")


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


def _one(wanted: Wanted) -> str:
    if len(wanted.reads) != 1:
        raise ValueError(f"batch key {wanted.key!r}: op {wanted.op!r} reads one record feature, not {wanted.reads!r}")
    return wanted.reads[0]


# -- crop: decode + crop (+ flip) of a spatial feature, jointly for every spatial feature of a record --
def _crop(ctx: OpContext, ex: dict, wanted: Wanted):
    tf = _tf()
    name = _one(wanted)
    spatial = features_lib.FEATURES.get(name).spatial
    seed = ctx.seed(CROP_SALT)
    if spatial == "pixels":
        out = tf.cast(decode_and_crop(ex[name], ctx.image_size, ctx.train, seed, ctx.config), ctx.dtype)
    elif spatial == "mask":
        out = crop_mask(ex[name], ex["image"], ctx.image_size, ctx.train, seed, ctx.config)
    else:
        raise ValueError(f"batch key {wanted.key!r}: op 'crop' needs a spatial record feature (an image or a label "
                         f"map); {name!r} is not one")
    return flip(ctx, out, wanted)


def _crop_blank(ctx: OpContext, wanted: Wanted):
    tf = _tf()
    size = ctx.image_size
    if features_lib.FEATURES.get(_one(wanted)).spatial == "mask":
        return tf.zeros([size, size], tf.uint8)
    return tf.zeros([size, size, 3], ctx.dtype)


OPS.register("crop")(Op("record", _crop, _crop_blank, needs=("image",)))


# -- SimCLR views (SLIP): options views=N, each from its own stateless seed ---------------------
def _views(ctx: OpContext, ex: dict, wanted: Wanted):
    tf = _tf()
    image = ex[_one(wanted)]
    views = [simclr_view(image, ctx.image_size, ctx.seed(VIEWS_SALT + v), ctx.config)
             for v in range(int(wanted.option("views", 2)))]
    return tf.cast(tf.stack(views), ctx.dtype)


def _views_blank(ctx: OpContext, wanted: Wanted):
    size = ctx.image_size
    return _tf().zeros([int(wanted.option("views", 2)), size, size, 3], ctx.dtype)


OPS.register("simclr_views")(Op("record", _views, _views_blank))

# -- a feature's value as the record holds it (after the training pick: one caption) -----------
OPS.register("value")(Op("record", lambda ctx, ex, wanted: ex[_one(wanted)]))

# -- tokenize the batch's chosen captions ------------------------------------------------------
OPS.register("tokenize")(Op("batch", lambda ctx, batch, wanted: ctx.tokenizer.tf_tokenize(batch[_one(wanted)],
                                                                                          ctx.context_length)))

# -- whole batches of precomputed image embeddings and tokens (options directory=DIR) -----------
OPS.register("cached")(Op("store"))

# What a pipeline makes when no method declares its keys: CLIP's two, and the chosen caption and the labels.
DEFAULT_INPUTS = (
    Wanted("image", "crop", ("image",)),
    Wanted("tokens", "tokenize", ("caption",)),
    Wanted("caption", "value", ("caption",)),
    Wanted("labels", "value", ("labels",)),
)


def as_wanted(declared) -> Wanted:
    """A method's declaration (anything with key, op, reads and options: clip_jax.methods.base.BatchInput) ->
    Wanted."""
    options = getattr(declared, "options", ())
    options = tuple(sorted(dict(options).items()))
    return Wanted(str(declared.key), str(declared.op), tuple(getattr(declared, "reads", ())), options)


def resolve(inputs: Optional[Sequence[Any]]) -> list[tuple[Wanted, Op]]:
    """The declared batch keys with their ops, checked: known ops and features, one declaration per key,
    no bookkeeping name, one store at most and not beside records, the same options on every crop."""
    wanted = [as_wanted(w) for w in (DEFAULT_INPUTS if inputs is None else inputs)]
    out, keys = [], set()
    for w in wanted:
        op = OPS.get(w.op)
        for key in op.keys(w):
            if key in keys:
                raise ValueError(f"batch key {key!r} is declared twice: declare each of a method's keys once")
            if key in RESERVED:
                raise ValueError(f"batch key {key!r} is the input's own bookkeeping ({', '.join(RESERVED)}): name "
                                 "the key otherwise")
            keys.add(key)
        features_lib.resolve(w.reads)  # an unknown feature fails here, naming the registered ones
        if op.validate is not None:
            op.validate(w)
        out.append((w, op))
    stores = {w.op for w, op in out if op.stage == "store"}
    if stores and (len(stores) > 1 or any(op.stage != "store" for _, op in out)):
        raise ValueError(f"batch keys {sorted(keys)}: keys from a store ({', '.join(sorted(stores))}) come from it "
                         "alone: declare every key of the method from that one store")
    crops = {w.options for w, _ in out if w.op == "crop"}
    if len(crops) > 1:
        raise ValueError(f"the crops of one record are applied jointly, but the keys declare different options "
                         f"{sorted(crops)}: give every 'crop' key the same options")
    # A joint key (a label map) flips exactly as its record's image: the crops' flip option, not its own.
    flips = bool(dict(next(iter(crops))).get("flip", False)) if crops else False
    return [(dataclasses.replace(w, options=tuple(sorted({**dict(w.options), "flip": flips}.items()))) if op.joint
             else w, op) for w, op in out]


def flip(ctx: OpContext, out, wanted: Wanted):
    """`out` ([S, S, C] or [S, S]) flipped left-right as every spatial key of the record (one decision per
    record, FLIP_SALT) when the key's options say flip=True."""
    tf = _tf()
    if not wanted.option("flip", False):
        return out
    flipped = tf.image.stateless_random_flip_left_right(out if out.shape.rank == 3 else out[..., None],
                                                        ctx.seed(FLIP_SALT))
    return flipped if out.shape.rank == 3 else flipped[..., 0]


def features_read(resolved: list[tuple[Wanted, Op]]) -> list[str]:
    """The record features the resolved keys read (with what their ops need besides), in order, each once."""
    names: list[str] = []
    for w, op in resolved:
        for name in tuple(w.reads) + tuple(op.needs):
            if name not in names:
                names.append(name)
    return names


def store_of(resolved: list[tuple[Wanted, Op]]) -> Optional[Wanted]:
    """The first key of a store-made method (its options name the store), None for a record-made one."""
    return next((w for w, op in resolved if op.stage == "store"), None)

