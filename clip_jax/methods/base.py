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

    def post_update(self, params):
        """Params after each applied update (a clamp, a projection); the identity by default."""
        return params

    def model_variables(self, params, model_state: Mapping[str, Any]) -> dict:
        """The model's variables for evaluation and export, from the method's params and state."""
        return {"params": params, **model_state}

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
    def train_flops(cls, forward: Mapping[str, float]) -> float:
        """Model FLOPs of one training step from the forward pass's parts over the batch
        ({'image', 'text', 'logits', 'forward', 'train_step'}, clip_jax.train.flops.clip_forward_flops):
        the backward pass counted as twice the forward."""
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
