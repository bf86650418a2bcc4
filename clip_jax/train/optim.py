"""The one optimizer factory: by default the CLIP paper's (AdamW, weight decay on weight matrices
only, warmup + cosine), or torch.optim.SGD's (momentum, the weight decay added to the gradient) with
Dassl's constant warmup and per-epoch cosine (the few-shot adaptations), a poly decay (LSeg's) or step decays (ViLD's),
with parameter groups:
frozen params, per-group learning-rate multipliers and weight decay.

Settings (``config.optim``; defaults in clip_jax.config.OPTIM_DEFAULTS): optimizer, momentum,
learning_rate, end_learning_rate, warmup_steps, schedule, warmup_learning_rate,
schedule_every_steps, decay_boundaries, decay_factor, b1, b2, eps, weight_decay, weight_decay_on,
grad_clip_norm (0 disables),
param_groups and frozen. The schedule spans ``total_steps`` (the run's length).

Parameter groups are a table ((REGEX, {frozen, lr_mult, weight_decay}), ...) over the
'/'-joined param paths; each param takes the first entry whose REGEX matches its whole path
(the config's entries first, then the method's). Frozen params are not optimized at all:
the step computes no gradient for them and the optimizer holds no state for them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from clip_jax.config import optim_settings

# Decayed (the paper): weight matrices, i.e. dense/conv/attention kernels and the two output
# projections. Decided by name, not rank: per-head biases are 3-D and scanned gains 2-D.
# Gains, biases, embeddings and the logit scale/bias match none of these.
DECAY = (r"kernel$", r"(^|/)proj$", r"(^|/)text_projection$")
GROUP_KEYS = ("frozen", "lr_mult", "weight_decay")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("warmup_cosine", "constant_warmup_cosine", "poly", "steps", "exponential")
POLY_POWER = 0.9  # the segmentation codebases' poly decay (LSeg, DeepLab)
DECAY_ON = {"matrices": DECAY, "all": (r".*",)}


def _choice(settings: dict, key: str, known) -> str:
    value = settings[key]
    if value not in known:
        raise ValueError(f"config.optim.{key}={value!r} is not known: use one of {', '.join(map(repr, known))}")
    return value


def path_name(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def weight_decay_mask(params, decay: Sequence[str] = DECAY):
    """True where weight decay applies: the param names matching `decay`."""
    yes = [re.compile(p) for p in decay]
    mask = {path: any(p.search(path_name(path)) for p in yes) for path in traverse_util.flatten_dict(params)}
    return traverse_util.unflatten_dict(mask)


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Per param (flat '/'-path tuples as keys): frozen, learning-rate multiplier, decay coefficient."""

    frozen: dict
    lr_mult: dict
    weight_decay: dict

    def trainable(self, tree):
        """The leaves of `tree` (shaped like the params) that are trained, as a nested dict."""
        return _select(tree, lambda path: not self.frozen[path])

    def fixed(self, tree):
        """The frozen leaves of `tree`, as a nested dict ({} when nothing is frozen)."""
        return _select(tree, lambda path: self.frozen[path])

    def count(self) -> tuple[int, int]:
        """(trained, frozen) number of param tensors."""
        frozen = sum(self.frozen.values())
        return len(self.frozen) - frozen, frozen


def _select(tree, keep) -> dict:
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if keep(p)})


