"""The base config: every key a run reads, with its default, in one place; the keys of a method
come with its registration (clip_jax.methods.base.Method.config_sections) and sit in its sections.

Experiment files in configs/ start from `base_config()` and override what they change;
`--config.KEY=VALUE` overrides on the command line, and an unknown key is refused there.
"""

from __future__ import annotations

import ml_collections

from clip_jax.input.settings import DEFAULTS as DATA_DEFAULTS
from clip_jax.input.settings import MAPPINGS as DATA_MAPPINGS
from clip_jax.input.settings import RANGES as DATA_RANGES
from clip_jax.input.settings import check_mappings
from clip_jax.methods import registered

OPTIM_DEFAULTS = {
    # 'adamw' (the paper's) or 'sgd' (torch.optim.SGD's: the weight decay added to the gradient, then momentum)
    "optimizer": "adamw",
    "momentum": 0.9,  # sgd only
    "nesterov": False,  # sgd only: torch.optim.SGD(nesterov=True) (AudioCLIP's protocols)
    "learning_rate": 5e-4,
    "end_learning_rate": 0.0,
    "warmup_steps": 2000,
    # 'warmup_cosine': linear from 0 to learning_rate over warmup_steps, then cosine to end_learning_rate;
    # 'constant_warmup_cosine' (Dassl's): warmup_learning_rate for warmup_steps, then the cosine of the whole
    # run from learning_rate, its position counted in whole schedule_every_steps (an epoch's steps: per epoch)
    "schedule": "warmup_cosine",
    "warmup_learning_rate": 0.0,
    "schedule_every_steps": 1,
    # 'exponential' (torch's ExponentialLR stepped each epoch, AudioCLIP's): learning_rate times decay_factor to the
    # number of whole schedule_every_steps periods done (no warmup)
    # 'steps' (the detection codebases'): linear warmup from 0, then learning_rate times decay_factor at each of
    # decay_boundaries (steps counted from the run's start)
    "decay_boundaries": (),
    "decay_factor": 0.1,
    "b1": 0.9,
    "b2": 0.98,  # the paper's ViT value; 0.999 for ResNets
    "eps": 1e-6,
    "weight_decay": 0.2,  # decoupled, on weight matrices only (clip_jax.train.optim.DECAY)
    "weight_decay_on": "matrices",  # 'matrices' (the paper's) or 'all' (every trained param, as torch's optimizers)
    "grad_clip_norm": 1.0,  # 0 disables
    # A moving average of the trained params, ema = decay * ema + (1 - decay) * params after every applied step
    # (GLIP's 0.999): evaluation and export read it instead of the params. 0 keeps none.
    "ema_decay": 0.0,
    # Parameter groups: ((REGEX, {frozen, lr_mult, weight_decay}), ...) over '/'-joined param
    # paths (e.g. 'visual/transformer/resblocks/attn/in_proj_kernel'), first full match wins.
    "param_groups": (),
    "frozen": "",  # shortcut: params whose path fully matches this regex are frozen ('' = none)
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "clip"  # clip_jax.methods: what the trainer optimizes
    c.model = "ViT-B-32"  # a preset (clip_jax.list_models()) or an open_clip-style JSON path
    # Architecture changes over the preset, in open_clip's JSON keys, e.g.
    # ConfigDict({"text_cfg": {"width": 256}, "init_logit_bias": -10.0}).
    c.model_overrides = ml_collections.ConfigDict()
    c.init_from = ""  # weights to start from: what clip_jax.load reads (.safetensors/.pt/.msgpack, model dir, hf-hub:)
    c.init_params = ".*"  # the params taken from init_from (regex over param paths); the rest stay fresh
    c.dtype = "float32"  # compute; params and optimizer state stay float32
    c.remat = "none"  # 'none' | 'full' | a jax.checkpoint_policies name
    c.scan = True
    c.attn_impl = "auto"  # cuDNN fused attention on NVIDIA GPUs in bf16 (lengths padded to x8), else XLA
    c.seed = 0
    c.batch_size = 256  # global, over every process
    c.total_steps = 1000
    c.accum_steps = 1
    c.prefetch_batches = 2  # global batches put on the devices ahead of the step
    c.log_every_steps = 100
    c.eval_every_steps = 0
    c.eval_batch_size = 256  # global
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.compilation_cache_dir = ""  # "" = ~/.cache/clip_jax/xla; "none" = off
    c.max_nonfinite_steps = 10  # stop after this many steps in a row with a NaN/inf loss or gradient
    c.summary_png = False  # at the end: WORKDIR/summary.png, curves and (where the source offers) zero-shot predictions
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.optim = ml_collections.ConfigDict(OPTIM_DEFAULTS)
    c.data = ml_collections.ConfigDict(DATA_DEFAULTS)
    # Every registered method's sections, whichever config.method is: a config file or the command
    # line may set the method after its settings, and config.json keeps one layout.
    for name, defaults in registered("config_sections").items():
        c[name] = ml_collections.ConfigDict(defaults)
    return c


def optim_settings(config=None) -> dict:
    """OPTIM_DEFAULTS overlaid with `config` (a dict or ConfigDict); an unknown key is an error."""
    given = {} if config is None else dict(config.items())
    unknown = sorted(set(given) - set(OPTIM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown optim settings {unknown}: known are {', '.join(OPTIM_DEFAULTS)}")
    return {**OPTIM_DEFAULTS, **given}


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's config from its config.json: the base config with the saved values, so a workdir
    written before a key existed reads with that key's default, one written before a key moved into a
    method's section reads it from its old place, and keys no longer known are dropped."""
    config = base_config()
    saved = dict(saved)
    for old, new in registered("config_moved").items():
        if old in saved and not isinstance(saved[old], dict):
            *parents, leaf = new.split(".")
            value, node = saved.pop(old), saved
            for part in parents:
                node[part] = dict(node.get(part) or {})
                node = node[part]
            node.setdefault(leaf, value)
    _overlay(config, saved)
    return config


# ConfigDicts whose saved value replaces the default whole (free-form mappings, not sections).
FREE_FORM = ("mesh",) + DATA_MAPPINGS


def _overlay(config: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if key not in config:
            continue
        current = config[key]
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
            if len(current) and key not in FREE_FORM:
                _overlay(current, value)
            else:  # free-form mappings: the saved one whole
                config[key] = ml_collections.ConfigDict(value)
        elif isinstance(current, tuple) and isinstance(value, list):
            config[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            config[key] = value


# -- ranges: every numeric setting's allowed values, checked before anything is read or compiled --
# ('>=', x), ('>', x), ('[0,1]',) or ('[0,1)',) per '.'-joined key.
RANGES = {
    "batch_size": (">=", 1), "total_steps": (">=", 1), "accum_steps": (">=", 1), "prefetch_batches": (">=", 1),
    "log_every_steps": (">=", 1), "eval_every_steps": (">=", 0), "eval_batch_size": (">=", 1),
    "checkpoint_every_steps": (">=", 1), "keep_checkpoints": (">=", 1), "max_nonfinite_steps": (">=", 1),
    "seed": (">=", 0),
    "optim.learning_rate": (">=", 0), "optim.end_learning_rate": (">=", 0), "optim.warmup_steps": (">=", 0),
    "optim.b1": ("[0,1)",), "optim.b2": ("[0,1)",), "optim.eps": (">", 0), "optim.weight_decay": (">=", 0),
    "optim.grad_clip_norm": (">=", 0), "optim.momentum": ("[0,1)",), "optim.warmup_learning_rate": (">=", 0),
    "optim.schedule_every_steps": (">=", 1), "optim.decay_factor": (">", 0),
    **{f"data.{key}": rule for key, rule in DATA_RANGES.items()},
}
# (low, high) pairs that must be shares of the image area, ordered
SCALE_PAIRS = ("data.crop_scale",)


def in_range(value, rule: tuple) -> bool:
    kind = rule[0]
    if kind == ">=":
        return value >= rule[1]
    if kind == ">":
        return value > rule[1]
    return 0 <= value <= 1 if kind == "[0,1]" else 0 <= value < 1


def describe_range(rule: tuple) -> str:
    return f"{rule[0]} {rule[1]}" if rule[0] in (">=", ">") else f"in {rule[0]}"


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return None
        node = node[part]
    return node


def all_ranges() -> dict:
    """RANGES and every registered method's (Method.config_ranges)."""
    return {**RANGES, **registered("config_ranges")}


def check_ranges(config, ranges: dict | None = None, scale_pairs=SCALE_PAIRS) -> None:
    """Every numeric setting in its range (`ranges`: all_ranges()), and the crop scales ordered: the
    first one out is an error naming the field, its value and the allowed range."""
    ranges = all_ranges() if ranges is None else ranges
    for key, rule in ranges.items():
        value = _lookup(config, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not in_range(value, rule):
            raise ValueError(f"config.{key}={value!r} is out of range: it must be {describe_range(rule)}")
    for key in scale_pairs:
        scale = _lookup(config, key)
        if scale is None:
            continue
        scale = tuple(scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"config.{key}={scale!r}: use (low, high) with 0 < low <= high <= 1 (the share of "
                             "the image's area a random crop keeps)")
    data = _lookup(config, "data")
    if data is not None:
        check_mappings(data)