def merge(*trees) -> dict:
    """One nested dict from several with disjoint leaves (the inverse of trainable/fixed)."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(flat)


def _compile(regex: str, where: str) -> "re.Pattern":
    if not isinstance(regex, str):
        raise ValueError(f"{where}: {regex!r} is not a regex string")
    try:
        return re.compile(regex)
    except re.error as e:
        raise ValueError(f"{where}: {regex!r} is not a valid regex ({e})") from None


def _table(entries, where: str) -> list[tuple[str, "re.Pattern", dict]]:
    table = []
    for i, entry in enumerate(entries or ()):
        if len(entry) != 2:
            raise ValueError(f"{where}[{i}] = {entry!r}: expected (REGEX, {{frozen, lr_mult, weight_decay}})")
        regex, settings = entry
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(GROUP_KEYS))
        if unknown:
            raise ValueError(f"{where}[{i}] ({regex!r}): unknown settings {unknown}; known are {', '.join(GROUP_KEYS)}")
        for key in ("lr_mult", "weight_decay"):
            if key in settings and not float(settings[key]) >= 0:
                raise ValueError(f"{where}[{i}] ({regex!r}): {key} must be >= 0, got {settings[key]}")
        table.append((f"{where}[{i}] ({regex!r})", _compile(regex, f"{where}[{i}]"), settings))
    return table


def resolve_param_groups(params, config=None, method_groups: Sequence = ()) -> ParamGroups:
    """Each param's group from config.optim (param_groups, frozen) and then the method's table.

    Errors, before anything compiles: a bad regex, a config regex that matches no param, or
    a frozen set that leaves nothing to train.
    """
    settings = optim_settings(config)
    paths = list(traverse_util.flatten_dict(params))
    names = {p: path_name(p) for p in paths}
    example = ", ".join(repr(names[p]) for p in paths[:3])
    table = _table(settings["param_groups"], "config.optim.param_groups")
    ours = len(table)
    table += _table(method_groups, "the method's param_groups")
    used = [False] * len(table)
    frozen_re = _compile(settings["frozen"], "config.optim.frozen") if settings["frozen"] else None
    decays = traverse_util.flatten_dict(weight_decay_mask(params, DECAY_ON[_choice(settings, "weight_decay_on",
                                                                                  DECAY_ON)]))
    frozen, lr_mult, weight_decay = {}, {}, {}
    frozen_hits = 0
    for path in paths:
        chosen = {}
        for i, (_, regex, group) in enumerate(table):
            if regex.fullmatch(names[path]):
                used[i], chosen = True, group
                break
        by_shortcut = bool(frozen_re and frozen_re.fullmatch(names[path]))
        frozen_hits += by_shortcut
        frozen[path] = by_shortcut or bool(chosen.get("frozen", False))
        lr_mult[path] = float(chosen.get("lr_mult", 1.0))
        weight_decay[path] = float(chosen.get("weight_decay", settings["weight_decay"])) if decays[path] else 0.0
    for i, (where, _, _) in enumerate(table[:ours]):
        if not used[i]:
            raise ValueError(f"{where} matches no parameter (it must match a whole path, e.g. {example})")
    if frozen_re is not None and not frozen_hits:
        raise ValueError(f"config.optim.frozen={settings['frozen']!r} matches no parameter "
                         f"(it must match a whole path, e.g. {example}; 'visual/.*' freezes the image tower)")
    if all(frozen.values()):
        raise ValueError("every parameter is frozen (config.optim.frozen / param_groups): nothing is left to train")
    return ParamGroups(frozen, lr_mult, weight_decay)


def make_schedule(config, total_steps: int) -> optax.Schedule:
    s = optim_settings(config)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    kind = _choice(s, "schedule", SCHEDULES)
    if kind == "constant_warmup_cosine":
        return constant_warmup_cosine(s, total_steps)
    if kind == "poly":
        return poly(s, total_steps)
    if kind == "steps":
        return stepwise(s, total_steps)
    if kind == "exponential":
        every, lr, gamma = int(s["schedule_every_steps"]), float(s["learning_rate"]), float(s["decay_factor"])
        return lambda count: lr * gamma ** (count // every)
    warmup = min(int(s["warmup_steps"]), total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(s["learning_rate"]),
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=float(s["end_learning_rate"]),
    )


def constant_warmup_cosine(settings: dict, total_steps: int) -> optax.Schedule:
    """Dassl's ConstantWarmupScheduler around a cosine: warmup_learning_rate for warmup_steps, then the
    cosine from learning_rate to end_learning_rate over the whole run (the warmup included), its
    position counted in whole periods of schedule_every_steps (an epoch's steps: a per-epoch schedule)."""
    every = int(settings["schedule_every_steps"])
    if every < 1 or total_steps % every:
        raise ValueError(f"config.optim.schedule_every_steps={every} does not divide the run's {total_steps} steps: "
                         "use a divisor of them (an epoch's steps)")
    lr, end, periods = float(settings["learning_rate"]), float(settings["end_learning_rate"]), total_steps // every
    warmup, warmup_lr = int(settings["warmup_steps"]), float(settings["warmup_learning_rate"])

    def schedule(count):
        cosine = end + 0.5 * (lr - end) * (1 + jnp.cos(jnp.pi * (count // every) / periods))
        return jnp.where(count < warmup, warmup_lr, cosine)

    return schedule


def stepwise(settings: dict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps, then learning_rate multiplied by decay_factor at each of
    decay_boundaries (Mask R-CNN's and ViLD's schedule)."""
    bounds = tuple(int(b) for b in settings["decay_boundaries"])
    if list(bounds) != sorted(set(bounds)) or any(not 0 < b < total_steps for b in bounds):
        raise ValueError(f"config.optim.decay_boundaries={tuple(settings['decay_boundaries'])} must be increasing "
                         f"steps inside the run (0 < step < {total_steps})")
    lr, factor = float(settings["learning_rate"]), float(settings["decay_factor"])
    warmup = int(settings["warmup_steps"])
    decay = optax.piecewise_constant_schedule(lr, {b: factor for b in bounds})

    def schedule(count):
        return decay(count) * (jnp.minimum(1.0, count / warmup) if warmup > 0 else 1.0)

    return schedule


def poly(settings: dict, total_steps: int, power: float = POLY_POWER) -> optax.Schedule:
    """end + (learning_rate - end) * (1 - t / total_steps) ** power, t counted in whole periods of
    schedule_every_steps (an epoch's steps: LSeg's LambdaLR steps per epoch), after a linear warmup from 0
    over warmup_steps where set (none in LSeg's)."""
    every = int(settings["schedule_every_steps"])
    if every < 1:
        raise ValueError(f"config.optim.schedule_every_steps={every} must be >= 1")
    lr, end = float(settings["learning_rate"]), float(settings["end_learning_rate"])
    warmup = int(settings["warmup_steps"])

    def schedule(count):
        t = (count // every) * every
        value = end + (lr - end) * jnp.maximum(1.0 - t / total_steps, 0.0) ** power
        return value * (jnp.minimum(1.0, count / warmup) if warmup > 0 else 1.0)

    return schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Scales the updates by min(1, max_norm / global norm), as optax.clip_by_global_norm does
    (and with its empty state, so checkpoints keep their structure), with two savings:

    * the scale is one scalar multiplied into each leaf, which XLA fuses into the Adam moment
      updates that read it; optax's per-leaf divide made XLA write the clipped gradients out
      and read them back (three passes over the params per step saved; docs/performance.md);
    * ``grad_norm=`` (an extra arg of ``update``) passes the norm the step already took, so the
      gradients are not read once more for it.
    """

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree_util.tree_map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def add_decayed_weights(coefficients) -> optax.GradientTransformation:
    """updates + c * params for each leaf whose coefficient c (a Python float) is not 0: optax's
    add_decayed_weights with a per-leaf coefficient (a parameter group's weight decay), or one float
    for every leaf."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the params: optimizer.update(grads, state, params)")
        if isinstance(coefficients, float):
            c = coefficients
            return jax.tree_util.tree_map(lambda g, p: g + c * p if c else g, updates, params), state
        return jax.tree_util.tree_map(lambda g, c, p: g + c * p if c else g, updates, coefficients, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_per_leaf(factors) -> optax.GradientTransformation:
    """Each leaf times its factor (a Python float; leaves at 1.0 untouched): learning-rate multipliers."""

    def update_fn(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map(lambda g, f: g if f == 1.0 else g * jnp.asarray(f, g.dtype), updates, factors)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(config, params, total_steps: int, groups: Optional[ParamGroups] = None,
                   schedule: Optional[optax.Schedule] = None) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW (or SGD with momentum, the decay added before it) with each
    group's decay and learning rate, over the TRAINED params only: apply it to
    ``groups.trainable(params)`` (all of them without groups).

    `params` (or `groups`) None: one optimizer for whatever params it is given, every leaf decayed
    alike (weight_decay_on='all' and no param_groups: the few-shot adaptations', made before their
    params)."""
    s = optim_settings(config)
    kind = _choice(s, "optimizer", OPTIMIZERS)
    schedule = schedule or make_schedule(config, total_steps)
    if groups is None and params is None:
        if _choice(s, "weight_decay_on", DECAY_ON) != "all" or s["param_groups"] or s["frozen"]:
            raise ValueError("an optimizer made without the params decays every leaf alike and has no groups: set "
                             "config.optim.weight_decay_on='all' and no param_groups / frozen, or pass the params")
        decay, lr_mult = float(s["weight_decay"]), None
    else:
        groups = groups or resolve_param_groups(params, config)
        trainable = lambda flat: groups.trainable(traverse_util.unflatten_dict(flat))  # noqa: E731  (per-leaf floats)
        decay = trainable(groups.weight_decay)
        lr_mult = trainable(groups.lr_mult) if any(m != 1.0 for m in groups.lr_mult.values()) else None
    parts = []
    clip = float(s["grad_clip_norm"])
    if clip > 0:
        parts.append(clip_by_global_norm(clip))
    if kind == "adamw":
        parts.append(optax.scale_by_adam(b1=float(s["b1"]), b2=float(s["b2"]), eps=float(s["eps"])))
        parts.append(add_decayed_weights(decay))
    else:  # torch.optim.SGD: the decay joins the gradient before the momentum buffer takes it
        parts.append(add_decayed_weights(decay))
        parts.append(optax.trace(decay=float(s["momentum"]), nesterov=bool(s.get("nesterov", False))))
    parts.append(optax.scale_by_learning_rate(schedule))
    if lr_mult is not None:
        parts.append(scale_per_leaf(lr_mult))
    return optax.chain(*parts)
